"""The local launcher's fast path: each job forked from a server that imported train.py's heavy
modules once, instead of a fresh interpreter that imports torch and Dassl again (~5 s a job).

``multiprocessing``'s forkserver imports :data:`PRELOAD` (torch, Dassl, the checkout's trainers and
datasets) once; every job is then a **fresh child** of that server (never a reused process, so no
state leaks from one job to the next) which, before anything touches CUDA, takes the job's
environment (``CUDA_VISIBLE_DEVICES`` ...), changes into the repository, sets ``sys.argv`` and runs
``train.py`` as ``__main__`` (as ``python train.py`` does), its stdout and stderr on a pipe the runner copies into the
job's run log (and onto its own stdout with one slot), exactly as for a subprocess. The exit status,
train.py's lock on the output folder, failure messages and Ctrl-C behave as with a subprocess.

It is used only when ``PYTHON`` is the runner's own interpreter (the default) and ``RUNNER_FORK``
is not ``0``; otherwise (and with ``DRY_RUN=1``, which prints the same ``python train.py ...``
commands either way, and on SLURM) jobs start as a fresh ``PYTHON train.py ...`` process.

Known differences from a fresh interpreter: variables read when a library is *loaded*
(``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) are the runner's, not a per-job value (the runner gives
jobs no other), and a warning a module prints while it is imported appears once, on the runner's
stderr, not in every job's log. Plain Python: this module never imports torch itself.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

#: The module the fork server imports once (it imports train.py's heavy modules).
PRELOAD_MODULE = "spotlighter.run.preload"
#: RUNNER_FORK=0 starts every job as a fresh interpreter.
ENV_SWITCH = "RUNNER_FORK"
#: Seconds to wait for ``PYTHON -c ...`` to say which interpreter it is.
PROBE_TIMEOUT_S = 60
_PROBE = "import os, sys; print(os.path.realpath(sys.executable)); print(sys.prefix)"


def interpreter_id(python: Sequence[str]) -> Optional[tuple]:
    """(real executable, sys.prefix) of the interpreter ``python`` starts, or None if it cannot say."""
    try:
        r = subprocess.run([*python, "-c", _PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = r.stdout.splitlines()
    return (lines[0], lines[1]) if r.returncode == 0 and len(lines) == 2 else None


def is_own_interpreter(python: Sequence[str], explicit: bool) -> bool:
    """Whether ``PYTHON`` (one word: no interpreter options) is this process's interpreter.

    The default ``python`` (``explicit`` False) may be a launcher such as a pyenv shim: it is asked
    which interpreter it starts. A ``PYTHON`` the user set must also be this interpreter's file (or a
    link to it), so that a wrapper script, which may do more than start Python, is always run.
    """
    if len(python) != 1:
        return False
    if python[0] == sys.executable:
        return True
    if explicit:
        found = shutil.which(python[0])
        try:
            if not found or not os.path.samefile(found, sys.executable):
                return False
        except OSError:
            return False
    return interpreter_id(python) == (os.path.realpath(sys.executable), sys.prefix)


def why_not(python: Sequence[str], env: Dict[str, str]) -> Optional[str]:
    """None when the fork server can start the jobs, else why each job gets a fresh interpreter."""
    if env.get(ENV_SWITCH, "1") in ("0", ""):
        return f"{ENV_SWITCH}={env.get(ENV_SWITCH)}"
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "this platform has no forkserver start method"
    if not is_own_interpreter(python, explicit=bool(env.get("PYTHON"))):
        return f"PYTHON={' '.join(python)} is not the runner's interpreter ({sys.executable})"
    return None


class ForkedJob:
    """A job forked from the server, with the part of ``subprocess.Popen``'s interface run_one uses."""

    def __init__(self, process, stdout):
        self._process = process
        self.stdout = stdout
        self.pid = process.pid

    def poll(self) -> Optional[int]:
        return self._process.exitcode

    def wait(self) -> int:
        self._process.join()
        self.stdout.close()
        return self._process.exitcode

    def kill(self) -> None:
        self._process.kill()


