"""Load checkpoints and tokenizers so that a bad path or file is one line naming it, not a transformers traceback.

`from_pretrained` stays the loader; this module only checks the path first and turns what it raises for a
missing folder, a damaged weights file, an invalid `config.json`, weights whose shapes disagree with the config
and a folder without a tokenizer into `FileNotFoundError` / `ValueError` naming the flag and the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .utils import TOKENIZER_FILES

_TOKENIZER_EXAMPLE = "google/t5-v1_1-base"


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def check_sequence_length(config: Any, length: int, flag: str = "--max_sequence_length") -> None:
    """Refuse windows longer than a model's learned position table, before the forward pass fails on an index.

    BERT and ELECTRA take `max_position_embeddings` tokens; RoBERTa and XLM-R number positions from
    `pad_token_id + 1`, so they take that many fewer; models with relative positions (T5) have no such limit.
    """
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    if "roberta" in config.model_type:  # roberta, xlm-roberta and their MixT5 classes
        positions -= config.pad_token_id + 1
    if length > positions:
        raise ValueError(
            f"{flag} {length}: this {config.model_type} model takes at most {positions} tokens per window "
            f"(max_position_embeddings {config.max_position_embeddings}); give {flag} {positions} or less"
        )


def check_model_path(name: str, flag: str = "--model_name_or_path") -> None:
    """Refuse a `name` that is neither an existing local folder nor shaped like a hub id, before transformers
    reports it as a malformed repo id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"{flag} {name}: is a file; give the checkpoint's folder (with config.json).")
        return
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise FileNotFoundError(f"{flag} {name}: no such folder (and not a hub id like `org/name`).") from err


@contextlib.contextmanager
def _held_load_report(logger: logging.Logger) -> Iterator[list[logging.LogRecord]]:
    """Hold back what `logger` logs inside the block; replay it if the block succeeds, drop it if it raises.

    transformers logs a many-line LOAD REPORT before raising on mismatched shapes; the error we raise says it in one.
    """
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    handler, propagate = Hold(), logger.propagate
    handler.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield held
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
    for record in held:
        logger.handle(record)


