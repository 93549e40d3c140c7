"""T5's output layer per family, and loading checkpoints so that it survives.

t5 v1.0 ties `lm_head` to `shared` and rescales the decoder output by `d_model**-0.5`; t5-v1.1, flan-t5 and mt5
keep a separate `lm_head` (their published `config.json` says `"tie_word_embeddings": false`) and do not rescale.
transformers 5's `T5Config`/`MT5Config` always say `tie_word_embeddings=True`; its `from_pretrained` keeps a separate
head only because the checkpoint holds a different `lm_head.weight`, and any later `tie_weights()` (after resizing the
embeddings, under FSDP2, ...) ties it again. `load_pretrained` records the truth in the loaded config, as accelerate
advises, and refuses a checkpoint whose config says untied but whose weights hold no `lm_head.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

WEIGHTS_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def has_separate_lm_head(model: nn.Module) -> bool:
    """True when `model` has an output layer that is a parameter of its own, not the input embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is not model.get_input_embeddings().weight


def weights_location(source: str | Path) -> str:
    """The weight file(s) of a checkpoint, for error messages: `DIR/model.safetensors`, or the hub id."""
    folder = Path(source)
    if folder.is_dir():
        present = [str(folder / name) for name in WEIGHTS_FILES if (folder / name).is_file()]
        if present:
            return ", ".join(present)
    return f"the weights of {source}"


def missing_lm_head_error(source: str | Path) -> ValueError:
    return ValueError(
        f"{Path(source) / 'config.json'} says tie_word_embeddings: false (a separate lm_head, as t5-v1.1, flan-t5 "
        f"and mt5 have), but {weights_location(source)} hold(s) no lm_head.weight; refusing to tie the output layer "
        "to the input embeddings. Restore the checkpoint's lm_head.weight, or set tie_word_embeddings: true if the "
        "model really is tied."
    )


def stored_tie_word_embeddings(source: str | Path, **hub_kwargs: Any) -> bool:
    """`tie_word_embeddings` as `source`'s `config.json` stores it (True when absent, as transformers defaults)."""
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        with open(config_file, encoding="utf-8") as handle:
            raw = json.load(handle)
    else:
        raw, _ = PretrainedConfig.get_config_dict(str(source), **hub_kwargs)
    return raw.get("tie_word_embeddings", True) is not False


def record_tying(model: PreTrainedModel, source: str | Path, **hub_kwargs: Any) -> PreTrainedModel:
    """Make a loaded model's config say whether its `lm_head` is tied; refuse an untied config without the head.

    A MixT5 model's config already says it (and its `from_pretrained` refused a missing head). For a stock T5/MT5,
    `config.tie_word_embeddings=False` keeps later `tie_weights()` calls from tying a separate head to `shared`
    again; T5's encoder and decoder embeddings stay `shared` (they are one parameter already).
    """
    if model.get_output_embeddings() is None or getattr(model.config, "model_type", None) == "mixt5":
        return model
    if has_separate_lm_head(model):
        model.config.tie_word_embeddings = False
    elif not stored_tie_word_embeddings(source, **hub_kwargs):
        raise missing_lm_head_error(source)
    return model


def load_pretrained(auto_class: Any, source: str | Path, **kwargs: Any) -> PreTrainedModel:
    """`auto_class.from_pretrained(source, **kwargs)`, then `record_tying`: the one way MixT5 loads a checkpoint."""
    hub_kwargs = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    return record_tying(auto_class.from_pretrained(source, **kwargs), source, **hub_kwargs)
