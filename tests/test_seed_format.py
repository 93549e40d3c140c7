"""Checkpoints of the study's fork load into MixT5 with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForSeq2SeqLM
from transformers.models.t5.modeling_t5 import T5DenseGatedActDense, T5LayerNorm

from mixt5 import MixT5ForConditionalGeneration
from mixt5.cli import main
from mixt5.seed_format import load_seed_checkpoint
from tiny import batch, tiny_dense

NUM_EXPERTS, TOP_K, FIRST_MOE = 4, 2, 2


class ForkSparseFF(nn.Module):
    """The study fork's MoE FF sub-layer, as its README documents it: a `gate` and a ModuleList of experts."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.d_model, NUM_EXPERTS, bias=False)
        self.experts = nn.ModuleList(T5DenseGatedActDense(config) for _ in range(NUM_EXPERTS))
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states):
        normed = self.layer_norm(hidden_states)
        probs = self.gate(normed).softmax(-1)  # softmax, then top-k, then renormalise
        weights, chosen = probs.topk(TOP_K, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(normed)
        for e, expert in enumerate(self.experts):
            weight_e = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + weight_e * expert(normed)
        return hidden_states + self.dropout(out)


def _fork_model():
    model = tiny_dense(seed=4)
    torch.manual_seed(5)
    for stack in (model.encoder, model.decoder):
        for index in range(FIRST_MOE, len(stack.block)):
            layer = ForkSparseFF(model.config)
            for param in layer.parameters():
                nn.init.normal_(param, std=0.3)
            stack.block[index].layer[-1] = layer
    return model.eval()


def _write_fork_checkpoint(model, path):
    path.mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for tied in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        state.pop(tied)  # written once, as `shared.weight`, as transformers does
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.update(activate_moe=True, num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, num_moe_layers=FIRST_MOE)
    (path / "config.json").write_text(json.dumps(config))
    return state


def test_fork_checkpoint_loads_with_identical_outputs(tmp_path):
    fork = _fork_model()
    state = _write_fork_checkpoint(fork, tmp_path / "fork")
    assert "encoder.block.3.layer.1.gate.weight" in state
    assert "decoder.block.2.layer.2.experts.3.wi_1.weight" in state
    inputs = batch()
    with torch.no_grad():
        expected = fork(**inputs).logits
    model = load_seed_checkpoint(tmp_path / "fork")
    assert model.config.moe_layer_indices == {"encoder": [2, 3], "decoder": [2]}
    with torch.no_grad():
        got = model(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    assert main(["convert-seed", str(tmp_path / "fork"), str(tmp_path / "converted")]) == 0
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "converted").eval()
    assert isinstance(loaded, MixT5ForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, got)
    card = (tmp_path / "converted" / "README.md").read_text()  # how the checkpoint was made, as typed
    assert f"mixt5 convert-seed {tmp_path / 'fork'} {tmp_path / 'converted'}" in card


def test_not_a_fork_checkpoint_is_refused(tmp_path):
    tiny_dense().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="activate_moe"):
        load_seed_checkpoint(tmp_path)


def test_missing_expert_is_named(tmp_path):
    fork = _fork_model()
    _write_fork_checkpoint(fork, tmp_path / "fork")
    config = json.loads((tmp_path / "fork" / "config.json").read_text())
    config["num_local_experts"] = NUM_EXPERTS + 1
    (tmp_path / "fork" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"experts\.\*\.wi_0: expected experts 0\.\.4"):
        load_seed_checkpoint(tmp_path / "fork")
