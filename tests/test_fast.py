"""The fast local launcher (spotlighter.run.fast) without Dassl: a job forked from the pre-imported
server behaves as ``python SCRIPT ARGS`` in a fresh interpreter (exit status, output, environment,
argv, Ctrl-C, no state shared between jobs), and the runner uses it only for its own interpreter."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from spotlighter.run import fast
from script_repo import STUB

SCRIPTS = {
    "ok.py": "import sys, os\nprint('out', sys.argv[1:])\nprint('err', file=sys.stderr)\n",
    "exit3.py": "import sys\nsys.exit(3)\n",
    "message.py": "import sys\nsys.exit('bad input: see X')\n",
    "raises.py": "raise ValueError('boom')\n",
    "sleeps.py": "import time\nprint('ready', flush=True)\ntime.sleep(60)\n",
    "env.py": ("import os, sys, json\nprint(json.dumps({'cuda': os.environ.get('CUDA_VISIBLE_DEVICES'), "
               "'cwd': os.getcwd(), 'argv0': sys.argv[0], 'file': __file__, 'name': __name__, "
               "'path0': sys.path[0], 'leak': hasattr(json, 'LEAK'), 'env_leak': 'LEAK' in os.environ}))\n"
               "json.LEAK = 1\nos.environ['LEAK'] = '1'\n"),
    "atexit_writes.py": "import atexit, sys\natexit.register(lambda: open(sys.argv[1], 'w').write('ran'))\n",
}


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripts")
    for name, text in SCRIPTS.items():
        (d / name).write_text(text)
    return str(d)


@pytest.fixture(scope="module")
def launcher(scripts):
    return fast.ForkLauncher([sys.executable], scripts)


def fresh(scripts, name, *args, env=None):
    p = subprocess.run([sys.executable, name, *args], cwd=scripts, capture_output=True,
                       env={**os.environ, **(env or {})})
    return p.returncode, p.stdout + p.stderr


def forked(launcher, name, *args, env=None):
    job = launcher([sys.executable, name, *args], {**os.environ, **(env or {})})
    out = job.stdout.read()
    return job.wait(), out


@pytest.mark.parametrize("name", ["ok.py", "exit3.py", "message.py", "raises.py"])
def test_same_exit_status_and_output_as_a_fresh_interpreter(scripts, launcher, name):
    rc, out = forked(launcher, name, "a", "b c")
    rc_fresh, out_fresh = fresh(scripts, name, "a", "b c")
    assert rc == rc_fresh
    assert {"ok.py": 0, "exit3.py": 3, "message.py": 1, "raises.py": 1}[name] == rc
    if name == "raises.py":  # the traceback, with the script's absolute path, on the job's output
        assert out.splitlines()[-1] == out_fresh.splitlines()[-1] == b"ValueError: boom"
        assert f'File "{os.path.join(scripts, name)}", line 1'.encode() in out
    else:
        assert sorted(out.splitlines()) == sorted(out_fresh.splitlines())


def test_environment_argv_cwd_and_no_state_shared_between_jobs(scripts, launcher):
    rc, out = forked(launcher, "env.py", env={"CUDA_VISIBLE_DEVICES": "3"})
    first = json.loads(out)
    rc2, out2 = forked(launcher, "env.py", env={"CUDA_VISIBLE_DEVICES": "5"})
    second = json.loads(out2)
    _, out_fresh = fresh(scripts, "env.py", env={"CUDA_VISIBLE_DEVICES": "3"})
    assert rc == rc2 == 0
    assert first == json.loads(out_fresh)  # argv[0] as typed, absolute __file__, __main__, cwd, sys.path[0]
    assert first["argv0"] == "env.py" and first["file"] == os.path.join(scripts, "env.py")
    assert (first["cuda"], second["cuda"]) == ("3", "5")  # each job its own environment
    assert not second["leak"] and not second["env_leak"]  # job 1's module and environment changes are gone


def test_atexit_handlers_run_as_in_a_fresh_interpreter(scripts, launcher, tmp_path):
    marker = tmp_path / "marker"
    assert forked(launcher, "atexit_writes.py", str(marker))[0] == 0
    assert marker.read_text() == "ran"


def test_ctrl_c_ends_the_job_as_it_ends_a_fresh_interpreter(scripts, launcher):
    job = launcher([sys.executable, "sleeps.py"], dict(os.environ))
    assert job.stdout.readline() == b"ready\n"
    os.kill(job.pid, signal.SIGINT)
    rc = job.wait()
    p = subprocess.Popen([sys.executable, "sleeps.py"], cwd=scripts, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    assert rc == p.wait() == -signal.SIGINT


def test_only_the_runners_own_interpreter_is_forked(tmp_path):
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    assert fast.why_not([sys.executable], {}) is None
    assert fast.why_not([sys.executable], {"RUNNER_FORK": "0"}) == "RUNNER_FORK=0"
    # a wrapper script may do more than start Python: it is always run, even though it starts this Python
    assert "not the runner's interpreter" in fast.why_not([str(wrapper)], {"PYTHON": str(wrapper)})
    assert "not the runner's interpreter" in fast.why_not([sys.executable, "-X", "dev"], {"PYTHON": "x"})
    # the default `python` may be a launcher (a pyenv shim): it is asked which interpreter it is
    assert fast.is_own_interpreter([str(wrapper)], explicit=False)


# ------------------------------------------------------------------------------------------------
# through the runner: a stand-in train.py in the throwaway repository, PYTHON = the runner's own
# ------------------------------------------------------------------------------------------------
RACE = r'''
if os.environ.get("STUB_RACE") and os.environ["STUB_RACE"] in out:  # another process takes the folder
    code = ("import sys, time; from spotlighter.runlock import OutputLock\n"
            "lock = OutputLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)")
    import subprocess
    holder = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    holder.stdout.readline()
    open(os.environ["STUB_RACE_PID"], "w").write(str(holder.pid))
    print("error: locked", file=sys.stderr)
    sys.exit(2)
'''


@pytest.fixture
def forked_env(env):
    """The throwaway repository with a train.py that imitates the trainer (the stub's logic)."""
    body = STUB.format(python=sys.executable).replace("argv = sys.argv[1:]", "argv = sys.argv[:]")
    body = body.replace("import json, os, sys\n", "import json, os, sys\nif os.environ.get('STUB_STARTED'):\n"
                        "    open(os.environ['STUB_STARTED'], 'w').write(str(os.getpid()))\n", 1)
    body = body.replace("out = args[\"--output-dir\"]\n", "out = args[\"--output-dir\"]\n" + RACE)
    with open(os.path.join(env.repo, "train.py"), "w") as f:
        f.write(body)
    env.python = sys.executable
    return env


def test_runner_runs_jobs_from_the_fork_server(forked_env):
    e = forked_env
    r = e.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=e.python)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "jobs start from a fork server" in r.stdout
    calls = e.calls()
    assert len(calls) == 4 and all(c["cwd"] == e.repo and c["argv"][0] == "train.py" for c in calls)
    log = glob_one(os.path.join(e.out, "base2new", "train_base", "dtd", "shots_16", "CoOp", "vit_b16_ep20_ctx4",
                                "seed1", "run-*.log"))
    lines = open(log).read().splitlines()
    assert lines[0].startswith(f"{e.python} train.py --root ") and lines[-1].endswith("exit status 0")
    off = e.run("base2new.sh", "coop", "dtd", 16, SEEDS="3", PYTHON=e.python, RUNNER_FORK=0)
    assert off.returncode == 0 and "each job starts a fresh interpreter (RUNNER_FORK=0)" in off.stdout


