"""Checkpoints stored as the published t5 / t5-v1.1 / flan-t5 / mt5 ones are upcycle to the dense model's function.

Each fixture (`published.py`) is a folder written by hand with the family's published `config.json` keys and its
weights as `pytorch_model.bin`, `model.safetensors` or safetensors shards. The expected logits are computed here
from the stored tensors: the stock dense model's last decoder hidden state times the stored output matrix
(`lm_head.weight`, or `shared.weight` for t5 v1.0), rescaled by `d_model**-0.5` for v1.0 only.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, AutoModelForTextEncoding, GenerationConfig

from mixt5 import MixT5EncoderModel, MixT5ForConditionalGeneration, MoEConfig, upcycle
from mixt5.cli import main
from mixt5.modeling.tying import load_pretrained
from mixt5.seed_format import load_seed_checkpoint
from published import D_MODEL, FAMILIES, STORAGES, VOCAB, family, write_published_checkpoint

MOE = MoEConfig(num_experts=4, top_k=2, moe_layers="all", expert_init="copy")
MOE_FLAGS = ["--num_experts", "4", "--top_k", "2", "--moe_layers", "all", "--expert_init", "copy"]
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}  # of the logits' scale (max |logit|)


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(2, VOCAB, (2, 7), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, -2:], attention_mask[1, -2:] = 0, 0
    decoder_input_ids = torch.cat(
        [torch.zeros(2, 1, dtype=torch.long), torch.randint(2, VOCAB, (2, 3), generator=gen)], 1
    )
    return {"input_ids": input_ids, "attention_mask": attention_mask, "decoder_input_ids": decoder_input_ids}


@pytest.fixture(scope="module", params=[(f, s) for f in FAMILIES for s in STORAGES], ids=lambda p: f"{p[0]}-{p[1]}")
def checkpoint(request, tmp_path_factory):
    name, storage = request.param
    path = tmp_path_factory.mktemp(f"{name}-{storage}") / "dense"
    state = write_published_checkpoint(path, name, storage)
    return name, path, state


def _expected(path, name, state, dtype=torch.float32):
    """The stock dense model, and logits computed from the stored tensors (checked against the stock model)."""
    dense = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype).eval()
    fam = family(name)
    with torch.no_grad():
        out = dense(**_inputs(), output_hidden_states=True)
    hidden = out.decoder_hidden_states[-1]
    if fam.rescaled:
        hidden = hidden * D_MODEL**-0.5
    head = state["shared.weight"] if fam.tied else state["lm_head.weight"]
    expected = hidden @ head.to(dtype).T
    _assert_logits(out.logits, expected, dtype)  # the reference itself: stock transformers computes this
    return dense, expected


def _assert_logits(got: torch.Tensor, expected: torch.Tensor, dtype=torch.float32) -> None:
    assert got.dtype == expected.dtype == dtype
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, f"max |delta| {err:.3g} for logits of scale {scale:.3g}"


def _greedy(model) -> torch.Tensor:
    inputs = _inputs()
    with torch.no_grad():
        return model.generate(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6, do_sample=False
        )


def _check_moe(model, dense, expected, name, dtype=torch.float32) -> None:
    assert isinstance(model, MixT5ForConditionalGeneration)
    fam = family(name)
    assert model.config.tie_word_embeddings is fam.tied
    assert model.config.scale_decoder_outputs is fam.rescaled
    assert (model.lm_head.weight is model.shared.weight) is fam.tied
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    with torch.no_grad():
        _assert_logits(model.eval()(**_inputs()).logits, expected, dtype)
    assert torch.equal(_greedy(model), _greedy(dense))


def _check_saved(folder, name) -> None:
    """The saved checkpoint says and holds what the model is."""
    fam = family(name)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixt5"
    assert config.get("tie_word_embeddings", True) is fam.tied
    assert config["scale_decoder_outputs"] is fam.rescaled
    weights = load_file(folder / "model.safetensors")
    assert ("lm_head.weight" in weights) is not fam.tied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_upcycled_model_computes_the_dense_function(checkpoint, tmp_path, dtype):
    name, path, state = checkpoint
    dense, expected = _expected(path, name, state, dtype)
    model = upcycle(copy.deepcopy(dense), MOE)
    _check_moe(model, dense, expected, name, dtype)

    model.save_pretrained(tmp_path / "moe")
    _check_saved(tmp_path / "moe", name)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe", dtype=dtype)
    _check_moe(reloaded, dense, expected, name, dtype)


def test_mixt5_upcycle_command(checkpoint, tmp_path):
    name, path, state = checkpoint
    dense, expected = _expected(path, name, state)
    assert main(["upcycle", "--model_name_or_path", str(path), "--output_dir", str(tmp_path / "moe"), *MOE_FLAGS]) == 0
    _check_saved(tmp_path / "moe", name)
    _check_moe(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe"), dense, expected, name)


def test_encoder_model(checkpoint, tmp_path):
    _, path, _ = checkpoint
    dense = AutoModelForTextEncoding.from_pretrained(path).eval()
    inputs = {k: v for k, v in _inputs().items() if k != "decoder_input_ids"}
    with torch.no_grad():
        expected = dense(**inputs).last_hidden_state
    assert main(["upcycle", "--model_name_or_path", str(path), "--output_dir", str(tmp_path / "moe"), "--encoder_only",
                 *MOE_FLAGS]) == 0  # fmt: skip
    for model in (upcycle(copy.deepcopy(dense), MOE), AutoModelForTextEncoding.from_pretrained(tmp_path / "moe")):
        assert isinstance(model, MixT5EncoderModel)
        assert model.encoder.embed_tokens.weight is model.shared.weight
        with torch.no_grad():
            got = model.eval()(**inputs).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


def test_untied_config_without_lm_head_is_refused(tmp_path, capsys):
    path = tmp_path / "dense"
    write_published_checkpoint(path, "t5-v1_1-base", "safetensors")
    weights = load_file(path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors hold\(s\) no lm_head\.weight"):
        load_pretrained(AutoModelForSeq2SeqLM, path)
    assert main(["upcycle", "--model_name_or_path", str(path), "--output_dir", str(tmp_path / "moe"), *MOE_FLAGS]) == 2
    err = capsys.readouterr().err
    assert f"{path / 'config.json'} says tie_word_embeddings: false" in err and "Traceback" not in err
    assert not (tmp_path / "moe").exists()

    # a MixT5 checkpoint that lost its lm_head
    write_published_checkpoint(tmp_path / "ok", "t5-v1_1-base", "safetensors")
    assert main(["upcycle", "--model_name_or_path", str(tmp_path / "ok"), "--output_dir", str(tmp_path / "moe"),
                 *MOE_FLAGS]) == 0  # fmt: skip
    weights = load_file(tmp_path / "moe" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "moe" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no lm_head\.weight"):
        AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe")


def test_builtin_tiny_model_has_a_separate_lm_head_like_t5_v1_1(tmp_path):
    argv = ["upcycle", "--model_name_or_path", "builtin:t5-v1_1-tiny", "--output_dir", str(tmp_path), "--moe_layers"]
    assert main([*argv, "last:1"]) == 0
    weights = load_file(tmp_path / "model.safetensors")
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(weights["lm_head.weight"], weights["shared.weight"])


def test_checkpoints_saved_before_the_fix_still_load_tied(tmp_path):
    """MixT5 once saved every model tied (config `tie_word_embeddings: true`, no `lm_head.weight`): still loadable."""
    path = tmp_path / "dense"
    state = write_published_checkpoint(path, "t5-v1_1-base", "safetensors")
    assert main(["upcycle", "--model_name_or_path", str(path), "--output_dir", str(tmp_path / "moe"), *MOE_FLAGS]) == 0
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    config["tie_word_embeddings"] = True  # as written before the fix; scale_decoder_outputs stayed false
    (tmp_path / "moe" / "config.json").write_text(json.dumps(config))
    weights = load_file(tmp_path / "moe" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "moe" / "model.safetensors", metadata={"format": "pt"})

    old = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe").eval()
    assert old.lm_head.weight is old.shared.weight and not old.config.scale_decoder_outputs
    with torch.no_grad():
        out = old(**_inputs(), output_hidden_states=True)
    _assert_logits(out.logits, out.decoder_hidden_states[-1] @ state["shared.weight"].T)


@pytest.mark.parametrize("storage", ["bin", "safetensors"])
def test_convert_seed_keeps_the_forks_lm_head(tmp_path, storage):
    """A study-fork checkpoint of a v1.1 model (`tie_word_embeddings: false`, its own lm_head) converts exactly."""
    from test_seed_format import FIRST_MOE, NUM_EXPERTS, TOP_K, _fork_model

    fork = _fork_model()
    torch.manual_seed(11)
    fork.lm_head = torch.nn.Linear(fork.config.d_model, fork.config.vocab_size, bias=False)  # apart from `shared`
    assert not fork.config.scale_decoder_outputs  # as transformers 4's T5 with tie_word_embeddings: false
    inputs = _inputs()
    with torch.no_grad():
        expected = fork(**inputs).logits
    src = tmp_path / "fork"
    src.mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in fork.state_dict().items()}
    if storage == "bin":
        torch.save(state, src / "pytorch_model.bin")
    else:
        save_file({k: v for k, v in state.items() if "embed_tokens" not in k}, src / "model.safetensors")
    config = {k: v for k, v in fork.config.to_dict().items() if k != "scale_decoder_outputs"}
    config.update(tie_word_embeddings=False, activate_moe=True, num_local_experts=NUM_EXPERTS,
                  num_experts_per_tok=TOP_K, num_moe_layers=FIRST_MOE)  # fmt: skip
    (src / "config.json").write_text(json.dumps(config))
    generation = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "num_beams": 3, "max_length": 17}
    (src / "generation_config.json").write_text(json.dumps(generation))

    assert main(["convert-seed", str(src), str(tmp_path / "converted")]) == 0
    converted = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "converted").eval()
    assert (converted.generation_config.num_beams, converted.generation_config.max_length) == (3, 17)
    assert not converted.config.tie_word_embeddings and not converted.config.scale_decoder_outputs
    assert torch.equal(converted.lm_head.weight, state["lm_head.weight"])
    with torch.no_grad():
        _assert_logits(converted(**inputs).logits, expected)

    del state["lm_head.weight"]
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin hold\(s\) no lm_head\.weight"):
        load_seed_checkpoint(src)
    assert main(["convert-seed", str(src), str(tmp_path / "again")]) == 2
    assert not (tmp_path / "again").exists()


def _qa_checkpoint(path, name):
    """A family fixture whose vocabulary is a word tokenizer over the shipped SQuAD sample (saved beside it)."""
    from mixt5.data.squad import load_squad_json
    from tiny import SAMPLE_SQUAD, word_tokenizer

    examples = load_squad_json(SAMPLE_SQUAD)
    tokenizer = word_tokenizer(
        [f"{e.question} {e.context}" for e in examples] + [a for e in examples for a in e.answers]
    )
    state = write_published_checkpoint(path, name, "bin", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    return state


@pytest.mark.parametrize(("name", "enable_moe"), [("t5-v1_1-base", True), ("t5-v1_1-base", False), ("t5-small", True)])
def test_training_step_trains_a_separate_lm_head(tmp_path, name, enable_moe):
    """`mixt5 train` (the study's `seed` prompt format adds 3 special tokens): one step, then the saved model."""
    from tiny import SAMPLE_SQUAD

    before = _qa_checkpoint(tmp_path / "dense", name)
    out = tmp_path / "run"
    argv = ["train", "--model_name_or_path", str(tmp_path / "dense"), "--output_dir", str(out),
            "--train_file", str(SAMPLE_SQUAD), "--max_train_samples", "4", "--per_device_train_batch_size", "4",
            "--max_steps", "1", "--learning_rate", "1e-2", "--save_strategy", "no", "--prompt_format", "seed",
            "--max_sequence_length", "48", "--use_cpu", "--report_to", "none"]  # fmt: skip
    if enable_moe:
        argv += ["--enable_moe", *MOE_FLAGS]
    assert main(argv) == 0
    fam = family(name)
    after = load_file(out / "model.safetensors")
    vocab = before["shared.weight"].shape[0]
    assert after["shared.weight"].shape[0] == vocab + 3  # resized for [squad] [question] [context]
    assert not torch.equal(after["shared.weight"][:vocab], before["shared.weight"])
    config = json.loads((out / "config.json").read_text())
    model = load_pretrained(AutoModelForSeq2SeqLM, out)
    if enable_moe:  # the card: how the model was made, then what training measured
        card = (out / "README.md").read_text()
        assert card.count(f"mixt5 train --model_name_or_path {tmp_path / 'dense'}") == 2
        assert "## Training results" in card and "| train | `train_loss` |" in card
    if fam.tied:
        assert "lm_head.weight" not in after and model.lm_head.weight is model.shared.weight
        return
    assert config["tie_word_embeddings"] is False
    assert after["lm_head.weight"].shape == after["shared.weight"].shape  # resized with the embeddings
    head_step = after["lm_head.weight"][:vocab] - before["lm_head.weight"]
    shared_step = after["shared.weight"][:vocab] - before["shared.weight"]
    assert head_step.abs().max() > 0 and shared_step.abs().max() > 0
    assert not torch.allclose(head_step, shared_step)  # two parameters, two updates
    assert model.lm_head.weight is not model.shared.weight
    assert torch.equal(model.lm_head.weight, after["lm_head.weight"])
    from mixt5.predict import QAPredictor  # `mixt5 predict` and `mixt5 serve` load through it

    predictor = QAPredictor(str(out), prompt_format="seed", device="cpu")
    assert predictor.model.lm_head.weight is not predictor.model.shared.weight
    assert torch.equal(predictor.model.lm_head.weight, after["lm_head.weight"])


# ---------------------------------------------------------------------------------------------------------------
# What else a published checkpoint carries goes through `mixt5 upcycle` untouched; the model card


@pytest.fixture(params=["word-level", "t5-sentencepiece"])
def tokenizer_files(request, tmp_path):
    """Tokenizer files as a checkpoint holds them: T5's own (spiece.model + tokenizer.json, from ../shared) or a
    tokenizers-only word-level one (offline, always there)."""
    folder = tmp_path / "tokenizer"
    if request.param == "t5-sentencepiece":
        shared = request.getfixturevalue("shared_dir") / "data" / "t5-tokenizer"
        folder.mkdir()
        for file in shared.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
    else:
        from tiny import word_tokenizer

        word_tokenizer(["a b c d"]).save_pretrained(folder)
    return folder


def test_generation_config_tokenizer_and_task_params_go_through(tmp_path, tokenizer_files):
    src, out = tmp_path / "flan", tmp_path / "moe"
    write_published_checkpoint(src, "flan-t5-base", "sharded")
    generation = json.loads((src / "generation_config.json").read_text())
    generation.update(num_beams=4, max_length=20, no_repeat_ngram_size=3)  # a user's own defaults
    (src / "generation_config.json").write_text(json.dumps(generation))
    for file in tokenizer_files.iterdir():
        (src / file.name).write_bytes(file.read_bytes())
    assert main(["upcycle", "--model_name_or_path", str(src), "--output_dir", str(out), *MOE_FLAGS]) == 0

    def _generation(folder):
        values = GenerationConfig.from_pretrained(folder).to_diff_dict()
        values.pop("transformers_version", None)
        return values

    assert _generation(out) == _generation(src) and _generation(out)["num_beams"] == 4
    assert AutoModelForSeq2SeqLM.from_pretrained(out).generation_config.no_repeat_ngram_size == 3
    config = json.loads((out / "config.json").read_text())
    assert config["task_specific_params"] == json.loads((src / "config.json").read_text())["task_specific_params"]
    for file in tokenizer_files.iterdir():
        assert (out / file.name).read_bytes() == file.read_bytes(), file.name


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stored_dtype_loads_as_asked_and_the_router_routes_in_fp32(tmp_path, stored):
    src, out = tmp_path / "dense", tmp_path / "moe"
    write_published_checkpoint(src, "t5-v1_1-base", "safetensors", dtype=stored)
    assert main(["upcycle", "--model_name_or_path", str(src), "--output_dir", str(out), *MOE_FLAGS]) == 0
    weights = load_file(out / "model.safetensors")
    assert weights["lm_head.weight"].dtype == weights["encoder.block.0.layer.1.experts.gate_up_proj"].dtype == stored
    assert json.loads((out / "config.json").read_text())["dtype"] == str(stored).removeprefix("torch.")

    as_stored = AutoModelForSeq2SeqLM.from_pretrained(out, dtype="auto")
    assert as_stored.lm_head.weight.dtype == as_stored.shared.weight.dtype == stored
    layer = as_stored.encoder.block[0].layer[-1]
    assert layer.router.weight.dtype == (torch.float32 if stored == torch.float16 else stored)  # as T5's `wo`
    with torch.no_grad():
        routed = as_stored(**_inputs(), output_router_logits=True)
    assert all(logits.dtype == torch.float32 for logits in routed.encoder_router_logits + routed.decoder_router_logits)

    # asked for fp32: every weight upcast exactly, and the dense function of the stored weights
    dense, expected = _expected(src, "t5-v1_1-base", load_file(src / "model.safetensors"))
    model = AutoModelForSeq2SeqLM.from_pretrained(out, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _check_moe(model, dense, expected, "t5-v1_1-base")


def test_model_card(tmp_path):
    from huggingface_hub import ModelCard

    src = tmp_path / "dense"
    write_published_checkpoint(src, "flan-t5-base", "safetensors")
    dense = AutoModelForSeq2SeqLM.from_pretrained(src)
    moe = MoEConfig(num_experts=4, top_k=1, moe_layers="last:2", expert_init="noisytune", noise_lambda=0.2, seed=3)
    upcycle(dense, moe, base_model="google/flan-t5-base").save_pretrained(tmp_path / "moe")
    card = ModelCard.load(tmp_path / "moe" / "README.md")
    assert card.data.base_model == "google/flan-t5-base" and card.data.library_name == "transformers"
    assert card.data.tags[0] == "moe" and card.data.pipeline_tag == "text2text-generation"
    for text in ("encoder blocks: 1, 2 (of 3)", "decoder blocks: 0, 1 (of 2)", "`noisytune` (noise_lambda=0.2)",
                 "seed: `3`", "top-1 of 4", "a separate `lm_head`", "| `router_aux_loss_coef` | `0.01` |"):  # fmt: skip
        assert text in card.text, text

    # `mixt5 upcycle` records its command; a local base model is no Hub id, so it stays out of the metadata
    argv = ["upcycle", "--model_name_or_path", str(src), "--output_dir", str(tmp_path / "cli"), *MOE_FLAGS]
    assert main(argv) == 0
    card = ModelCard.load(tmp_path / "cli" / "README.md")
    assert card.data.base_model is None and f"mixt5 upcycle --model_name_or_path {src}" in card.text
    encoder_argv = [*argv[:4], str(tmp_path / "enc"), "--encoder_only", *MOE_FLAGS]
    assert main(encoder_argv) == 0
    card = ModelCard.load(tmp_path / "enc" / "README.md")
    assert card.data.pipeline_tag == "feature-extraction" and "decoder blocks" not in card.text


@pytest.mark.slow
def test_resume_and_best_checkpoint_keep_the_separate_lm_head(tmp_path):
    """Trainer's own reloads (`--resume_from_checkpoint`, `--load_best_model_at_end`) restore `lm_head` as saved."""
    import shutil

    from tiny import SAMPLE_SQUAD

    _qa_checkpoint(tmp_path / "dense", "t5-v1_1-base")

    def train(out, *extra):
        argv = ["train", "--model_name_or_path", str(tmp_path / "dense"), "--output_dir", str(out),
                "--train_file", str(SAMPLE_SQUAD), "--max_train_samples", "8", "--per_device_train_batch_size", "4",
                "--learning_rate", "1e-2", "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "3",
                "--max_sequence_length", "48", "--use_cpu", "--report_to", "none", "--seed", "5", "--enable_moe",
                *MOE_FLAGS, *extra]  # fmt: skip
        assert main(argv) == 0
        return load_file(out / "model.safetensors")

    straight = train(tmp_path / "straight")
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed = train(tmp_path / "resumed", "--resume_from_checkpoint", "last")
    assert not torch.equal(straight["lm_head.weight"], straight["shared.weight"])
    for name in ("lm_head.weight", "shared.weight"):
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-6)

    # the worst checkpoint by eval loss, so that the reload has to bring back an earlier lm_head
    best = train(tmp_path / "best", "--validation_file", str(SAMPLE_SQUAD), "--max_eval_samples", "4",
                 "--eval_strategy", "steps", "--eval_steps", "1", "--load_best_model_at_end", "true",
                 "--metric_for_best_model", "eval_loss", "--greater_is_better", "true")  # fmt: skip
    state = json.loads((tmp_path / "best" / "checkpoint-3" / "trainer_state.json").read_text())
    chosen = load_file(Path(state["best_model_checkpoint"]) / "model.safetensors")
    last = load_file(tmp_path / "best" / "checkpoint-3" / "model.safetensors")
    assert not torch.equal(chosen["lm_head.weight"], last["lm_head.weight"])  # the reload is visible
    for name in ("lm_head.weight", "shared.weight"):
        assert torch.equal(best[name], chosen[name]), name


# FSDP2 (accelerate's preparation with examples/fsdp/fsdp.json, as MixT5Trainer gets it on GPUs) against DDP, on 2 CPU
# processes: an untied model keeps lm_head and shared apart through the wrapping, a `tie_weights()` and 3 SGD steps.
UNTIED_FSDP_WORKER = """
import copy, json, sys, types
from pathlib import Path
import torch, torch.distributed as dist
from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForSeq2SeqLM
from mixt5 import MoEConfig, upcycle
from mixt5.train import parse_train_args
from mixt5.trainer import share_t5_embedding_modules
from published import write_published_checkpoint
from tiny import batch

out = Path(sys.argv[1])
args = parse_train_args(["--model_name_or_path", "m", "--output_dir", str(out), "--use_cpu", "--fsdp",
                         "--fsdp_config", "examples/fsdp/fsdp.json", "--ddp_timeout", "60"])[3]
rank = args.process_index
if rank == 0:
    write_published_checkpoint(out / "dense", "t5-v1_1-base", "safetensors")
dist.barrier()
dense = AutoModelForSeq2SeqLM.from_pretrained(out / "dense", dropout_rate=0.0)
initial = upcycle(dense, MoEConfig(num_experts=4, top_k=2, moe_layers="all")).train()
inputs = {k: v % 64 if k == "input_ids" else v for k, v in batch(seed=rank, batch_size=2).items()}
inputs["labels"] = inputs["labels"].where(inputs["labels"] < 0, inputs["labels"] % 64)

def train(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

ddp_model = copy.deepcopy(initial)
train(DistributedDataParallel(ddp_model))
ddp_state = ddp_model.state_dict()
plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision="no",
                                    is_main_process=rank == 0, device=torch.device("cpu"))
fsdp_model = copy.deepcopy(initial)
share_t5_embedding_modules(fsdp_model)
fsdp_model = fsdp2_prepare_model(accelerator, fsdp_model)
fsdp_model.tie_weights()  # as accelerate does with cpu_ram_efficient_loading, and resizing the embeddings
train(fsdp_model)
full = {name: tensor.full_tensor() for name, tensor in fsdp_model.state_dict().items()}
if rank == 0:
    print("RESULT " + json.dumps({
        "separate": fsdp_model.lm_head.weight is not fsdp_model.shared.weight,
        "head_vs_shared": (full["lm_head.weight"] - full["shared.weight"]).abs().max().item(),
        "head_moved": (full["lm_head.weight"] - initial.state_dict()["lm_head.weight"]).abs().max().item(),
        "fsdp_vs_ddp": max((full[n] - t).abs().max().item() for n, t in ddp_state.items()),
    }))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_keeps_an_untied_lm_head(tmp_path):
    import os
    import subprocess
    import sys

    from test_distributed import REPO, _free_port

    (tmp_path / "worker.py").write_text(UNTIED_FSDP_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
            str(tmp_path / "worker.py"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["separate"] and result["head_vs_shared"] > 0.1 and result["head_moved"] > 0
    assert result["fsdp_vs_ddp"] < 1e-5, result


def test_trainer_push_keeps_the_mixt5_card(tmp_path):
    """`Trainer.push_to_hub` writes its card first (`create_model_card`): a MixT5 model keeps its own and results."""
    from huggingface_hub import ModelCard
    from transformers import Seq2SeqTrainingArguments

    from mixt5.model_card import add_training_results
    from mixt5.trainer import MixT5Trainer

    write_published_checkpoint(tmp_path / "dense", "t5-v1_1-base", "safetensors")
    model = upcycle(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "dense"), MOE, base_model="google/t5-v1_1-base")
    out = tmp_path / "run"
    model.save_pretrained(out)
    add_training_results(out, {"eval": {"eval_f1": 12.5}})
    args = Seq2SeqTrainingArguments(output_dir=str(out), use_cpu=True, report_to=[])
    MixT5Trainer(model=model, args=args).create_model_card(model_name="run")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "google/t5-v1_1-base" and "moe" in card.data.tags
    assert "| eval | `eval_f1` | 12.5000 |" in card.text and "Sparse blocks" in card.text
