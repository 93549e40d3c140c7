"""Contracts with transformers: one test per private or version-specific part that `mixt5._compat` relies on.

Each test states what MixT5 relies on. When one fails after a transformers upgrade, fix `mixt5._compat` (and only
it), then move the pin in pyproject.toml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import (
    AutoModelForSeq2SeqLM,
    HfArgumentParser,
    MT5Config,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
)

from mixt5 import MixT5Config, MixT5ForConditionalGeneration, MoEConfig, upcycle
from mixt5._compat import (
    TrainerHooksMixin,
    add_dataclass_arguments,
    config_forces_tied_output,
    experts_class,
    experts_implementation,
    index_for_transformers_kernels,
    init_submodel_with,
    local_or_cached_file,
    read_weights_file,
    register_experts_kernel,
    set_experts_implementation,
    token_cross_entropy,
)
from mixt5.modeling import MixT5GatedExperts
from published import write_published_checkpoint
from tiny import tiny_config, tiny_dense


def test_experts_class_dispatches_on_the_configs_implementation():
    """`use_experts_implementation(has_gate=...)`: sets `has_gate`, keeps `config`, and runs the kernel registered
    under `config._experts_implementation` (the class's own forward for "eager")."""
    calls = []

    def probe(experts, hidden_states, top_k_index, top_k_weights):
        calls.append((type(experts).__name__, experts.has_gate))
        return hidden_states * 0

    register_experts_kernel("compat_probe", probe)
    for has_gate in (True, False):

        @experts_class(has_gate=has_gate)
        class Experts(nn.Module):
            def __init__(self, config):
                super().__init__()

            def forward(self, hidden_states, top_k_index, top_k_weights):
                return hidden_states + 1

        config = MixT5Config(moe={"moe_layers": "all"}, **tiny_config().to_dict())
        experts = Experts(config)
        assert experts.has_gate is has_gate and experts.config is config
        x, index, weights = torch.ones(2, 3), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        set_experts_implementation(config, "eager")
        assert torch.equal(experts(x, index, weights), x + 1)
        set_experts_implementation(config, "compat_probe")
        assert torch.equal(experts(x, index, weights), x * 0)
    assert calls == [("Experts", True), ("Experts", False)]


def test_experts_class_with_biases_feeds_them_to_transformers_kernels():
    """`use_experts_implementation(has_bias=True)`: sets `has_bias`, and transformers' kernels add `up_proj_bias` and
    `down_proj_bias` (the names `MixBertExperts` holds)."""

    @experts_class(has_gate=False, has_bias=True)
    class Experts(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = 2
            self.up_proj = nn.Parameter(torch.ones(2, 4, 4))  # grouped_mm on CPU: 16-byte row strides
            self.up_proj_bias = nn.Parameter(torch.zeros(2, 4))
            self.down_proj = nn.Parameter(torch.ones(2, 4, 4))
            self.down_proj_bias = nn.Parameter(torch.zeros(2, 4))
            self.act_fn = nn.Identity()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            raise AssertionError("not the eager path")

    config = MixT5Config(moe={"moe_layers": "all"}, **tiny_config().to_dict())
    experts = Experts(config)
    assert experts.has_bias is True and experts.has_gate is False
    x, index, weights = torch.ones(2, 4), torch.tensor([[0], [1]]), torch.ones(2, 1)
    for implementation in ("batched_mm", "grouped_mm"):
        set_experts_implementation(config, implementation)
        with torch.no_grad():
            experts.up_proj_bias.zero_()
            experts.down_proj_bias.zero_()
            plain = experts(x, index, weights)
            experts.up_proj_bias.fill_(1.0)
            experts.down_proj_bias[1].fill_(0.5)
            biased = experts(x, index, weights)
        # up: 4 -> 4 + 1 per unit; down: 4 units * 5 = 20 (+ 0.5 for expert 1)
        torch.testing.assert_close(plain, torch.full((2, 4), 16.0))
        torch.testing.assert_close(biased, torch.tensor([[20.0] * 4, [20.5] * 4]))


def test_the_experts_implementation_is_read_from_the_config(tmp_path):
    """`from_pretrained(experts_implementation=...)` and `set_experts_implementation` record the kernel in
    `config._experts_implementation`, the config object the experts hold; MixT5's default is "eager"."""
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:1"))
    model.save_pretrained(tmp_path)
    assert experts_implementation(AutoModelForSeq2SeqLM.from_pretrained(tmp_path).config) == "eager"
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, experts_implementation="mixt5_mm")
    assert experts_implementation(loaded.config) == "mixt5_mm"
    loaded.set_experts_implementation("batched_mm")
    _, _, layer = next(loaded.sparse_layers())
    assert experts_implementation(layer.experts.config) == "batched_mm"


def test_transformers_kernels_add_nothing_for_slots_sent_to_expert_0_with_weight_0():
    """transformers' kernels run every slot (no "unused" id outside expert parallelism): a slot clamped to expert 0
    with weight 0 must add nothing, so that they compute what MixT5's dispatch computes by skipping it."""
    config = MixT5Config(moe={"num_experts": 4, "moe_layers": "all"}, **tiny_config(dropout_rate=0.0).to_dict())
    experts = MixT5GatedExperts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    hidden = torch.randn(6, config.d_model, generator=generator)
    index = torch.tensor([[1, 4], [4, 4], [2, 3], [0, 4], [3, 1], [4, 2]])  # 4 = unused slot
    weights = torch.rand(6, 2, generator=generator).masked_fill(index == 4, 0.0)
    set_experts_implementation(config, "eager")
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        for implementation in ("batched_mm", "grouped_mm"):
            set_experts_implementation(config, implementation)
            got = experts(hidden, index_for_transformers_kernels(index, 4), weights)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=implementation)
    assert torch.equal(expected[1], torch.zeros(config.d_model))  # a token with no slot used gets zeros


