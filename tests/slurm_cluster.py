"""A throwaway single-node SLURM cluster on localhost (Debian's slurm-wlm + munge), for tests.

``start(workdir)`` writes a munge key, a slurm.conf and starts munged, slurmctld and slurmd with
private sockets, ports, state and spool folders under ``workdir`` (nothing under /etc or /run is
touched), and returns a :class:`Cluster` whose ``env`` makes sbatch/squeue/sacct talk to it
(``SLURM_CONF``). Accounting goes through slurmdbd only when ``mariadb`` is usable; without it
``sacct`` is unavailable and the runner's status falls back to squeue. ``Cluster.stop()`` kills what
it started. Raises :class:`ClusterUnavailable` with the reason when something is missing or does not
come up (tests skip with that reason).

By hand:  python tests/slurm_cluster.py /tmp/slurm   (prints the SLURM_CONF to export; Ctrl-C stops)
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
#: Seconds to wait for the node to register with the controller.
START_TIMEOUT_S = 30.0
#: Job credential lifetime (SLURM's default 120 s), which is also how long a requeued job waits
#: before it may start again: short, so the preemption tests see the requeued job run.
CRED_EXPIRE_S = 10


class ClusterUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    workdir: str
    env: Dict[str, str]
    procs: List[subprocess.Popen] = field(default_factory=list)
    accounting: bool = False  # sacct works (slurmdbd + MariaDB)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _conf(workdir: str, cpus: int, user: str, munge_socket: str, dbd_port: int = 0) -> str:
    host = socket.gethostname().split(".")[0]
    if dbd_port:
        accounting = (f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                      f"AccountingStoragePort={dbd_port}\nAccountingStoragePass={munge_socket}\n"
                      "JobAcctGatherType=jobacct_gather/linux\n")
    else:
        accounting = "AccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none\n"
    return f"""\
ClusterName=spltest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
CredType=cred/munge
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool/slurmd-%n
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd-%n.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
{accounting}JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=30
MpiDefault=none
MailProg=/bin/true
LaunchParameters=enable_nss_slurm
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


ACCOUNTING_BINARIES = ("mariadbd", "mariadb-install-db", "slurmdbd", "sacct")


def _start_accounting(workdir: str, cluster: Cluster, munge_socket: str, log, user: str) -> int:
    """MariaDB (private datadir, TCP on 127.0.0.1) + slurmdbd; returns slurmdbd's port."""
    db = os.path.join(workdir, "mysql")
    if not os.path.isdir(os.path.join(db, "mysql")):
        r = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db}", f"--user={user}",
                            "--auth-root-authentication-method=normal", "--skip-test-db"],
                           stdout=log, stderr=log)
        if r.returncode != 0:
            raise ClusterUnavailable("mariadb-install-db failed (see daemons.log)")
    db_port, dbd_port = _free_port(), _free_port()
    cluster.procs.append(subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={db}", f"--port={db_port}", "--bind-address=127.0.0.1",
         f"--socket={workdir}/mysql.sock", f"--user={user}", "--skip-grant-tables",
         f"--pid-file={workdir}/mysql.pid"], stdout=log, stderr=log))

    def db_up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", db_port)) == 0

    _wait(db_up, "mariadbd did not listen", cluster)
    conf = os.path.join(workdir, "slurmdbd.conf")
    with open(conf, "w") as f:
        f.write(f"AuthType=auth/munge\nAuthInfo=socket={munge_socket}\nDbdHost=localhost\nDbdAddr=127.0.0.1\n"
                f"DbdPort={dbd_port}\nSlurmUser={user}\nStorageType=accounting_storage/mysql\n"
                f"StorageHost=127.0.0.1\nStoragePort={db_port}\nStorageUser={user}\nStorageLoc=slurm_acct_db\n"
                f"PidFile={workdir}/slurmdbd.pid\nLogFile={workdir}/slurmdbd.log\n")
    os.chmod(conf, 0o600)
    # slurmdbd reads the slurmdbd.conf next to $SLURM_CONF
    cluster.procs.append(subprocess.Popen(["slurmdbd", "-D"], stdout=log, stderr=log,
                                          env={**os.environ, "SLURM_CONF": os.path.join(workdir, "slurm.conf")}))

    def dbd_up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", dbd_port)) == 0

    _wait(dbd_up, "slurmdbd did not listen", cluster)
    return dbd_port


