import os
import stat

import pytest

from spotlighter.fileio import atomic_path


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_file_has_the_mode_of_a_normally_created_file(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(str(tmp_path / "shared" / "cache.pkl")) as tmp, open(tmp, "wb") as f:
            f.write(b"x")
        open(tmp_path / "plain", "wb").close()
    finally:
        os.umask(old)
    assert mode(tmp_path / "shared" / "cache.pkl") == mode(tmp_path / "plain") == 0o644  # not mkstemp's 0600
    assert os.listdir(tmp_path / "shared") == ["cache.pkl"]


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]


def test_temps_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys
    import time

    from spotlighter.fileio import STALE_TEMP_SECONDS, TEMP_MARK, _host

    path = tmp_path / "model.pth.tar-1"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)  # a process of this host that has ended
    killed = tmp_path / f"model.pth.tar-1{TEMP_MARK}{_host()}-{dead_pid}-abc123"
    live = tmp_path / f"model.pth.tar-1{TEMP_MARK}{_host()}-{os.getpid()}-def456"  # being written now
    remote = tmp_path / f"model.pth.tar-1{TEMP_MARK}othernode-12-ghi789"  # another host's writer: by age
    old_remote = tmp_path / f"model.pth.tar-1{TEMP_MARK}othernode-13-jkl012"
    legacy = tmp_path / f"model.pth.tar-1{TEMP_MARK}mno345"
    other_file = tmp_path / f"model.pth.tar-2{TEMP_MARK}{_host()}-{dead_pid}-pqr678"  # another target: kept
    for p in (killed, live, remote, old_remote, legacy, other_file):
        p.write_bytes(b"partial")
    day_ago = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(old_remote, (day_ago, day_ago))
    os.utime(legacy, (day_ago, day_ago))
    with atomic_path(str(path)) as tmp:
        assert os.path.basename(tmp).startswith(f"model.pth.tar-1{TEMP_MARK}{_host()}-{os.getpid()}-")
        open(tmp, "wb").write(b"done")
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (path, live, remote, other_file))
    assert path.read_bytes() == b"done"


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


class _PlainObject:
    pass


@pytest.mark.parametrize("obj, name", [(_RunsCode(), "posix.system"), (_PlainObject(), "test_fileio._PlainObject")])
def test_checkpoint_naming_a_refused_global_says_so(tmp_path, obj, name):
    """Not "truncated or corrupt": the file is whole, it names a global a weights-only file may not."""
    import torch

    from spotlighter.checkpoint import CheckpointError, load

    path = str(tmp_path / "model.pth.tar-1")
    torch.save({"format": "x", "model": obj}, path)
    with pytest.raises(CheckpointError) as err:
        load(path, trainer="CoOp")
    assert str(err.value).startswith(
        f"{path} is a pickle of Python objects, not plain tensors: it names the global {name}, which a "
        "weights-only file may not (it was not loaded, because unpickling objects can run code)")
    assert "truncated" not in str(err.value) and "weights_only" not in str(err.value)