def _bad_weights_file(folder: Path) -> Path | None:
    """The first `*.safetensors` file in `folder` that safetensors cannot open (a bad header or a short file)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError):
            return path
    return None


def _shape_mismatch(auto_class: Any, name: str) -> str:
    """`key: shape in file vs shape per config.json` for the first weight whose shapes disagree, else ''."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    with torch.device("meta"):
        expected = auto_class.from_config(config).state_dict()
    for path in sorted(Path(name).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                shape = list(f.get_slice(key).get_shape())
                if key in expected and list(expected[key].shape) != shape:
                    return f"{key} is {shape} in {path.name} but {list(expected[key].shape)} per config.json"
    return ""


def from_pretrained(auto_class: Any, name: str, *, flag: str = "--model_name_or_path", **kwargs: Any) -> Any:
    """`load_pretrained(auto_class, name, **kwargs)` (MixT5's one way to load a checkpoint), with its failures as one
    line naming `flag` and the file.

    Raises:
        FileNotFoundError: `name` is no local folder and not a hub id.
        ValueError: a weights file that cannot be read, an invalid config.json, weights whose shapes differ from the
            config, a MixT5 config naming blocks the model does not have, or the hub cannot provide `name`.
    """
    from .modeling.tying import load_pretrained

    with _load_errors(auto_class, name, flag):
        return load_pretrained(auto_class, name, **kwargs)


def load_config(name: str, *, flag: str = "--model_name_or_path") -> Any:
    """`AutoConfig.from_pretrained(name)`, with the errors of `from_pretrained`."""
    from transformers import AutoConfig

    with _load_errors(AutoConfig, name, flag):
        return AutoConfig.from_pretrained(name)


@contextlib.contextmanager
def _load_errors(auto_class: Any, name: str, flag: str) -> Iterator[None]:
    """Check `name`, then turn what loading it raises into one line naming `flag` and the file at fault."""
    from safetensors import SafetensorError
    from transformers import modeling_utils

    check_model_path(name, flag)
    try:
        with _held_load_report(modeling_utils.logger):
            yield
    except SafetensorError as err:
        bad = _bad_weights_file(Path(name)) if os.path.isdir(name) else None
        where = str(bad) if bad else f"a weights file of {name}"
        raise ValueError(
            f"{flag} {name}: {where} is not a readable safetensors file ({err}); it may be truncated or damaged."
        ) from err
    except RuntimeError as err:
        if "mismatched_sizes" not in str(err) or not os.path.isdir(name):
            raise
        detail = _shape_mismatch(auto_class, name)
        raise ValueError(
            f"{flag} {name}: the weights do not match config.json ({detail or 'see the shapes in the config'}); "
            "is config.json the one saved with these weights?"
        ) from err
    except (OSError, ValueError) as err:
        if os.path.isdir(name):
            raise ValueError(f"{flag} {name}: {_one_line(err)}") from err
        raise ValueError(f"{flag} {name}: no such folder, and the hub could not provide it: {_one_line(err)}") from err


def load_tokenizer(name: str, *, flag: str = "--model_name_or_path", alternative: str = "") -> Any:
    """`AutoTokenizer.from_pretrained(name)`; a local folder without tokenizer files is refused, saying how to add one.

    transformers would otherwise build an empty tokenizer from `config.json` alone, or ask to install sentencepiece.
    `alternative` is another fix the command offers, e.g. "pass --tokenizer_name NAME".
    """
    from transformers import AutoTokenizer

    check_model_path(name, flag)
    if os.path.isdir(name) and not any((Path(name) / file).is_file() for file in TOKENIZER_FILES):
        source = _base_model(Path(name)) or _TOKENIZER_EXAMPLE
        save = f"AutoTokenizer.from_pretrained('{source}').save_pretrained('{name}')"
        raise FileNotFoundError(
            f"{flag} {name}: the folder has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the one of the "
            f'model it was made from there: python -c "from transformers import AutoTokenizer; {save}"'
            f"{' or ' + alternative if alternative else ''}."
        )
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        where = "cannot load its tokenizer" if os.path.isdir(name) else "no such folder, and the hub has no tokenizer"
        raise ValueError(f"{flag} {name}: {where}: {_one_line(err)}") from err


def _base_model(folder: Path) -> str | None:
    """The hub id or folder an upcycled checkpoint was made from (its config's `upcycled_from`), if it has one."""
    try:
        base = json.loads((folder / "config.json").read_text(encoding="utf-8"))["upcycled_from"]["base_model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return base if isinstance(base, str) and not base.startswith("builtin:") else None


def model_task(config: Any, *, flag: str = "--model_name_or_path") -> str:
    """`"generative"` for a seq2seq checkpoint (T5, MixT5), `"extractive"` for an encoder with (or for) a span head.

    Decided by the config's `architectures` first (`*ForConditionalGeneration` / `*ForQuestionAnswering`), then by
    its type in transformers' Auto mappings (registered types included): encoder-decoder → generative, a type
    `AutoModelForQuestionAnswering` builds → extractive (e.g. a bare `BertModel` checkpoint, whose QA head is new).
    Raises `ValueError` naming `flag` when neither applies; `--task` overrides it.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_QUESTION_ANSWERING_MAPPING,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    )

    architectures = getattr(config, "architectures", None) or []
    if any(name.endswith("ForQuestionAnswering") for name in architectures):
        return "extractive"
    if getattr(config, "is_encoder_decoder", False) or type(config) in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        return "generative"
    if type(config) in MODEL_FOR_QUESTION_ANSWERING_MAPPING:
        return "extractive"
    raise ValueError(
        f"{flag}: a {config.model_type!r} model ({', '.join(architectures) or 'no architectures in config.json'}) is "
        "neither a seq2seq model nor one with a question-answering head; pass --task generative or --task extractive."
    )