def test_transformers_asks_the_model_class_whether_kernels_can_be_switched(monkeypatch):
    """`set_experts_implementation` consults the class's `_can_set_experts_implementation` (a grep of the model's
    module for `@use_experts_implementation`, which MixT5's model module does not contain: we answer True)."""
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:1"))
    model.set_experts_implementation("batched_mm")
    monkeypatch.setattr(MixT5ForConditionalGeneration, "_can_set_experts_implementation", classmethod(lambda c: False))
    with pytest.raises(ValueError):
        model.set_experts_implementation("grouped_mm")


def test_a_submodels_weights_are_initialised_by_its_init_weights(monkeypatch):
    """`initialize_weights` initialises a sub-model (T5's stacks) with the sub-model's `_init_weights`, which
    `init_submodel_with` replaces: a fresh model's routers get MixT5's init, not garbage or T5's."""
    seen = []
    monkeypatch.setattr(
        "mixt5.modeling.modeling_mixt5.init_submodel_with",
        lambda stack, fn: init_submodel_with(stack, lambda module: (seen.append(type(module).__name__), fn(module))),
    )
    moe = {"num_experts": 4, "moe_layers": "all", "router_init": "normal", "router_init_std": 3.0}
    model = MixT5ForConditionalGeneration(MixT5Config(moe=moe, **tiny_config().to_dict()))
    assert "MixT5Router" in seen and "MixT5GatedExperts" in seen
    routers = torch.cat([layer.router.weight.flatten() for _, _, layer in model.sparse_layers()])
    assert 2.5 < routers.std().item() < 3.5


def test_the_masked_lm_loss_is_an_unshifted_token_cross_entropy():
    """transformers' `ForMaskedLM` loss: -100 ignored, no shift, float32, the sum over `num_items_in_batch` when
    given, else the mean over the label tokens."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=generator).to(torch.bfloat16)
    labels = torch.tensor([[1, 2, -100], [6, -100, -100]])
    picked = [(b, t) for b in range(2) for t in range(3) if labels[b, t] != -100]
    log_probs = logits.float().log_softmax(-1)
    total = -sum(log_probs[b, t, labels[b, t]] for b, t in picked)
    assert token_cross_entropy(logits, labels).dtype == torch.float32
    torch.testing.assert_close(token_cross_entropy(logits, labels), total / 3)
    torch.testing.assert_close(token_cross_entropy(logits, labels, torch.tensor(10)), total / 10)


class _Scalar(nn.Module):
    """loss = w * (label tokens of the batch) / num_items_in_batch: its gradient in w is the batch's token share."""

    accepts_loss_kwargs = True

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.seen: list[int] = []

    def forward(self, x, labels, num_items_in_batch=None):
        tokens = labels.ne(-100).sum()
        if num_items_in_batch is None:
            return {"loss": self.w * 0 + x.sum() * 0}
        self.seen.append(int(num_items_in_batch))
        return {"loss": self.w * tokens / num_items_in_batch}


