"""A real Slurm on this one machine, for the tests: munged, slurmctld and two slurmd node entries (n1, n2) on
localhost, everything (config, state, spool, logs, pid files, munge socket) under one scratch directory.

usage: python tests/slurm/local_slurm.py start DIR   # installs slurm-wlm + munge when missing (root, apt), starts
       python tests/slurm/local_slurm.py stop DIR    # stops the daemons started in DIR, by the PIDs in DIR/run
Then export SLURM_CONF=DIR/etc/slurm.conf for sbatch, srun, squeue, scontrol.

Standard library only (it may run before any virtual environment exists). Ports are picked free at start, and
munged listens on its own socket, so two checkouts can run their tests on one host at the same time.
"""
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

NODES = ("n1", "n2")
PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (not root, no apt-get, ...); the message says why."""


def log(msg):
    print(f"[local-slurm] {msg}", file=sys.stderr, flush=True)


def conf_path(root):
    return Path(root) / "etc" / "slurm.conf"


def env_for(root):
    return {**os.environ, "SLURM_CONF": str(conf_path(root))}


def ensure_installed():
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get to install them")
    log("installing slurm-wlm and munge with apt-get (about 10 s)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def write_conf(root, cpus_per_node):
    root = Path(root)
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = free_ports(1 + len(NODES))
    lines = [
        "ClusterName=ftltest",
        # Job ids differ between clusters on one host (two checkouts testing at once): the sbatch derives its
        # rendezvous port from the job id.
        f"FirstJobId={random.randrange(1000, 900000)}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root", "SlurmdUser=root",
        f"AuthInfo=socket={root}/munge/munge.socket,cred_expire=10",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2", "KillWait=15",
        "SlurmdParameters=config_overrides",
        "SchedulerParameters=sched_interval=2,bf_interval=1",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/run/slurmctld.pid", f"SlurmdPidFile={root}/run/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "SlurmctldDebug=info", "SlurmdDebug=info",
    ]
    for name, port in zip(NODES, node_ports):
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                     f"CPUs={cpus_per_node} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    path = conf_path(root)
    path.write_text("\n".join(lines) + "\n")
    return path


def run(cmd, root, check=True, **kw):
    proc = subprocess.run(cmd, env=env_for(root), capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def start_munged(root):
    mdir = Path(root) / "munge"
    mdir.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(mdir, "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        run(["runuser", "-u", "munge", "--", "mungekey", "-c"], root)
    # As root munged refuses to start ("Logfile is insecure"): run it as the munge user.
    run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={mdir}/munge.socket",
         f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"], root)
    pid = wait_for_file(mdir / "munged.pid", "munged")
    # munged deletes its pid file on exit: keep a copy for stop().
    (Path(root) / "run" / "munged.pid").write_text(pid + "\n")


def wait_for_file(path, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise SlurmUnavailable(f"{what} did not write {path} within {timeout} s")


def start(root, cpus_per_node=8, timeout=60):
    """Start munged, slurmctld, slurmd n1 and n2 under `root`; return the slurm.conf path once both nodes are idle.
    Each node claims `cpus_per_node` CPUs (more than the host has is fine: jobs of one CPU per node then run side by
    side)."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmctld/slurmd on this machine needs root")
    ensure_installed()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged (user munge) must reach its socket directory
    for sub in ("etc", "state", "run", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    conf = write_conf(root, cpus_per_node)
    try:
        start_munged(root)
        run(["/usr/sbin/slurmctld", "-f", str(conf)], root)
        wait_for_file(root / "run" / "slurmctld.pid", "slurmctld")
        for node in NODES:
            run(["/usr/sbin/slurmd", "-f", str(conf), "-N", node], root)
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = run(["sinfo", "-h", "-t", "idle", "-o", "%D"], root, check=False)
            if proc.returncode == 0 and proc.stdout.strip() == str(len(NODES)):
                log(f"slurm up: nodes {', '.join(NODES)} idle; export SLURM_CONF={conf}")
                return conf
            time.sleep(0.2)
        sinfo = run(["sinfo", "-N", "-l"], root, check=False)
        raise SlurmUnavailable(f"nodes not idle after {timeout} s:\n{sinfo.stdout}{sinfo.stderr}\n"
                               f"see {root}/log/")
    except BaseException:
        stop(root)
        raise


def daemon_pids(root):
    """(name, pid) of every daemon started under root, slurmds first, munged last."""
    run_dir = Path(root) / "run"
    order = [f"slurmd-{n}.pid" for n in NODES] + ["slurmctld.pid", "munged.pid"]
    found = []
    for name in order:
        path = run_dir / name
        if path.exists():
            text = path.read_text().strip()
            if text.isdigit():
                found.append((name[:-4], int(text)))
    return found


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cancel_all_jobs(root, timeout=20):
    """Cancel this cluster's jobs and wait for their steps to end, so no slurmstepd outlives the daemons."""
    jobs = run(["squeue", "-h", "-o", "%i"], root, check=False, timeout=10).stdout.split()
    if not jobs:
        return
    run(["scancel", *jobs], root, check=False, timeout=10)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not run(["squeue", "-h", "-o", "%i"], root, check=False, timeout=10).stdout.split():
            return
        time.sleep(0.5)
    log(f"jobs {' '.join(jobs)} still listed {timeout} s after scancel")


def stop(root, timeout=15):
    """Stop, by PID, the daemons this directory's start() started (jobs still running are killed with slurmd)."""
    root = Path(root)
    pids = daemon_pids(root)
    if any(name == "slurmctld" and alive(pid) for name, pid in pids):
        cancel_all_jobs(root)
    for name, pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + timeout
            while alive(pid) and time.time() < deadline:
                time.sleep(0.05)
            if alive(pid):
                log(f"{name} (pid {pid}) ignored SIGTERM; killing it")
                os.kill(pid, signal.SIGKILL)
    (root / "run" / "munged.pid").unlink(missing_ok=True)
    return pids


def main(argv):
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if argv[0] == "start":
            print(start(argv[1]))
        else:
            for name, pid in stop(argv[1]):
                log(f"stopped {name} (pid {pid})")
    except SlurmUnavailable as error:
        log(f"error: {error}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
