"""The model card (`README.md`) a MixT5 checkpoint carries, in the Hub's format.

Built with huggingface_hub's `ModelCard`/`ModelCardData` (YAML metadata the Hub reads: `base_model`, `library_name`,
`tags`, `pipeline_tag`), then what a reader needs to trust the checkpoint: the MoE settings, the blocks made sparse,
how the experts were initialised, the seed, the output layer, and the command that made it. `mixt5 train` adds a
"Training results" section with its metrics (`add_training_results`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .config import MixT5Config
from .utils import atomic_write

CARD_NAME = "README.md"
TRAINING_HEADING = "## Training results"
_INIT_PARAMETERS = {"noisytune": ("noise_lambda",), "drop_upcycling": ("drop_ratio",), "gaussian": ("noise_std",)}


def _hub_id(name: Any) -> str | None:
    """`name` when it reads as a Hub repository id (not a local path, not `builtin:...`), else None."""
    if not isinstance(name, str) or not name or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _blocks(indices: list[int], total: int) -> str:
    return f"{', '.join(map(str, indices))} (of {total})" if indices else f"none (of {total})"


# MixT5 class name suffix -> (pipeline tag, Auto class); the first that matches wins
_TASKS = (
    ("ForConditionalGeneration", "text2text-generation", "AutoModelForSeq2SeqLM"),
    ("EncoderModel", "feature-extraction", "AutoModelForTextEncoding"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
    ("ForSequenceClassification", "text-classification", "AutoModelForSequenceClassification"),
    ("Model", "feature-extraction", "AutoModel"),
)


def model_card(config: MixT5Config, architecture: str) -> ModelCard:
    """The card of a MixT5 model with `config`, an instance of `architecture` (a MixT5 class name)."""
    provenance = config.upcycled_from or {}
    moe = config.moe_config
    base = provenance.get("base_model")
    base_id = _hub_id(base)
    family = provenance.get("base_model_type") or "t5"
    is_t5 = config.model_type == "mixt5"
    is_encoder = not architecture.endswith("ForConditionalGeneration")
    pipeline_tag, auto_class = next((tag, auto) for suffix, tag, auto in _TASKS if architecture.endswith(suffix))
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        tags=["moe", "mixture-of-experts", "sparse-upcycling", "mixt5", family],
        pipeline_tag=pipeline_tag,
    )
    method = provenance.get("method", moe.expert_init)
    init_parameters = {name: getattr(moe, name) for name in _INIT_PARAMETERS.get(moe.expert_init, ())}
    init_text = ", ".join(f"{k}={v}" for k, v in init_parameters.items()) or "exact copies of the dense block"
    settings = "\n".join(f"| `{name}` | `{value}` |" for name, value in moe.to_dict().items())
    sparse = config.moe_layer_indices
    num_layers = config.num_layers if is_t5 else config.num_hidden_layers
    stacks = [f"- encoder blocks: {_blocks(sparse.get('encoder', []), num_layers)}"]
    if not is_encoder:
        stacks.append(f"- decoder blocks: {_blocks(sparse.get('decoder', []), config.num_decoder_layers)}")
    head = "tied to the input embedding (`shared`)" if config.tie_word_embeddings else "a separate `lm_head`"
    base_text = f"[`{base}`](https://huggingface.co/{base_id})" if base_id else f"`{base or 'a dense T5 model'}`"
    command = provenance.get("command")
    made = f"```bash\n{command}\n```" if command else "With `mixt5.upcycle()` in Python (no command line recorded)."
    body = f"""
# Sparse Mixture-of-Experts {family} upcycled from {base or "a dense model"}

A sparse Mixture-of-Experts model made from the dense {family} model {base_text} with
MixT5 (`pip install mixt5`; "sparse upcycling"): the feed-forward sub-layer of each block listed
below became a router plus {moe.num_experts} experts initialised from its weights; every other weight is the
dense model's.

```python
import mixt5  # registers model_type "{config.model_type}" with transformers' Auto classes
from transformers import {auto_class}

model = {auto_class}.from_pretrained("PATH_OR_REPO_ID")
```

## Sparse blocks

{chr(10).join(stacks)}

## Expert initialisation

- method: `{method}` ({init_text})
- seed: `{provenance.get("seed", moe.seed)}`
- router: `{moe.router_type}`, top-{moe.top_k} of {moe.num_experts}, init `{moe.router_init}`

{_output_layer(config, is_encoder, head) if is_t5 else ""}
## MoE settings

| setting | value |
|---|---|
{settings}

## How it was made

{made}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _output_layer(config: MixT5Config, is_encoder: bool, head: str) -> str:
    return f"""## Output layer

- {"no output layer (encoder only)" if is_encoder else head}
- decoder output scaled by `d_model**-0.5` before it: `{config.scale_decoder_outputs}` (as in the dense model)
"""


def write_model_card(model: Any, save_directory: str | os.PathLike) -> Path:
    """Write `model`'s card to `save_directory/README.md`, keeping a "Training results" section already there."""
    path = Path(save_directory) / CARD_NAME
    card = str(model_card(model.config, type(model).__name__))
    if path.is_file():
        old = path.read_text(encoding="utf-8")
        if TRAINING_HEADING in old:
            card = card.rstrip() + "\n\n" + old[old.index(TRAINING_HEADING) :]
    with atomic_write(path) as handle:
        handle.write(card)
    return path


def _format(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def add_training_results(
    save_directory: str | os.PathLike, metrics: dict[str, dict[str, Any]], command: str | None = None
) -> Path | None:
    """Add (or replace) the "Training results" section of the card in `save_directory`; None when it has no card."""
    path = Path(save_directory) / CARD_NAME
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    rows = [
        f"| {split} | `{name}` | {_format(value)} |"
        for split, values in metrics.items()
        for name, value in sorted(values.items())
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    section = f"{TRAINING_HEADING}\n\n| split | metric | value |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    if command:
        section += f"\nTrained with:\n\n```bash\n{command}\n```\n"
    text = re.split(re.escape(TRAINING_HEADING), card.text, maxsplit=1)[0].rstrip()
    card.text = f"{text}\n\n{section}"
    with atomic_write(path) as handle:
        handle.write(str(card))
    return path