def _records(label_rows):
    return [{"x": torch.ones(1), "labels": torch.tensor(row)} for row in label_rows]


def _args(tmp_path: Path, **overrides) -> Seq2SeqTrainingArguments:
    values = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, max_steps=1, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    return Seq2SeqTrainingArguments(**{**values, **overrides})


def test_trainer_passes_the_steps_label_count_and_keeps_the_loss_unscaled(tmp_path):
    """With `accepts_loss_kwargs`, Trainer passes `num_items_in_batch` = the label tokens of the whole optimizer step
    (all accumulation steps) and neither divides the loss by the accumulation steps nor rescales it on one process;
    `current_gradient_accumulation_steps` is the step's number of batches."""
    model = _Scalar()
    steps = []

    class Probe(Seq2SeqTrainer):
        def compute_loss(self, *args, **kwargs):
            steps.append(self.current_gradient_accumulation_steps)
            return super().compute_loss(*args, **kwargs)

    train = _records([[1, 2, -100], [3, -100, -100]])  # 2 + 1 label tokens
    Probe(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=train).train()
    assert model.seen == [3, 3] and steps == [2, 2]
    # gradient = 2/3 + 1/3 = 1 (a division by the accumulation steps would give 0.5); SGD with lr 1
    assert model.w.item() == pytest.approx(-1.0)


def test_trainer_hooks_choose_the_samplers_and_the_eval_gather(tmp_path):
    """Trainer builds its dataloaders with `_get_train_sampler` / `_get_eval_sampler`, and `evaluation_loop` gathers
    with `gather_function` (which `Seq2SeqTrainer.evaluate` resets before each call)."""
    gathered = []

    class Hooked(TrainerHooksMixin, Seq2SeqTrainer):
        def train_sampler(self, default):
            return SequentialSampler(list(range(3)))

        def eval_sampler(self, eval_dataset):
            return SequentialSampler(eval_dataset)

        def eval_gather_function(self):
            def gather(tensor):
                gathered.append(tensor)
                return self.accelerator.gather_for_metrics(tensor)

            return gather

    data = _records([[1, 2, -100], [3, -100, -100], [4, 5, 6]])
    trainer = Hooked(model=_Scalar(), args=_args(tmp_path), train_dataset=data, eval_dataset=data)
    assert isinstance(trainer.get_train_dataloader().sampler, SequentialSampler)
    assert isinstance(trainer.get_eval_dataloader().sampler, SequentialSampler)
    trainer.evaluate()
    assert gathered  # the eval losses went through our gather function


def test_t5_configs_force_a_tied_output_and_keep_the_flag_as_the_rescale():
    """T5Config/MT5Config always say tied; T5 keeps the given flag as `scale_decoder_outputs` (what `MixT5Config`
    and `tying` correct for)."""
    assert config_forces_tied_output(T5Config) and config_forces_tied_output(MT5Config)
    assert T5Config(tie_word_embeddings=False).scale_decoder_outputs is False and T5Config().scale_decoder_outputs


def test_tie_weights_ties_what_get_expanded_tied_weights_keys_returns(tmp_path):
    """`post_init` / `tie_weights()` tie the pairs `get_expanded_tied_weights_keys` returns (`OutputTieMixin` keeps
    `embed_tokens` -> `shared` and drops `lm_head`); a stock T5 loaded with a separate head is tied again by a later
    `tie_weights()` unless its config says untied (why `tying.record_tying` sets it)."""
    moe = {"num_experts": 2, "moe_layers": "last:1"}
    for tied in (True, False):
        config = MixT5Config(moe=moe, **{**tiny_config().to_dict(), "tie_word_embeddings": tied})
        model = MixT5ForConditionalGeneration(config)
        model.tie_weights()
        assert (model.lm_head.weight is model.shared.weight) is tied
        assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    write_published_checkpoint(tmp_path, "t5-v1_1-base", "safetensors")
    stock = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert stock.lm_head.weight is not stock.shared.weight
    stock.tie_weights()
    assert stock.lm_head.weight is stock.shared.weight


