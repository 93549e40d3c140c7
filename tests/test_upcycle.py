"""upcycle(): function preservation, expert initialisations, bad input, save/load round trip, generation."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoModelForTextEncoding, GPT2Config, GPT2Model

from mixt5 import MixT5Config, MixT5EncoderModel, MixT5ForConditionalGeneration, MoEConfig, upcycle
from mixt5.modeling import MixT5LayerSparseFF
from tiny import VARIANTS, batch, tiny_config, tiny_dense, tiny_encoder


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _state_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("num_experts", "top_k", "moe_layers", "router_type"),
    [
        (8, 2, "last:2", "topk"),
        (1, 1, "all", "topk"),
        (3, 3, "every:2", "topk"),
        (4, 1, '{"encoder": [0, 3], "decoder": [1]}', "noisy_topk"),
        (5, 4, "first:1", "topk"),
    ],
)
def test_copy_init_preserves_function_float32(variant, num_experts, top_k, moe_layers, router_type):
    dense = tiny_dense(variant)
    inputs = batch()
    reference = _logits(dense, inputs)
    moe = MoEConfig(num_experts=num_experts, top_k=top_k, moe_layers=moe_layers, router_type=router_type)
    model = upcycle(dense, moe).eval()
    assert any(True for _ in model.sparse_layers())
    logits = _logits(model, inputs)
    scale = reference.abs().max()
    assert (logits - reference).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("router_jitter_noise", [0.0, 0.1])  # jitter is a training-time option
def test_copy_init_preserves_function_float64(variant, router_jitter_noise):
    dense = tiny_dense(variant, dtype=torch.float64)
    inputs = batch(seed=1)
    reference = _logits(dense, inputs)
    moe = MoEConfig(num_experts=6, top_k=2, moe_layers="all", router_jitter_noise=router_jitter_noise)
    model = upcycle(dense, moe).eval()
    routers = [layer.router for _, _, layer in model.sparse_layers()]
    assert all(r.weight.dtype == torch.float64 for r in routers)
    assert (_logits(model, inputs) - reference).abs().max() <= 1e-9 * reference.abs().max()


def test_encoder_model_preserves_function():
    dense = tiny_encoder()
    inputs = batch()
    with torch.no_grad():
        reference = dense(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    model = upcycle(dense, MoEConfig(num_experts=4, top_k=2, moe_layers="last:2"))
    assert isinstance(model, MixT5EncoderModel)
    with torch.no_grad():
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert (out.last_hidden_state - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert out.aux_loss is not None and out.router_z_loss is not None


def test_generate_with_cache_matches_dense():
    dense = tiny_dense()
    inputs = batch(seed=3)
    expected = dense.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8, do_sample=False
    )
    model = upcycle(copy.deepcopy(dense), MoEConfig(num_experts=4, top_k=2, moe_layers="all")).eval()
    got = model.generate(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=8, do_sample=False
    )
    assert torch.equal(got, expected)


def test_layout_and_provenance():
    dense = tiny_dense()
    d_ff, d_model = dense.config.d_ff, dense.config.d_model
    wi_0 = dense.encoder.block[3].layer[-1].DenseReluDense.wi_0.weight.detach().clone()
    wi_1 = dense.encoder.block[3].layer[-1].DenseReluDense.wi_1.weight.detach().clone()
    wo = dense.encoder.block[3].layer[-1].DenseReluDense.wo.weight.detach().clone()
    model = upcycle(dense, MoEConfig(num_experts=3, moe_layers="last:2", seed=7), base_model="org/dense")
    state = model.state_dict()
    prefix = "encoder.block.3.layer.1"
    assert state[f"{prefix}.router.weight"].shape == (3, d_model)
    assert state[f"{prefix}.experts.gate_up_proj"].shape == (3, 2 * d_ff, d_model)
    assert state[f"{prefix}.experts.down_proj"].shape == (3, d_model, d_ff)
    assert torch.equal(state[f"{prefix}.experts.gate_up_proj"][2, :d_ff], wi_0)
    assert torch.equal(state[f"{prefix}.experts.gate_up_proj"][2, d_ff:], wi_1)
    assert torch.equal(state[f"{prefix}.experts.down_proj"][1], wo)
    assert f"{prefix}.layer_norm.weight" in state
    assert "decoder.block.2.layer.2.router.weight" in state  # the FF stays the last entry of block.layer
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in state  # dense blocks untouched
    assert model.config.model_type == "mixt5"
    assert model.config.moe_layer_indices == {"encoder": [2, 3], "decoder": [1, 2]}
    assert model.config.upcycled_from == {
        "base_model": "org/dense",
        "base_model_type": "t5",
        "base_architecture": "T5ForConditionalGeneration",
        "method": "copy",
        "seed": 7,
    }


def test_relu_layout_uses_up_proj():
    model = upcycle(tiny_dense("t5-v1.0-relu"), MoEConfig(num_experts=2, top_k=1, moe_layers="last:1"))
    state = model.state_dict()
    assert state["encoder.block.3.layer.1.experts.up_proj"].shape == (2, 64, 32)
    assert "encoder.block.3.layer.1.experts.gate_up_proj" not in state


def test_router_default_init_is_nn_linear_default():
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:1", seed=3))
    weight = model.encoder.block[3].layer[-1].router.weight
    bound = 1.0 / model.config.d_model**0.5  # kaiming_uniform(a=sqrt(5)) of nn.Linear: U(-1/sqrt(fan_in), ...)
    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.8 * bound
    again = upcycle(tiny_dense(), MoEConfig(num_experts=4, moe_layers="last:1", seed=3))
    assert torch.equal(weight, again.encoder.block[3].layer[-1].router.weight)


def _experts_of(model, stack="encoder", block=3):
    return model.get_submodule(f"{stack}.block.{block}.layer.{len(getattr(model, stack).block[block].layer) - 1}")


def _dense_ff(variant="t5-v1.1-gated-gelu", **overrides):
    dense = tiny_dense(variant, d_model=64, d_ff=256, **overrides)
    ff = dense.encoder.block[3].layer[-1].DenseReluDense
    return dense, ff.wi_0.weight.detach().clone(), ff.wi_1.weight.detach().clone(), ff.wo.weight.detach().clone()


@pytest.mark.parametrize("noise_lambda", [0.1, 0.3])
def test_noisytune_statistics(noise_lambda):
    dense, wi_0, wi_1, wo = _dense_ff()
    model = upcycle(
        dense, MoEConfig(num_experts=4, expert_init="noisytune", noise_lambda=noise_lambda, seed=1, moe_layers="all")
    )
    experts = _experts_of(model).experts
    d_ff = wi_0.shape[0]
    for e in range(4):
        for original, noisy in (
            (wi_0, experts.gate_up_proj[e, :d_ff]),
            (wi_1, experts.gate_up_proj[e, d_ff:]),
            (wo, experts.down_proj[e]),
        ):
            noise = noisy.detach() - original
            bound = noise_lambda / 2 * original.std()
            assert noise.abs().max() <= bound * (1 + 1e-5)
            assert noise.abs().max() >= 0.95 * bound
            expected_std = noise_lambda / 12**0.5 * original.std()
            assert abs(noise.std() / expected_std - 1) < 0.05
            assert abs(noise.mean()) < 0.05 * expected_std * 10
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(experts.gate_up_proj[a], experts.gate_up_proj[b])
            assert not torch.allclose(experts.down_proj[a], experts.down_proj[b])


def test_expert_inits_are_seeded():
    def init(seed, method):
        dense, *_ = _dense_ff()
        return _experts_of(
            upcycle(dense, MoEConfig(num_experts=3, expert_init=method, seed=seed, moe_layers="all"))
        ).experts

    for method in ("noisytune", "drop_upcycling", "gaussian"):
        assert torch.equal(init(5, method).gate_up_proj, init(5, method).gate_up_proj)
        assert not torch.equal(init(5, method).gate_up_proj, init(6, method).gate_up_proj)


@pytest.mark.parametrize("variant", ["t5-v1.1-gated-gelu", "t5-v1.0-relu"])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 1.0])
def test_drop_upcycling_reinitialises_exact_fraction(variant, ratio):
    dense = tiny_dense(variant, d_model=64, d_ff=256)
    ff = dense.encoder.block[3].layer[-1].DenseReluDense
    in_mats = [ff.wi_0.weight.detach().clone(), ff.wi_1.weight.detach().clone()] if hasattr(ff, "wi_0") else None
    in_mats = in_mats or [ff.wi.weight.detach().clone()]
    wo = ff.wo.weight.detach().clone()
    model = upcycle(
        dense, MoEConfig(num_experts=4, expert_init="drop_upcycling", drop_ratio=ratio, seed=2, moe_layers="all")
    )
    experts = _experts_of(model).experts
    up = experts.gate_up_proj if variant != "t5-v1.0-relu" else experts.up_proj
    d_ff = wo.shape[1]
    unit_sets = []
    for e in range(4):
        changed = [
            set((up[e, i * d_ff : (i + 1) * d_ff] != m).any(dim=1).nonzero().flatten().tolist())
            for i, m in enumerate(in_mats)
        ]
        changed_out = set((experts.down_proj[e] != wo).any(dim=0).nonzero().flatten().tolist())
        assert len(changed_out) == round(ratio * d_ff)
        assert all(c == changed_out for c in changed)  # the same units in all three matrices
        unit_sets.append(frozenset(changed_out))
        if changed_out:  # re-initialised values follow N(mean, std) of the original matrix
            units = sorted(changed_out)
            fresh = experts.down_proj[e][:, units].detach()
            assert abs(fresh.std() / wo.std() - 1) < 0.15
    if 0 < ratio < 1:
        assert len(set(unit_sets)) == 4  # a different subset per expert


def test_gaussian_noise_statistics():
    dense, wi_0, _, _ = _dense_ff()
    model = upcycle(dense, MoEConfig(num_experts=2, expert_init="gaussian", noise_std=0.02, moe_layers="all"))
    noise = _experts_of(model).experts.gate_up_proj[0, : wi_0.shape[0]].detach() - wi_0
    assert abs(noise.std() / 0.02 - 1) < 0.05


def test_save_and_auto_load_round_trip(tmp_path):
    model = upcycle(tiny_dense(), MoEConfig(num_experts=4, expert_init="noisytune", moe_layers="last:2")).eval()
    inputs = batch()
    expected = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith(".bin") for name in files)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MixT5ForConditionalGeneration)
    assert isinstance(loaded.config, MixT5Config)
    assert loaded.config.moe_config == model.config.moe_config
    assert loaded.config.upcycled_from["method"] == "noisytune"
    assert torch.equal(_logits(loaded, inputs), expected)


def test_encoder_round_trip(tmp_path):
    model = upcycle(tiny_encoder(), MoEConfig(num_experts=2, moe_layers="last:1"))
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForTextEncoding.from_pretrained(tmp_path), MixT5EncoderModel)


def test_fp16_load_keeps_down_proj_in_fp32(tmp_path):
    upcycle(tiny_dense(), MoEConfig(num_experts=2, moe_layers="last:1")).save_pretrained(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, dtype=torch.float16)
    layer = model.encoder.block[3].layer[-1]
    assert layer.experts.down_proj.dtype == torch.float32
    assert layer.experts.gate_up_proj.dtype == torch.float16


def test_random_init_construction_and_experts_implementation(tmp_path):
    config = MixT5Config(moe={"num_experts": 3, "moe_layers": "last:1"}, **tiny_config().to_dict())
    model = MixT5ForConditionalGeneration(config)
    assert model.config._experts_implementation == "eager"
    assert torch.isfinite(model.encoder.block[3].layer[-1].experts.gate_up_proj).all()
    model.save_pretrained(tmp_path)
    batched = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, experts_implementation="batched_mm").eval()
    eager = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert batched.config._experts_implementation == "batched_mm"
    inputs = batch()
    torch.testing.assert_close(_logits(batched, inputs), _logits(eager, inputs), rtol=1e-4, atol=1e-5)


# ---- bad input: a clear error naming the culprit, and the input model left untouched ----


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_experts": 4, "top_k": 5}, ValueError, "top_k"),
        ({"num_experts": 0}, ValueError, "num_experts"),
        ({"noise_lambda": -0.1}, ValueError, "noise_lambda"),
        ({"drop_ratio": 1.5}, ValueError, "drop_ratio"),
        ({"drop_ratio": -0.1}, ValueError, "drop_ratio"),
        ({"expert_init": "magic"}, ValueError, "expert_init"),
        ({"moe_layers": "middle:3"}, ValueError, "moe_layers"),
        ({"moe_layers": {"encoder": [0], "cross": [1]}}, ValueError, "cross"),
        ({"capacity_factor": 0}, ValueError, "capacity_factor"),
        ({"num_experts": 2.5}, TypeError, "num_experts"),
    ],
)
def test_moe_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        MoEConfig(**kwargs)


@pytest.mark.parametrize(
    ("moe", "match"),
    [
        (MoEConfig(moe_layers="last:99"), "last:99"),
        (MoEConfig(moe_layers="first:5"), "first:5"),
        (MoEConfig(moe_layers={"encoder": [1, 40]}), "40"),
        (MoEConfig(router_type="expert_choice", moe_layers="last:2"), "decoder"),
        (MoEConfig(moe_layers="all", decoder_router_type="expert_choice"), "decoder"),
    ],
)
def test_upcycle_rejects_bad_layers_and_leaves_model_untouched(moe, match):
    dense = tiny_dense()
    before = _state_snapshot(dense)
    with pytest.raises(ValueError, match=match):
        upcycle(dense, moe)
    after = dense.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, MixT5LayerSparseFF) for m in dense.modules())


def test_upcycle_rejects_unsupported_model_by_type():
    gpt2 = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"GPT2Model.*'gpt2'.*not supported.*t5 \(t5.*bert \(bert, roberta"):
        upcycle(gpt2, MoEConfig())
    with pytest.raises(TypeError, match="already"):
        upcycle(upcycle(tiny_dense(), MoEConfig(moe_layers="last:1")), MoEConfig())


def test_expert_choice_allowed_in_encoder_only():
    moe = MoEConfig(
        num_experts=4, top_k=2, router_type="expert_choice", decoder_router_type="topk", moe_layers="last:1"
    )
    model = upcycle(tiny_dense(), moe)
    assert model.encoder.block[3].layer[-1].router.router_type == "expert_choice"
    assert model.decoder.block[2].layer[-1].router.router_type == "topk"
    encoder_only = upcycle(tiny_encoder(), MoEConfig(num_experts=4, router_type="expert_choice", moe_layers="all"))
    inputs = batch()
    out = encoder_only(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.isfinite(out.last_hidden_state).all()