def glob_one(pattern):
    import glob
    (found,) = glob.glob(pattern)
    return found


def test_failure_and_exit_status_on_the_fork_path(forked_env):
    e = forked_env
    r = e.run("base2new.sh", "coop", "dtd", 16, SEEDS="1 2", PYTHON=e.python,
              STUB_FAIL="train_base/dtd/shots_16/CoOp/vit_b16_ep20_ctx4/seed2")
    assert r.returncode == 1
    line = next(l for l in r.stderr.splitlines() if "seed2: exit status 1; see " in l)
    log = line.split("; see ")[1].split(" (Dassl log")[0]
    assert os.path.isfile(os.path.join(e.repo, log)) and "error: boom" in open(os.path.join(e.repo, log)).read()
    assert "seed 2: training on base failed, so its evaluation on new is not run" in r.stdout
    assert "error: boom" in r.stdout  # one slot: the job's stderr is echoed, as for a subprocess
    assert len(e.calls()) == 3  # seed 1's two jobs and the failed training; the other seed went on


def test_lock_taken_between_check_and_start_is_running_elsewhere(forked_env, tmp_path):
    e = forked_env
    pid_file = tmp_path / "holder.pid"
    r = e.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=e.python, STUB_RACE="train_base",
              STUB_RACE_PID=str(pid_file))
    try:
        assert r.returncode == 1, r.stdout + r.stderr
        holder = int(pid_file.read_text())
        assert "RUNNING elsewhere (not started twice" in r.stderr
        assert f"is locked by pid {holder} on " in r.stderr and "FAILED" not in r.stderr
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_ctrl_c_stops_the_runner_and_its_forked_jobs(forked_env):
    e = forked_env
    environ = {k: v for k, v in os.environ.items() if k not in ("OUTPUT", "SEEDS", "CFG", "PYTHON")}
    environ.update(DATA=e.data, STUB_CALLS=str(e.tmp / "calls.jsonl"), STUB_NO_RESULTS="1", SEEDS="1",
                   PYTHON=e.python, STUB_SLEEP="60", STUB_STARTED=str(e.tmp / "started"))
    proc = subprocess.Popen(["bash", os.path.join(e.repo, "scripts", "base2new.sh"), "coop", "dtd", "16"],
                            cwd=e.cwd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    started = e.tmp / "started"  # written by the job's train.py once it runs (then it sleeps 60 s)
    deadline = time.monotonic() + 60
    # the file exists from its open(): wait for the pid in it, not only for the file
    while time.monotonic() < deadline and not (started.exists() and started.read_text().strip().isdigit()):
        time.sleep(0.2)
    assert started.exists() and started.read_text().strip().isdigit(), "the job did not start"
    job_pid = int(started.read_text())
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted: re-run the same command to continue" in err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the interrupted run are still alive")
    with pytest.raises(ProcessLookupError):
        os.kill(job_pid, 0)  # the job itself ended with the runner
    again = e.run("base2new.sh", "coop", "dtd", 16, SEEDS="1", PYTHON=e.python)
    assert again.returncode == 0, again.stdout + again.stderr