def test_weights_files_and_cached_files_are_read_as_from_pretrained_reads_them(tmp_path):
    """`modeling_utils.load_state_dict` reads safetensors and `.bin` (weights only); `cached_file` with its private
    switches gives None for a file a folder does not have."""
    tensors = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "model.safetensors")
    for name in ("pytorch_model.bin", "model.safetensors"):
        read = read_weights_file(tmp_path / name)
        assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    assert local_or_cached_file(str(tmp_path), "model.safetensors") == str(tmp_path / "model.safetensors")
    assert local_or_cached_file(str(tmp_path), "spiece.model") is None


def test_push_to_hub_uploads_the_folder_after_writing_the_repos_card_into_it(tmp_path, monkeypatch):
    """`push_to_hub` saves into a temporary folder, writes the Hub repo's (or a generic) card over its README.md, then
    calls `_upload_modified_files` on it: `CardBeforeUploadMixin` puts the model's own card back just before."""
    from huggingface_hub import ModelCard
    from transformers.utils import hub

    uploaded = {}

    def fake_upload(self, working_dir, *args, **kwargs):
        uploaded["card"] = ModelCard.load(Path(working_dir) / "README.md")
        uploaded["files"] = sorted(p.name for p in Path(working_dir).iterdir())

    repo = type("Repo", (), {"repo_id": "me/tiny-moe"})()
    monkeypatch.setattr(hub, "hf_api", lambda: type("Api", (), {"create_repo": lambda self, *a, **k: repo})())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: ModelCard("---\nlibrary_name: x\n---\nhi"))
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)
    model = upcycle(tiny_dense(), MoEConfig(num_experts=2, moe_layers="last:1"), base_model="google/t5-v1_1-small")
    model.push_to_hub("me/tiny-moe")
    assert "model.safetensors" in uploaded["files"]
    assert uploaded["card"].data.base_model == "google/t5-v1_1-small" and "moe" in uploaded["card"].data.tags


@dataclass
class _Flags:
    name: str = field(metadata={"help": "a required string", "aliases": ["--old_name"]})
    kind: Literal["a", "b"] = "a"
    verbose: bool = True


@dataclass
class _More:
    count: int = 1


def test_dataclass_fields_are_added_to_an_existing_parser_as_the_constructor_adds_them():
    built = HfArgumentParser((_Flags, _More), prog="p")
    grown = HfArgumentParser(prog="p")
    for dataclass_type in (_Flags, _More):
        add_dataclass_arguments(grown, dataclass_type)
    assert grown.format_help() == built.format_help()  # names, aliases, --no_verbose, choices, help
    argv = ["--old_name", "x", "--kind", "b", "--no_verbose", "--count", "3"]
    assert grown.parse_args_into_dataclasses(args=argv) == (_Flags("x", "b", False), _More(3))
    with pytest.raises(SystemExit):  # argparse's own check of a Literal's choices
        grown.parse_args_into_dataclasses(args=["--name", "x", "--kind", "c"])


def test_trainer_writes_a_checkpoint_under_its_output_dir_then_rotates(tmp_path):
    """`Trainer._save_checkpoint` writes every file of `checkpoint-N` (trainer_state.json among them) under
    `_get_output_dir(trial)`, and rotates only after `publish_checkpoint`: the staging hooks see a whole checkpoint
    and the run folder keeps `save_total_limit` of them."""
    run_dir = tmp_path / "run"
    published = []

    class Staged(TrainerHooksMixin, Seq2SeqTrainer):
        def checkpoint_staging_dir(self, run_dir, name):
            return str(tmp_path / f"stage-{name}")

        def publish_checkpoint(self, staging, staged, final):
            assert not Path(final).exists()
            published.append(sorted(p.name for p in Path(staged).iterdir()))
            Path(staged).rename(final)

    args = _args(run_dir, max_steps=3, save_strategy="steps", save_steps=1, save_total_limit=2)
    Staged(model=_Scalar(), args=args, train_dataset=_records([[1, -100], [2, 3], [4, -100]])).train()
    assert len(published) == 3
    assert {"trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(published[0])
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-3"]
