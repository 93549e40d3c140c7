"""Read checkpoints written by the original study's patched transformers fork ("seed" format).

Their `config.json` says `model_type: "t5"` plus `activate_moe: true`, `num_local_experts`, `num_experts_per_tok`
and `num_moe_layers` (blocks with index >= it are MoE, in the encoder and the decoder). Each MoE FF sub-layer
holds `...layer.{i}.gate.weight` (E, d_model) and `...layer.{i}.experts.{e}.wi_0|wi_1|wo.weight` (or `wi`), and
routes with softmax, top-k, renormalise: our default router.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, T5Config
from transformers.utils import (
    GENERATION_CONFIG_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from ._compat import read_weights_file
from .config import MoEConfig
from .families.t5 import mixt5_config_from_dense
from .modeling.modeling_mixt5 import MixT5ForConditionalGeneration
from .modeling.tying import missing_lm_head_error
from .utils import copy_tokenizer

SEED_CONFIG_KEYS = ("activate_moe", "num_local_experts", "num_experts_per_tok", "num_moe_layers")
_EXPERT_KEY = re.compile(r"^(.*\.layer\.\d+)\.experts\.(\d+)\.(wi_0|wi_1|wi|wo)\.weight$")
_GATE_KEY = re.compile(r"^(.*\.layer\.\d+)\.gate\.weight$")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, found as `from_pretrained` finds them: `model.safetensors`, sharded
    safetensors with their index, or a legacy `pytorch_model.bin` (sharded or not), read with transformers' own
    loader (safetensors, or `torch.load(weights_only=True)` behind its torch-version check)."""
    files: list[Path] = []
    for single, index in ((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), (WEIGHTS_NAME, WEIGHTS_INDEX_NAME)):
        if (path / single).is_file():
            files = [path / single]
        elif (path / index).is_file():
            with open(path / index, encoding="utf-8") as handle:
                files = [path / name for name in sorted(set(json.load(handle)["weight_map"].values()))]
        if files:
            break
    if not files:
        names = ", ".join((SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME))
        raise FileNotFoundError(f"{path} holds none of {names}.")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in the checkpoint's index but missing.")
        state.update(read_weights_file(file))
    return state


def seed_state_dict_to_mixt5(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Rename `gate` to `router` and stack the per-expert `wi_0`/`wi_1`/`wo` into 3-D expert tensors."""
    converted: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for key, tensor in state.items():
        if match := _EXPERT_KEY.match(key):
            prefix, expert, name = match.group(1), int(match.group(2)), match.group(3)
            experts.setdefault(prefix, {}).setdefault(name, {})[expert] = tensor
        elif match := _GATE_KEY.match(key):
            converted[f"{match.group(1)}.router.weight"] = tensor
        else:
            converted[key] = tensor
    for prefix, mats in experts.items():
        for name, per_expert in mats.items():
            if sorted(per_expert) != list(range(num_experts)):
                raise ValueError(
                    f"{prefix}.experts.*.{name}: expected experts 0..{num_experts - 1}, found {sorted(per_expert)}."
                )
        stack = {name: torch.stack([per_expert[e] for e in range(num_experts)]) for name, per_expert in mats.items()}
        if "wi_0" in stack:
            converted[f"{prefix}.experts.gate_up_proj"] = torch.cat([stack["wi_0"], stack["wi_1"]], dim=1)
        else:
            converted[f"{prefix}.experts.up_proj"] = stack["wi"]
        converted[f"{prefix}.experts.down_proj"] = stack["wo"]
    return converted


def load_seed_checkpoint(path: str | Path) -> MixT5ForConditionalGeneration:
    """Load a study-fork checkpoint folder as a `MixT5ForConditionalGeneration` with the same outputs."""
    path = Path(path)
    with open(path / "config.json", encoding="utf-8") as handle:
        raw: dict[str, Any] = json.load(handle)
    missing = [key for key in SEED_CONFIG_KEYS if key not in raw]
    if not raw.get("activate_moe") or missing:
        raise ValueError(
            f"{path / 'config.json'} is not a study-fork MoE config (missing {missing or ['activate_moe']})."
        )
    dense_config = T5Config(**{k: v for k, v in raw.items() if k not in SEED_CONFIG_KEYS})  # rescale iff tied
    first = raw["num_moe_layers"]
    layer_indices = {
        "encoder": list(range(first, dense_config.num_layers)),
        "decoder": list(range(first, dense_config.num_decoder_layers)),
    }
    moe = MoEConfig(
        num_experts=raw["num_local_experts"], top_k=raw["num_experts_per_tok"], moe_layers=json.dumps(layer_indices)
    )
    provenance = {"base_model": str(path), "base_model_type": "t5", "method": "seed-format import", "seed": None}
    state = seed_state_dict_to_mixt5(_load_state_dict(path), moe.num_experts)
    # The fork is transformers 4's T5: `tie_word_embeddings: false` (every v1.1-based checkpoint) means its own
    # lm_head. A head stored with other values than `shared` is separate whatever the flag says, as in transformers.
    tied = raw.get("tie_word_embeddings", True) is not False
    if "lm_head.weight" in state and "shared.weight" in state:
        tied = tied and torch.equal(state["lm_head.weight"], state["shared.weight"])
    elif not tied and "lm_head.weight" not in state:
        raise missing_lm_head_error(path)
    config = mixt5_config_from_dense(dense_config, moe, layer_indices, provenance, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = MixT5ForConditionalGeneration(config)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected}
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        if name not in state and "shared.weight" in state:
            state[name] = state["shared.weight"]
    missing_keys = sorted(set(expected) - set(state))
    if missing_keys:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing_keys)} weights, e.g. {missing_keys[:3]}.")
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    if (path / GENERATION_CONFIG_NAME).is_file():  # the fork's generation defaults, as from_pretrained keeps them
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def convert_seed_checkpoint(src: str | Path, dst: str | Path, command: str | None = None) -> Path:
    """`mixt5 convert-seed SRC DST`: write a study-fork checkpoint as a MixT5 one (safetensors), tokenizer included;
    `command` (the command line that ran this) goes into the model card."""
    model = load_seed_checkpoint(src)
    if command:
        model.config.upcycled_from["command"] = command
    dst = Path(dst)
    model.save_pretrained(dst)
    copy_tokenizer(str(src), dst)
    return dst
