import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from spotlighter import runlock
from spotlighter.runlock import INFO_FILE, OutputLock, OutputLocked, lock_holder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder_process(directory, marker):
    """A child process that takes the lock, writes ``marker`` and sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from spotlighter.runlock import OutputLock
        lock = OutputLock({str(directory)!r}).acquire()
        open({str(marker)!r}, "w").close()
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 30
    while not os.path.exists(marker):
        assert proc.poll() is None, "lock holder died"
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


def test_free_folder_has_no_holder(tmp_path):
    assert lock_holder(str(tmp_path / "missing")) is None
    assert not (tmp_path / "missing").exists()
    with OutputLock(str(tmp_path)) as lock:
        assert lock.held
        info = json.loads((tmp_path / INFO_FILE).read_text())
        assert info["pid"] == os.getpid()
    assert not (tmp_path / INFO_FILE).exists()
    assert lock_holder(str(tmp_path)) is None


def test_second_process_is_refused_with_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "ACQUIRE_WAIT_S", 0.1)
    proc = _holder_process(tmp_path, tmp_path / "ready")
    try:
        holder = lock_holder(str(tmp_path))
        assert holder is not None and holder.pid == proc.pid
        with pytest.raises(OutputLocked) as err:
            OutputLock(str(tmp_path)).acquire()
        assert f"pid {proc.pid}" in str(err.value) and str(tmp_path) in str(err.value)
        assert err.value.holder.pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    proc = _holder_process(tmp_path, tmp_path / "ready")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / INFO_FILE).read_text())["pid"] == proc.pid  # record left behind
    assert lock_holder(str(tmp_path)) is None  # but nobody holds it
    with caplog.at_level("WARNING"):
        with OutputLock(str(tmp_path)):
            assert json.loads((tmp_path / INFO_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {proc.pid}" in caplog.text and "no longer running" in caplog.text


def test_protocol_registry_tables():
    from spotlighter import registry

    assert len(registry.xd_targets("imagenet")) == 10 and "imagenet" not in registry.xd_targets("imagenet")
    assert registry.dg_targets("imagenet") == ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert set(registry.xd_targets("minibench")).isdisjoint(registry.dg_targets("minibench"))
    with pytest.raises(registry.RegistryError, match="known sources: imagenet, minibench"):
        registry.dg_targets("caltech101")
