"""Small file helpers: the one place for gzip-aware reading, atomic writes and the staging files they leave."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import gzip
import json
import logging
import os
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


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


def umask_mode(mode: int = 0o666) -> int:
    """`mode` less the process umask: what `open`/`mkdir` would give a new file (0o666) or folder (0o777).

    `tempfile` creates its files 0600 and folders 0700 whatever the umask; staging made with it is set to this
    before it takes the final name, so outputs get the same permissions as every other file the user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def honour_umask(folder: str | os.PathLike) -> None:
    """Give `folder` and everything in it the permissions the umask gives new files and folders.

    Staging folders come from `tempfile` (0700) and safetensors writes its files 0600 (as 0.8 does), while every
    other output is 0644 under the usual umask: a checkpoint shared with a group or served by another user must not
    be half readable.
    """
    file_mode, dir_mode = umask_mode(0o666), umask_mode(0o777)
    os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), file_mode)


def staging_owner() -> str:
    """`HOST-PID` of this process, put into its staging files' names so that a later run can tell whose they are."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


def staging_prefix(name: str, owner: str | None = None) -> str:
    """`.NAME.OWNER.`: how a staging file or folder for `NAME` begins (random characters and a suffix follow)."""
    return f".{name}.{owner or staging_owner()}."


STAGING_SUFFIXES = (".partial", ".tmp", ".old")


def is_staging(name: str) -> bool:
    """Whether a file or folder name is one of a staging entry (`.NAME.OWNER.RANDOM.partial|.tmp|.old`)."""
    return name.startswith(".") and name.endswith(STAGING_SUFFIXES) and len(name[1:].rsplit(".", 3)) == 4


def _owner_is_gone(owner: str) -> bool:
    host, _, pid = owner.rpartition("-")
    if host != socket.gethostname().replace(".", "_") or not pid.isdigit():
        return False  # another machine's (a shared filesystem) or not ours: cannot tell, keep it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_staging(directory: str | os.PathLike, name: str = "*") -> list[Path]:
    """Remove the staging files and folders (`.NAME.HOST-PID.*.partial|.tmp|.old`) that a killed run left in
    `directory` for targets matching the glob `name`; returns what was removed.

    Only those whose owning process is gone (same host, pid no longer running) go: a process still writing keeps its
    own, as do entries of another host or without an owner in their name.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if not is_staging(entry.name):
            continue
        parts = entry.name[1:].rsplit(".", 3)  # NAME (may hold dots), OWNER, random, suffix
        if not fnmatch.fnmatchcase(parts[0], name) or not _owner_is_gone(parts[1]):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
        logger.info("Removed %s, left by a run that was killed while writing %s.", entry, directory / parts[0])
    return removed


# What some file systems (network and FUSE mounts) answer to an fsync they do not support, for folders in particular:
# durability is then theirs to give, and a checkpoint must not fail for it.
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's data and metadata to disk (`fsync` on a read-only descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """`fsync_path` every file and folder under `root` (files first, `root` last; symbolic links are not followed)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            file = os.path.join(folder, name)
            if not os.path.islink(file):
                fsync_path(file)
        fsync_path(folder)


def replace_dir(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move the complete folder `source` to `destination`, replacing what is there with as few renames as possible.

    A folder at `destination` is renamed aside (to a staging name) first and removed after, since a rename cannot
    replace a non-empty folder; readers see the old folder or the new one, apart from the instant between the renames.
    `source` is flushed to disk before the rename and the parent folder after it, so that after a power loss the new
    name holds whole files (a rename alone orders nothing with the data written before it).
    """
    source, destination = Path(source), Path(destination)
    fsync_tree(source)
    if not destination.exists():
        source.rename(destination)
        fsync_path(destination.parent)
        return
    old = Path(tempfile.mkdtemp(dir=destination.parent, prefix=staging_prefix(destination.name), suffix=".old"))
    destination.rename(old / destination.name)
    source.rename(destination)
    fsync_path(destination.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open `path` for writing so that readers see either the old file or the whole new one, never a partial write.

    Text goes to a temporary file in the same directory, which is flushed, fsynced and moved over `path` with
    `os.replace` (mode 0o666 less the umask; the folder fsynced after) when the block ends without error; on error it
    is removed and `path` is untouched. Temporary files for `path` that a killed earlier writer left are removed first
    (`remove_stale_staging`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=staging_prefix(path.name), suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
        fsync_path(path.parent)  # the rename itself, as `replace_dir` does
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
    any work starts. Staging folders for `path` that a killed earlier run left are removed first.
    """
    path = Path(path)
    check_output_path(path, "--output_dir", is_dir=True)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {path} is not empty; pass --overwrite_output_dir to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(path.parent, path.name)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=staging_prefix(path.name), suffix=".partial"))
    try:
        yield staging
        honour_umask(staging)
        replace_dir(staging, path)
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
