"""`MixT5Config`: the typed, cached `moe_config` accessor, and config.json files written before it existed."""

from __future__ import annotations

import json

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from mixt5 import MixT5Config, MoEConfig, upcycle
from mixt5.modeling import MixT5ForConditionalGeneration
from tiny import batch, tiny_dense

# The `moe` block of a config.json as MixT5 0.1.0 wrote it (a plain JSON object, keys sorted), for the tiny model.
SAVED_MOE = {
    "capacity_factor": 1.5, "decoder_router_type": "topk", "drop_ratio": 0.5, "expert_init": "copy",
    "moe_layers": "last:2", "noise_lambda": 0.1, "noise_std": 0.01, "norm_topk_prob": True, "num_experts": 4,
    "output_router_logits": False, "router_aux_loss_coef": 0.01, "router_init": "linear_default",
    "router_init_std": 0.02, "router_jitter_noise": 0.0, "router_type": "noisy_topk", "router_z_loss_coef": 0.001,
    "seed": 0, "top_k": 1,
}  # fmt: skip
SAVED_LAYERS = {"decoder": [1, 2], "encoder": [2, 3]}


def test_a_checkpoint_saved_before_the_typed_accessor_loads_and_saves_the_same(tmp_path):
    moe = MoEConfig(**{**SAVED_MOE, "moe_layers": "last:2"})
    model = upcycle(tiny_dense(), moe).eval()
    model.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    saved = json.loads(config_file.read_text())
    saved.update(moe=SAVED_MOE, moe_layer_indices=SAVED_LAYERS, transformers_version="5.24.0")
    config_file.write_text(json.dumps(saved, indent=2, sort_keys=True))

    config = AutoConfig.from_pretrained(tmp_path / "old")
    assert isinstance(config, MixT5Config) and config.moe == SAVED_MOE
    assert config.moe_config == MoEConfig.from_dict(SAVED_MOE)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "old").eval()
    assert isinstance(loaded, MixT5ForConditionalGeneration)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, model(**batch()).logits)
    loaded.save_pretrained(tmp_path / "again")  # after `moe_config` was read: the cache stays out of config.json
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["moe"] == SAVED_MOE and again["moe_layer_indices"] == SAVED_LAYERS
    assert set(again) == set(saved)


def test_moe_config_is_validated_once_and_follows_changes(monkeypatch):
    config = MixT5Config(moe=SAVED_MOE, num_layers=4, num_decoder_layers=3)
    built = []
    original = MoEConfig.from_dict.__func__
    monkeypatch.setattr(
        MoEConfig, "from_dict", classmethod(lambda cls, values: built.append(1) or original(cls, values))
    )
    first = config.moe_config
    assert config.moe_config is first and config.num_experts == 4 and built == [1]
    config.moe["top_k"] = 2  # a change to the dict is seen, not a stale copy
    assert config.moe_config.top_k == 2 and len(built) == 2
    other = MixT5Config(moe={**SAVED_MOE, "top_k": 2}, num_layers=4, num_decoder_layers=3)
    assert other == config  # the cache takes no part in equality