def start(workdir: str, cpus: int = 0, accounting: bool = True) -> Cluster:
    """The cluster with accounting (sacct) when it comes up, else without it."""
    if accounting and all(shutil.which(b) for b in ACCOUNTING_BINARIES):
        try:
            return _start(os.path.join(workdir, "with-accounting"), cpus, True)
        except ClusterUnavailable:
            pass
    return _start(os.path.join(workdir, "plain"), cpus, False)


def _start(workdir: str, cpus: int, accounting: bool) -> Cluster:
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing)} not on PATH): "
                                 "apt-get install -y slurm-wlm munge")
    workdir = os.path.abspath(workdir)
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", f"spool/slurmd-{host}", "munge"):
        os.makedirs(os.path.join(workdir, sub), exist_ok=True)
    os.chmod(os.path.join(workdir, "munge"), 0o700)
    user = getpass.getuser()
    key = os.path.join(workdir, "munge", "munge.key")
    with open(key, "wb") as f:
        f.write(os.urandom(128))
    os.chmod(key, 0o400)
    munge_socket = os.path.join(workdir, "munge", "munge.socket")
    conf = os.path.join(workdir, "slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    cluster = Cluster(workdir, env)
    log = open(os.path.join(workdir, "daemons.log"), "ab")
    try:
        munged = [shutil.which("munged"), "-F", "-f", f"--key-file={key}", f"--socket={munge_socket}",
                  f"--pid-file={workdir}/munge/munged.pid", f"--log-file={workdir}/munge/munged.log",
                  f"--seed-file={workdir}/munge/munged.seed"]
        cluster.procs.append(subprocess.Popen(munged, stdout=log, stderr=log, env=env))
        _wait(lambda: os.path.exists(munge_socket), "munged did not create its socket", cluster)
        dbd_port = 0
        if accounting:
            dbd_port = _start_accounting(workdir, cluster, munge_socket, log, user)
        cluster.accounting = bool(dbd_port)
        env["SLURM_CONF"] = conf
        with open(conf, "w") as f:
            f.write(_conf(workdir, cpus or os.cpu_count() or 1, user, munge_socket, dbd_port))
        if dbd_port:
            subprocess.run(["sacctmgr", "-i", "add", "cluster", "spltest"], env=env, stdout=log, stderr=log)
        cluster.procs.append(subprocess.Popen(["slurmctld", "-D", "-i", "-f", conf], stdout=log,
                                              stderr=log, env=env))
        cluster.procs.append(subprocess.Popen(["slurmd", "-D", "-f", conf], stdout=log, stderr=log, env=env))

        def node_up() -> bool:
            r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")

        _wait(node_up, "the node did not come up (see slurmctld.log / slurmd.log)", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait(ok, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ok():
            return
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            break
        time.sleep(0.3)
    logs = ""
    for name in ("daemons.log", "slurmctld.log", "slurmd.log"):
        path = os.path.join(cluster.workdir, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                logs += f"\n--- {name}:\n" + "".join(f.readlines()[-8:])
    raise ClusterUnavailable(f"SLURM did not start: {what}{' (exited: ' + ', '.join(map(str, dead)) + ')' if dead else ''}{logs}")


def wait_idle(cluster: Cluster, timeout: float = 240) -> None:
    """Wait until the cluster's queue is empty; AssertionError with the queue after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True, text=True)
        if r.returncode == 0 and not r.stdout.strip():
            return
        time.sleep(1)
    raise AssertionError("SLURM jobs did not finish in time:\n" + subprocess.run(
        ["squeue"], env=cluster.env, capture_output=True, text=True).stdout)


if __name__ == "__main__":
    c = start(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-cluster")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    print(f"export SLURM_CONF={c.env['SLURM_CONF']}  # accounting (sacct): {c.accounting}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        c.stop()