class ForkLauncher:
    """Starts ``PYTHON SCRIPT ARGS...`` commands as children of one pre-imported fork server."""

    def __init__(self, python: Sequence[str], cwd: str):
        self.python = list(python)
        self.cwd = cwd
        self.ctx = multiprocessing.get_context("forkserver")
        # preload.py puts the checkout first on the server's sys.path (as `python train.py` does), so
        # `import datasets` / `trainers` are the checkout's folders, never HuggingFace datasets.
        self.ctx.set_forkserver_preload([PRELOAD_MODULE])

    def warm_up(self) -> None:
        """Start the server now (it imports PRELOAD in the background while other work goes on)."""
        from multiprocessing import forkserver
        forkserver.ensure_running()

    def __call__(self, cmd: Sequence[str], env: Dict[str, str]) -> ForkedJob:
        n = len(self.python)
        if list(cmd[:n]) != self.python or len(cmd) <= n:
            raise ValueError(f"not a command of {self.python}: {cmd}")
        script, args = cmd[n], list(cmd[n + 1:])
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=run_script, args=(script, args, self.cwd, dict(env), writer),
                                   name=f"job:{script}", daemon=False)
        try:
            process.start()
        finally:
            writer.close()
        # As with a subprocess, the runner does not wait for a job when it exits (e.g. on Ctrl-C, which
        # the job gets too); multiprocessing would join every child it started at exit.
        multiprocessing.process._children.discard(process)
        stdout = open(os.dup(reader.fileno()), "rb")
        reader.close()
        return ForkedJob(process, stdout)


def _stream(fd: int, env: Dict[str, str], stderr: bool) -> io.TextIOWrapper:
    """sys.stdout / sys.stderr as a fresh interpreter makes them on a pipe (buffering, errors)."""
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    raw = io.FileIO(fd, "w", closefd=False)
    binary = raw if unbuffered else io.BufferedWriter(raw)
    encoding = (env.get("PYTHONIOENCODING") or "").split(":")[0] or None
    return io.TextIOWrapper(binary, encoding=encoding, errors="backslashreplace" if stderr else "strict",
                            line_buffering=stderr, write_through=unbuffered)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"), as the interpreter does
    return 1


def run_as_main(path: str) -> None:
    """Run a script file as ``__main__``, as ``python SCRIPT`` does: runpy.run_path's work, except that
    ``sys.argv[0]`` stays as typed ("train.py", which train.py prints) while ``__file__`` is absolute."""
    import builtins
    import importlib.machinery
    import types

    path = os.path.abspath(path)
    with io.open_code(path) as f:
        code = compile(f.read(), path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__, main.__cached__, main.__builtins__ = path, None, builtins
    main.__loader__ = importlib.machinery.SourceFileLoader("__main__", path)
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def run_script(script: str, args: List[str], cwd: str, env: Dict[str, str], out) -> None:
    """In the forked child: become ``python SCRIPT ARGS`` run from ``cwd`` with ``env``, then exit."""
    import atexit
    import signal
    import threading
    import traceback

    fd = out.fileno()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    out.close()
    sys.stdout = sys.__stdout__ = _stream(1, env, stderr=False)
    sys.stderr = sys.__stderr__ = _stream(2, env, stderr=True)
    # the job's environment before anything (CUDA is initialised lazily, on first use, from it)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    path = os.path.join(cwd, script)
    sys.argv = [script, *args]
    here = os.path.dirname(os.path.abspath(path))
    if sys.path[:1] != [here]:  # as `python SCRIPT` does
        sys.path.insert(0, here)
    code, interrupted = 0, False
    try:
        run_as_main(path)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, interrupted = 1, True
    except BaseException:  # an uncaught error: the traceback, exit status 1, as the interpreter
        traceback.print_exc()
        code = 1
    # the interpreter's shutdown: wait for non-daemon threads, run atexit handlers, flush
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        try:
            shutdown()
        except BaseException:  # noqa: BLE001  (Ctrl-C while waiting: exit anyway)
            pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:  # die of SIGINT, as an interpreter does after an uncaught KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)
