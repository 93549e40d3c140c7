"""Small file helpers: the one place for gzip-aware reading and atomic JSON writes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def open_text(path: str | os.PathLike) -> IO[str]:
    """Open a UTF-8 text file for reading, decompressing it on the fly when its name ends in `.gz`.

    Read it inside `data_file_errors(path)` so that a directory, a broken gzip stream or non-UTF-8 bytes become one
    `ValueError` naming the file.
    """
    if os.fspath(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


@contextlib.contextmanager
def data_file_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn what reading a bad data file raises (gzip, zlib, OS and codec errors) into a `ValueError` naming it."""
    name = os.fspath(path)
    try:
        yield
    except IsADirectoryError as err:
        raise ValueError(f"{name}: is a directory; give a data file.") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{name}: not a valid gzip file ({err}).") from err
    except EOFError as err:
        raise ValueError(f"{name}: truncated gzip file ({err}).") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{name}: not UTF-8 text ({err.reason} at byte {err.start}).") from err


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON (or `.json.gz`) file. Invalid content raises `ValueError` naming the file, line and column."""
    try:
        with data_file_errors(path), open_text(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno}, column {err.colno}"
        raise ValueError(f"{os.fspath(path)}: invalid JSON at {where}: {err.msg}") from err


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


def check_output_path(path: str | os.PathLike, flag: str, *, is_dir: bool) -> None:
    """Refuse an output folder (`is_dir`) or file that cannot be written, before any work is done.

    Raises `ValueError` naming `flag` when `path` is a file where a folder is wanted (or the reverse), lies under a
    file, or its nearest existing folder is not writable (`os.access`; it also sees read-only file systems as root).
    """
    path = Path(path)
    if path.exists() and path.is_dir() != is_dir:
        wanted = "a folder" if is_dir else "a file"
        raise ValueError(f"{flag} {path}: exists and is not {wanted}.")
    parent = path if path.exists() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: cannot be created, {parent} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable.")


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `path` in one rename.

    A failure leaves `path` as it was. An existing non-empty `path` is refused unless `overwrite` is set, before
    any work starts.
    """
    path = Path(path)
    check_output_path(path, "--output_dir", is_dir=True)
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


# The tokenizer files a T5-family checkpoint may hold (sentencepiece, tokenizers, their configs, added tokens).
TOKENIZER_FILES = (
    "tokenizer.json",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "sentencepiece.bpe.model",
)


def copy_tokenizer(source: str, destination: str | os.PathLike) -> bool:
    """Copy the tokenizer files of `source` (a local folder or a hub id) into `destination`; False when it has none.

    The files are copied byte for byte, not re-saved: `save_pretrained` of a loaded T5 tokenizer rewrites
    `tokenizer_config.json` and drops `spiece.model` and `special_tokens_map.json`. `source` must hold at least
    one of them and load with `AutoTokenizer` (transformers would otherwise build an empty tokenizer from the
    model config alone).
    """
    from transformers import AutoTokenizer

    from ._compat import local_or_cached_file

    found = {}
    for name in TOKENIZER_FILES:
        try:
            path = local_or_cached_file(source, name)
        except (OSError, ValueError):  # not a folder nor a valid hub id (e.g. builtin:...)
            return False
        if path is not None:
            found[name] = path
    if not found:
        return False
    try:
        AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return False
    Path(destination).mkdir(parents=True, exist_ok=True)
    for name, path in found.items():
        shutil.copyfile(path, Path(destination) / name)
    return True
