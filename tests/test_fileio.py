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
