"""A real SLURM cluster on loopback for tests: one slurmctld and N slurmd (Debian slurm-wlm), one host.

`LoopbackCluster(tmp).start()` writes a slurm.conf into `tmp`, starts the daemons in the foreground (`-D`) as
children of this process and records their pids; `stop()` cancels what is still queued, waits for the jobs'
steps to end, then stops exactly those pids. Nothing is ever killed by name. Client commands (sbatch, squeue,
scontrol, srun inside jobs) find the cluster through SLURM_CONF, which `start()` exports into os.environ.

Authentication is auth/none + cred/none when the plugins exist (Slurm <= 23.02), so no munged is needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm", "/usr/lib/slurm")


class ClusterUnavailable(RuntimeError):
    """SLURM cannot be installed or started here (the tests skip with this message)."""


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _plugin_dir() -> Optional[Path]:
    for d in PLUGIN_DIRS:
        if Path(d, "proctrack_linuxproc.so").is_file():
            return Path(d)
    return None


def ensure_installed() -> None:
    """Run scripts/install_slurm.sh (a no-op when installed); raise ClusterUnavailable if that cannot work."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("SLURM is not installed and installing it needs root (scripts/install_slurm.sh)")
    if not shutil.which("apt-get"):
        raise ClusterUnavailable("SLURM is not installed and apt-get is not available")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install_slurm.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise ClusterUnavailable(f"scripts/install_slurm.sh failed: {proc.stderr.strip()[-500:]}")


class LoopbackCluster:
    def __init__(self, root: str | Path, nodes: int = 2, cpus_per_node: int = 2, first_job_id: Optional[int] = None):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        # job ids restart when slurmctld starts clean: start from a time-derived id so that ids (and the
        # submitit files named after them) differ between test sessions
        self.first_job_id = first_job_id or (int(time.time()) % 100000) * 10 + 1000
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self._saved_env: dict[str, Optional[str]] = {}

    # -- configuration ----------------------------------------------------------------------------------
    def write_conf(self) -> Path:
        plugins = _plugin_dir()
        if plugins is None:
            raise ClusterUnavailable(f"no SLURM plugin directory found in {PLUGIN_DIRS}")
        if not (plugins / "auth_none.so").is_file():
            raise ClusterUnavailable("this SLURM has no auth/none plugin (removed in 23.11); use munge")
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctl_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=vkdtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/none",
            "CredType=cred/none",
            f"PluginDir={plugins}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            "MessageTimeout=20",
            "SchedulerParameters=sched_interval=1",
            f"FirstJobId={self.first_job_id}",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        return self.conf

    # -- life cycle -------------------------------------------------------------------------------------
    def _spawn(self, key: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{key}.out", "ab")
        self.procs[key] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env(), start_new_session=True)
        out.close()

    def env(self) -> dict:
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self, timeout: float = 30.0) -> LoopbackCluster:
        ensure_installed()
        self.write_conf()
        self._saved_env["SLURM_CONF"] = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        try:
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for name in self.nodes:
                (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
                self._spawn(f"slurmd-{name}", ["slurmd", "-D", "-f", str(self.conf), "-N", name])
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            for key, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterUnavailable(f"{key} exited with {proc.returncode}: {self.log_tail(key)}")
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            last = r.stdout.strip()
            states = dict(line.split() for line in last.splitlines() if len(line.split()) == 2)
            if states and all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"nodes did not become idle in {timeout:.0f}s (sinfo: {last!r}); "
                                 f"slurmctld log: {self.log_tail('slurmctld')}")

    def run(self, argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, env=self.env(), check=check, timeout=timeout)

    def log_tail(self, key: str, n: int = 2000) -> str:
        texts = []
        for p in (self.root / "log" / f"{key}.out", self.root / "log" / f"{key}.log"):
            if p.is_file():
                texts.append(p.read_text(errors="replace")[-n:])
        return "\n".join(texts)

    def job_ids(self) -> list[str]:
        r = self.run(["squeue", "-h", "-o", "%i"], check=False)
        return r.stdout.split() if r.returncode == 0 else []

    def stop(self, timeout: float = 40.0) -> None:
        """Cancel our jobs, wait for them to leave the nodes, then stop the daemons we started, by pid."""
        ctl = self.procs.get("slurmctld")
        if ctl is not None and ctl.poll() is None:
            try:
                ids = self.job_ids()
                if ids:
                    self.run(["scancel", *ids], check=False)
                deadline = time.time() + timeout
                while self.job_ids() and time.time() < deadline:
                    time.sleep(0.5)
            except Exception:
                pass
        # slurmd first (their job steps are gone by now), slurmctld last
        for key in sorted(self.procs, key=lambda k: k == "slurmctld"):
            proc = self.procs[key]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()
        if "SLURM_CONF" in self._saved_env:
            old = self._saved_env.pop("SLURM_CONF")
            if old is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old


if __name__ == "__main__":  # manual use: python tests/slurm_cluster.py DIR  (Ctrl-C stops it)
    import sys
    import tempfile

    cluster = LoopbackCluster(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="slurm-"))
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
