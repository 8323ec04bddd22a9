"""A throwaway two-node Slurm cluster on this one machine, for testing the TorchX Slurm path for real.

Everything lives under one directory (config, keys, database, state, logs, pid files); nothing under
/etc is read or written (the daemons and clients find the config through ``SLURM_CONF``), and every
daemon runs in the foreground as a child of this process with its pid recorded in ``DIR/pids/``:

    munged       its own key and socket (``AuthInfo=socket=...``)
    mariadbd     a private database server on a unix socket only (TorchX 0.7 reads job state with
                 ``sacct``, so accounting through slurmdbd is required)
    slurmdbd     accounting, on that database
    slurmctld    the controller
    slurmd x2    two nodes on one host: the first named after this machine's hostname (TorchX's
                 rendezvous endpoint is the first node's name, so it must resolve), the second
                 ``HOST-n2``; both ``NodeAddr=127.0.0.1``, one CPU each

Shell use (as root; the packages come from ``apt-get install -y slurmctld slurmd slurmdbd slurm-client
munge mariadb-server``)::

    python -m launch.slurm.local_cluster up /tmp/mlet-slurm      # prints `export SLURM_CONF=...`
    export SLURM_CONF=/tmp/mlet-slurm/etc/slurm.conf; sinfo; torchx run -s slurm ...
    python -m launch.slurm.local_cluster down /tmp/mlet-slurm    # stops every daemon by its pid
    python -m launch.slurm.local_cluster run -- CMD ...          # up in a temp dir, CMD, down, rm

``up`` leaves the daemons running after it exits (they are in their own session); ``down`` stops them
by the recorded pids, then any job process still carrying this cluster's ``SLURM_CONF``. In Python,
``with LocalSlurmCluster(path) as cluster:`` does the same and stops everything on exit, also on errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mlet_torchrec.stale import pid_alive

APT_PACKAGES = "slurmctld slurmd slurmdbd slurm-client munge mariadb-server"
APT_COMMAND = f"apt-get install -y {APT_PACKAGES}"
# what the cluster runs (munge, mariadb-server with its client, slurmdbd, slurmctld, slurmd, slurm-client)
BINARIES = (
    "munged",
    "mariadbd",
    "mariadb-install-db",
    "mariadb",
    "slurmdbd",
    "slurmctld",
    "slurmd",
    "sbatch",
    "sacct",
    "sacctmgr",
    "scontrol",
    "sinfo",
)
CLUSTER_NAME = "mletlocal"
# the order daemons start in; they stop in reverse
DAEMONS = ("munged", "mariadbd", "slurmdbd", "slurmctld")


class SlurmUnavailable(RuntimeError):
    """This machine cannot start the local cluster (packages missing, not root, hostname unresolvable)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)), None
    )


def unavailable_reason() -> str | None:
    """One line saying why the local cluster cannot start here, or None when it can."""
    missing = sorted(n for n in BINARIES if _which(n) is None)
    if missing:
        return f"Slurm test cluster: missing {' '.join(missing)}; install with: {APT_COMMAND}"
    if os.geteuid() != 0:
        return "Slurm test cluster: must run as root (slurmd launches jobs, mariadbd drops to the mysql user)"
    host = node_names()[0]
    try:
        socket.gethostbyname(host)
    except OSError:
        return f"Slurm test cluster: this machine's hostname {host!r} does not resolve (TorchX's rendezvous uses it)"
    return None


