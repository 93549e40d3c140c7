"""Small file helpers: the one place for gzip-aware reading and atomic JSON writes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a UTF-8 text file for reading, decompressing it on the fly when its name ends in `.gz`."""
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON (or `.json.gz`) file. Invalid content raises `ValueError` naming the file, line and column."""
    try:
        with open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"{os.fspath(path)}: invalid JSON at {where}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text ({err.reason} at byte {err.start})") from err


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open `path` for writing so that readers see either the old file or the whole new one, never a partial write.

    Text goes to a temporary file in the same directory, which is flushed, fsynced and moved over `path` with
    `os.replace` (mode 0o644) when the block ends without error; on error it is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: list[Any]) -> None:
    """Write one JSON object per line, atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` in one rename.

    A failure leaves `path` as it was. An existing non-empty `path` is refused unless `overwrite` is set, before
    any work starts.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {path} is not empty; pass --overwrite_output_dir to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield staging
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            staging.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "vocab.json", "sentencepiece.bpe.model")


def copy_tokenizer(source: str, destination: str | os.PathLike) -> bool:
    """Save the tokenizer of `source` (a local folder or a hub id) into `destination`; False when it has none.

    A local folder counts as having one only if it holds tokenizer files: transformers would otherwise build an
    empty tokenizer from the model config alone.
    """
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        AutoTokenizer.from_pretrained(source).save_pretrained(destination)
    except (OSError, ValueError):
        return False
    return True
