"""What killed runs leave behind: the next run of the same command removes its own earlier staging, and only that;
outputs get the permissions the umask gives."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from mixt5.cli import main
from mixt5.utils import atomic_write, remove_stale_staging, staging_owner, staging_prefix


def _dead_owner() -> str:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return staging_owner().rpartition("-")[0] + f"-{child.pid}"


@pytest.fixture
def live_owner():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield staging_owner().rpartition("-")[0] + f"-{child.pid}"
    child.kill()
    child.wait()


def test_only_a_dead_writers_staging_for_the_same_target_is_removed(tmp_path, live_owner):
    dead = _dead_owner()
    stale = tmp_path / f"{staging_prefix('metrics.json', dead)}abc123.tmp"
    running = tmp_path / f"{staging_prefix('metrics.json', live_owner)}def456.tmp"  # a concurrent writer's
    other_target = tmp_path / f"{staging_prefix('predictions.json', dead)}ghi789.tmp"
    other_host = tmp_path / f"{staging_prefix('metrics.json', 'elsewhere-' + dead.rpartition('-')[2])}jkl.tmp"
    unowned = tmp_path / ".metrics.json.mno012.tmp"  # no owner in its name: cannot tell whose
    folder = tmp_path / f"{staging_prefix('checkpoint-6', dead)}staging.partial"
    for path in (stale, running, other_target, other_host, unowned):
        path.write_text("{")
    (folder / "checkpoint-6").mkdir(parents=True)

    with atomic_write(tmp_path / "metrics.json") as handle:
        handle.write("{}")
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert not stale.exists()
    assert running.exists() and other_target.exists() and other_host.exists() and unowned.exists()
    assert remove_stale_staging(tmp_path, "checkpoint-*") == [folder] and not folder.exists()
    assert running.exists()


UPCYCLE_KILLED_AFTER_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import mixt5.utils
    from mixt5.cli import main

    def kill(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)  # the model is in the staging folder, the tokenizer not yet

    mixt5.utils.copy_tokenizer = kill
    main(sys.argv[1:])
    """
)


@pytest.mark.slow
def test_a_killed_upcycle_is_cleaned_by_the_next_one(tmp_path, live_owner):
    argv = ["upcycle", "--model_name_or_path", "builtin:t5-v1_1-tiny", "--output_dir", str(tmp_path / "out"),
            "--num_experts", "2", "--moe_layers", "last:1"]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", UPCYCLE_KILLED_AFTER_SAVE, *argv], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    (left,) = tmp_path.glob(".out.*.partial")
    assert (left / "model.safetensors").is_file() and not (tmp_path / "out").exists()
    concurrent = tmp_path / f"{staging_prefix('out', live_owner)}xyz.partial"  # another upcycle, still running
    concurrent.mkdir()

    old_umask = os.umask(0o022)
    try:
        assert main(argv) == 0
    finally:
        os.umask(old_umask)
    assert not left.exists() and concurrent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [concurrent.name, "out"]
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not tempfile's 0700
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes  # not safetensors' 0600


def test_published_folders_and_files_are_on_disk_before_their_new_name(tmp_path, monkeypatch):
    from mixt5 import utils

    synced = []
    real = utils.fsync_path
    monkeypatch.setattr(utils, "fsync_path", lambda path: (synced.append((str(path), staged.exists())), real(path)))
    staged, final = tmp_path / "staging" / "checkpoint-3", tmp_path / "run" / "checkpoint-3"
    (staged / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "sub/optimizer.pt"):
        (staged / name).write_bytes(b"x" * 10)
    final.mkdir(parents=True)  # an older copy: renamed aside, replaced
    utils.replace_dir(staged, final)
    before_rename = {path for path, source_there in synced if source_there}
    assert before_rename == {str(staged / "model.safetensors"), str(staged / "sub" / "optimizer.pt"),
                             str(staged / "sub"), str(staged)}  # fmt: skip
    assert synced[-1] == (str(final.parent), False)  # the rename, after it
    assert (final / "sub" / "optimizer.pt").read_bytes() == b"x" * 10

    synced.clear()
    with atomic_write(tmp_path / "run" / "metrics.json") as handle:
        handle.write("{}")
    assert [path for path, _ in synced] == [str(tmp_path / "run")]  # the file itself is fsynced before its rename


def test_file_systems_without_fsync_still_publish(tmp_path, monkeypatch):
    import errno

    from mixt5 import utils

    def unsupported(fd):
        raise OSError(errno.EINVAL, "Invalid argument")  # what some network and FUSE mounts answer

    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "model.safetensors").write_bytes(b"x")
    monkeypatch.setattr(utils.os, "fsync", unsupported)
    utils.replace_dir(tmp_path / "staged", tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"x"

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")  # a real write error is not swallowed

    (tmp_path / "again").mkdir()
    monkeypatch.setattr(utils.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        utils.replace_dir(tmp_path / "again", tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"x"  # the published folder is untouched