def node_names(nodes: int = 2) -> list[str]:
    host = socket.gethostname().split(".")[0]
    return [host] + [f"{host}-n{i}" for i in range(2, nodes + 1)]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalSlurmCluster:
    """Start with ``start()`` (or ``with``), stop with ``stop()``; all state under ``root``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        nodes: int = 2,
        cpus_per_node: int = 1,
        real_memory_mb: int = 16384,
        cred_expire_s: int = 10,
    ) -> None:
        self.root = Path(root).resolve()
        self.cred_expire_s = cred_expire_s
        self.nodes = node_names(nodes)
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.etc, self.log, self.pids = self.root / "etc", self.root / "log", self.root / "pids"
        self.conf = self.etc / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket.2"
        self.mysql_socket = self.root / "mysql" / "mysqld.sock"
        self.timings: dict[str, float] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ environment

    @property
    def env(self) -> dict[str, str]:
        """What a Slurm client (sbatch, sacct, torchx) needs to talk to this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env

    def _daemon_env(self) -> dict[str, str]:
        env = self.client_env()
        env["MYSQL_UNIX_PORT"] = str(self.mysql_socket)  # slurmdbd's MariaDB client finds the socket here
        return env

    # ------------------------------------------------------------------ start

    def __enter__(self) -> LocalSlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> LocalSlurmCluster:
        reason = unavailable_reason()
        if reason:
            raise SlurmUnavailable(reason)
        t0 = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # mysql must reach its directory below
        for d in (self.etc, self.log, self.pids, self.root / "state"):
            d.mkdir(exist_ok=True)
        ports = _free_ports(2 + len(self.nodes))
        self.ctld_port, self.dbd_port, self.node_ports = ports[0], ports[1], ports[2:]
        self._write_configs()

        self._start_munge()
        self._start_mariadb(timeout)
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait(lambda: self._ok(["sacctmgr", "-n", "list", "cluster"]), "slurmdbd", timeout)
        self._run(["sacctmgr", "-i", "add", "cluster", CLUSTER_NAME])
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait(
            lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]), "slurmctld", timeout
        )
        for node in self.nodes:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node])
        self._wait(self._nodes_idle, "slurmd (nodes idle)", timeout)
        self.timings["setup_s"] = time.monotonic() - t0
        return self

    def _write_configs(self) -> None:
        host = self.nodes[0]
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        # a requeued job may start again only when its credential expired: 120 s by default, 10 s here
        ctld_auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}\n"
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus_per_node} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN"
            for n, p in zip(self.nodes, self.node_ports, strict=True)
        )
        r = self.root
        (self.etc / "slurm.conf").write_text(f"""# throwaway local cluster (launch/slurm/local_cluster.py)
ClusterName={CLUSTER_NAME}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
{ctld_auth}StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/pids/slurmctld.daemon.pid
SlurmdPidFile={r}/pids/slurmd-%n.daemon.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# heterogeneous jobs (TorchX: one group per node) are scheduled by backfill only: run it every second
SchedulerParameters=bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self.dbd_port}
# for slurmdbd connections the munge socket comes from here, not AuthInfo
AccountingStoragePass={self.munge_socket}
JobCompType=jobcomp/none
MailProg=/bin/true
{nodes}
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (self.etc / "plugstack.conf").write_text("")
        dbd = self.etc / "slurmdbd.conf"
        dbd.write_text(f"""{auth}DbdHost=localhost
DbdPort={self.dbd_port}
SlurmUser=root
PidFile={r}/pids/slurmdbd.daemon.pid
LogFile={r}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
""")
        os.chmod(dbd, 0o600)  # slurmdbd refuses a readable-by-others config

    def _start_munge(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(exist_ok=True)
        os.chmod(d, 0o755)  # munged wants its socket directory reachable by all, the key readable only by it
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn(
            "munged",
            [
                "munged",
                "-F",
                "--key-file",
                str(key),
                "--socket",
                str(self.munge_socket),
                "--pid-file",
                str(d / "munged.daemon.pid"),
                "--log-file",
                str(self.log / "munged.log"),
                "--seed-file",
                str(d / "munged.seed"),
            ],
        )
        self._wait(self.munge_socket.exists, "munged", 30)

    def _start_mariadb(self, timeout: float) -> None:
        d = self.mysql_socket.parent
        d.mkdir(exist_ok=True)
        shutil.chown(d, "mysql", "mysql")
        data = d / "data"
        with open(self.log / "mariadb-install-db.log", "w") as out:
            subprocess.run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    "--user=mysql",
                    f"--datadir={data}",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=timeout,
            )
        self._spawn(
            "mariadbd",
            [
                "mariadbd",
                "--no-defaults",
                "--user=mysql",
                f"--datadir={data}",
                f"--socket={self.mysql_socket}",
                f"--pid-file={d / 'mariadbd.daemon.pid'}",
                "--skip-networking",
                f"--log-error={self.log / 'mariadbd.log'}",
                "--innodb-lock-wait-timeout=900",
                "--innodb-buffer-pool-size=128M",
            ],
        )
        self._wait(
            lambda: self._ok(
                ["mariadb", "--no-defaults", f"--socket={self.mysql_socket}", "-u", "root", "-e", "select 1"]
            ),
            "mariadbd",
            timeout,
        )

    def _spawn(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.log / f"{name}.stdout", "w")
        proc = subprocess.Popen(
            [_which(argv[0]) or argv[0], *argv[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self._daemon_env(),
            cwd=self.root,
            start_new_session=True,
        )
        log.close()
        self._children[name] = proc
        (self.pids / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._children.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with {proc.returncode} while starting {what}; "
                        f"see {self.log}/{name}.stdout and {self.log}/"
                    )
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout:.0f} s; logs in {self.log}")

    def _run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env=self.client_env(), capture_output=True, text=True, timeout=60, check=check
        )

    def _ok(self, argv: Sequence[str]) -> bool:
        try:
            return self._run(argv, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _out(self, argv: Sequence[str]) -> str:
        return self._run(argv, check=False).stdout

    def _nodes_idle(self) -> bool:
        states = dict(
            line.split() for line in self._out(["sinfo", "-h", "-N", "-o", "%N %t"]).splitlines() if line.strip()
        )
        return all(states.get(n, "").startswith("idle") for n in self.nodes)

    # ------------------------------------------------------------------ stop

    def recorded_pids(self) -> dict[str, int]:
        pids = {}
        if self.pids.is_dir():
            for f in self.pids.glob("*.pid"):
                if not f.name.endswith(".daemon.pid"):
                    try:
                        pids[f.stem] = int(f.read_text().split()[0])
                    except (ValueError, IndexError, OSError):
                        pass
        return pids

    def job_pids(self) -> list[int]:
        """Processes (slurmstepd, job steps) that carry this cluster's SLURM_CONF but are no daemon of ours."""
        marker = f"SLURM_CONF={self.conf}".encode()
        daemons = set(self.recorded_pids().values())
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in daemons or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
        return found

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every daemon by its recorded pid (slurmd, slurmctld, slurmdbd, mariadbd, munged), then leftovers."""
        pids = self.recorded_pids()
        order = [n for n in pids if n.startswith("slurmd-")] + [n for n in reversed(DAEMONS) if n in pids]
        for name in order:
            self._terminate(name, pids[name], timeout)
        for pid in self.job_pids():  # job processes a killed slurmd/slurmstepd left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in self.pids.glob("*.pid") if self.pids.is_dir() else []:
            f.unlink(missing_ok=True)

    def _terminate(self, name: str, pid: int, timeout: float) -> None:
        child = self._children.get(name)
        if not pid_alive(pid):
            if child is not None:
                child.poll()
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            if child is not None:
                child.poll()
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if child is not None:
            child.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.slurm.local_cluster", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster under DIR and leave it running")
    up.add_argument("dir")
    down = sub.add_parser("down", help="stop the cluster under DIR by its recorded pids")
    down.add_argument("dir")
    run = sub.add_parser("run", help="start a cluster in a temporary directory, run CMD with SLURM_CONF set, stop it")
    run.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("check", help="say whether the cluster can start here (exit 0) or why not (exit 2)")
    args = p.parse_args(argv)

    if args.cmd == "check" or args.cmd in ("up", "run"):
        reason = unavailable_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        if args.cmd == "check":
            return 0
    if args.cmd == "down":
        LocalSlurmCluster(args.dir).stop()
        print(f"stopped the cluster in {args.dir}")
        return 0
    if args.cmd == "up":
        cluster = LocalSlurmCluster(args.dir)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        print(
            f"# cluster up in {cluster.timings['setup_s']:.1f} s, nodes {' '.join(cluster.nodes)}; "
            f"stop with: python -m launch.slurm.local_cluster down {cluster.root}"
        )
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    root = tempfile.mkdtemp(prefix="mlet-slurm-")
    try:
        with LocalSlurmCluster(root) as cluster:
            print(f"# cluster up in {cluster.timings['setup_s']:.1f} s (SLURM_CONF={cluster.conf})", file=sys.stderr)
            return subprocess.run(command or ["sinfo"], env=cluster.client_env()).returncode
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"# kept {root}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
