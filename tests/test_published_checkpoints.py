"""Checkpoints stored as the published t5 / t5-v1.1 / flan-t5 / mt5 ones are upcycle to the dense model's function.

Each fixture (`published.py`) is a folder written by hand with the family's published `config.json` keys and its
weights as `pytorch_model.bin`, `model.safetensors` or safetensors shards. The expected logits are computed here
from the stored tensors: the stock dense model's last decoder hidden state times the stored output matrix
(`lm_head.weight`, or `shared.weight` for t5 v1.0), rescaled by `d_model**-0.5` for v1.0 only.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSeq2SeqLM, AutoModelForTextEncoding

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

    assert main(["convert-seed", str(src), str(tmp_path / "converted")]) == 0
    converted = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "converted").eval()
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
