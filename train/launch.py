"""The launcher behind launch/train_*.sh: validate the run config, count GPUs, pick a free port, run the
pre-flight estimate, then print and run the torchrun (or accelerate / deepspeed) command. Exit code = the trainer's.
SIGTERM or SIGUSR1 sent to it reach the training ranks, which save a checkpoint at their next step and exit 0; inside
a Slurm step (srun) it ignores both, since Slurm signals every process of the step itself.

usage: python -m train.launch --mode lora|qlora|full [CONFIG.yaml] [launcher options] [--key value ...]
launcher options:
  --launcher torchrun|accelerate|deepspeed   how processes are started (default torchrun)
  --nproc-per-node N     processes per node (default: GPU count; 2 on a CPU machine)
  --nnodes N --node-rank R --master-addr HOST --master-port P   multi-node (Slurm sets these for you)
  --rdzv-endpoint HOST:PORT --rdzv-id ID                         torchrun c10d rendezvous (multi-node)
  --force                launch even when the pre-flight estimate says the run will not fit
  --no-preflight         skip the estimate
  --dry-run              print the command and exit
Anything else is a run-config override (--lora_r 8, --zero 3, --offload, --max_steps 100, ...).
"""
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from train import REPO_ROOT
from train.console import ascii_safe, make_console_safe

LAUNCHERS = ("torchrun", "accelerate", "deepspeed")
VALUE_OPTIONS = {"--mode", "--launcher", "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr",
                 "--master-port", "--rdzv-endpoint", "--rdzv-id"}
FLAG_OPTIONS = {"--force", "--no-preflight", "--dry-run"}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class LaunchError(ValueError):
    pass


def parse_launch_args(argv):
    options = {"--launcher": "torchrun"}
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        if arg in VALUE_OPTIONS:
            if i + 1 >= len(argv):
                raise LaunchError(f"{arg} needs a value")
            options[arg], i = argv[i + 1], i + 2
        elif arg in FLAG_OPTIONS:
            options[arg], i = True, i + 1
        elif not arg.startswith("--") and config_path is None and not overrides:
            config_path, i = arg, i + 1
        else:
            overrides.append(arg)
            i += 1
    if options["--launcher"] not in LAUNCHERS:
        raise LaunchError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got '{options['--launcher']}'")
    mode = options.get("--mode")
    if mode not in ("lora", "qlora", "full"):
        raise LaunchError("--mode must be lora, qlora or full")
    config_path = config_path or str(REPO_ROOT / "configs" / f"tiny_{mode}.yaml")
    return options, config_path, overrides


def gpu_count():
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def processes_per_node(options):
    if "--nproc-per-node" in options:
        return int(options["--nproc-per-node"])
    gpus = gpu_count()
    return gpus if gpus > 0 else int(os.environ.get("FTL_CPU_PROCS", "2"))


def launch_env(nproc):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".cache" / "torch_extensions"))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(1, nproc))))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # Never NVLink multicast (NVLS): it hangs or is refused on shared hosts.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # torchrun (also under accelerate) passes USR1 on to its workers instead of dying of it and leaving them
    # running, when it is signalled itself (the whole process group, or Slurm).
    env.setdefault("PET_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    return env


def trainer_args(config_path, overrides):
    return ["-m", "train", "--config", str(config_path), *overrides]


def torchrun_command(python, nproc, options, config_path, overrides):
    from train.engine import free_port

    cmd = [python, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    if "--rdzv-endpoint" in options:
        cmd += ["--nnodes", options.get("--nnodes", "1"), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", options["--rdzv-endpoint"], "--rdzv_id", options.get("--rdzv-id", "ftl")]
    else:
        cmd += ["--nnodes", options.get("--nnodes", "1"), "--node_rank", options.get("--node-rank", "0"),
                "--master_addr", options.get("--master-addr", "127.0.0.1"),
                "--master_port", options.get("--master-port", str(free_port()))]
    return cmd + trainer_args(config_path, overrides)


def build_command(options, nproc, config_path, overrides, run_dir):
    python = sys.executable
    launcher = options["--launcher"]
    if launcher == "torchrun":
        return torchrun_command(python, nproc, options, config_path, overrides)
    from train import launchers

    if launcher == "accelerate":
        return launchers.accelerate_command(python, nproc, options, config_path, overrides, run_dir)
    return launchers.deepspeed_command(python, nproc, options, config_path, overrides, run_dir)


def main(argv=None):
    make_console_safe()
    from train.config import ConfigError, load_config, parse_overrides

    argv = sys.argv[1:] if argv is None else argv
    if in_slurm_step():
        ignore_stop_signals()  # from the start: a USR1 during the pre-flight must not kill this task of the step
    try:
        options, config_path, overrides = parse_launch_args(argv)
        config = load_config(config_path, parse_overrides(overrides))
        if config["mode"] != options["--mode"]:
            raise LaunchError(f"{config_path} has mode: {config['mode']}, but this is the {options['--mode']} "
                              f"launcher; use launch/train_{config['mode']}.sh or change mode")
    except (LaunchError, ConfigError) as error:
        print(ascii_safe(f"error: {error}"), file=sys.stderr)
        return 2
    nproc = processes_per_node(options)
    nnodes = int(options.get("--nnodes", "1"))
    if not options.get("--no-preflight"):
        from train.preflight import preflight

        verdict = preflight(config, nproc, nnodes)
        if verdict is not None and not verdict.fits and not options.get("--force"):
            print(ascii_safe(f"error: {verdict.refusal}"), file=sys.stderr)
            return 4
    run_dir = Path(config["output_dir"]) / config["run_name"]
    cmd = build_command(options, nproc, config_path, overrides, run_dir)
    print(ascii_safe("+ " + " ".join(shlex.quote(c) for c in cmd)), flush=True)
    if options.get("--dry-run"):
        return 0
    return run_and_report(cmd, launch_env(nproc))


def run_and_report(cmd, env):
    """Run the launcher command; return the trainer's own exit code (torchrun turns every failure into 1).
    SIGTERM / SIGUSR1 received meanwhile are passed to the training ranks (see StopForwarder)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ftl-") as scratch:
        code_file = Path(scratch) / "exit_code"
        env = dict(env, FTL_EXIT_CODE_FILE=str(code_file))
        forwarder = StopForwarder().install()
        try:
            returncode = forwarder.run(cmd, env)
        finally:
            forwarder.uninstall()
        if returncode != 0 and code_file.exists():
            words = code_file.read_text().split()
            if words and words[0].isdigit() and (int(words[0]) != 0 or forwarder.received or "preempted" in words):
                # The trainer's own code; after a stop signal also its 0 (checkpoint saved), when the launcher
                # tool itself was signalled too (the whole process group, or Slurm) and reports a failure.
                return int(words[0])
        return returncode


# ---------------------------------------------------------------- stop signals (preemption, `kill`)

def in_slurm_step(env=None):
    """Inside an srun step (our sbatch job), where Slurm signals every process of the step, the ranks included."""
    return bool((os.environ if env is None else env).get("SLURM_STEP_ID"))


def ignore_stop_signals():
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopForwarder:
    """Pass SIGTERM / SIGUSR1 received by the launcher (`kill -USR1 <pid>`, a container stop, a scheduler that
    signals only the first process) to the training ranks: the trainer then saves a checkpoint at its next step and
    exits 0, and the launcher tool (torchrun, accelerate, DeepSpeed's runner) ends as after a normal finish.

    The signal goes to the ranks, not to the launcher tool: torchrun (accelerate runs it) handles USR1 only when
    told, and on a signal it kills its workers after its shutdown timeout (30 s by default) and exits 1; DeepSpeed's
    launcher kills its workers at once on TERM and dies on USR1. A rank is a process under the launcher tool with
    LOCAL_RANK in its environment whose parent is not one (so not a data loader or compile worker of a rank). Each
    rank is signalled as soon as it catches the signal (/proc/PID/status SigCgt): the trainer installs its handler
    after its imports, and before that the signal would kill it. Ranks that start later get it too.

    Inside a Slurm step the launcher ignores both signals instead (the child inherits that; torchrun and the
    trainer install their own handlers): Slurm has signalled every process of the step already."""

    POLL_S = 0.5

    def __init__(self):
        self.received = []   # signal numbers, in the order they came
        self.sent = {}       # signal number -> pids of the ranks it has been passed to
        self.previous = {}

    def install(self):
        slurm = in_slurm_step()
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, signal.SIG_IGN if slurm else self._on_signal)
        return self

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _on_signal(self, signum, _frame):
        self.received.append(signum)
        self.sent[signum] = set()  # (again) to every rank

    def run(self, cmd, env):
        """Popen + wait (as subprocess.run), passing stop signals on while the command runs; returns its code."""
        with subprocess.Popen(cmd, env=env) as proc:
            try:
                while True:
                    try:
                        return proc.wait(timeout=self.POLL_S)
                    except subprocess.TimeoutExpired:
                        self.forward(proc.pid)
            except BaseException:  # KeyboardInterrupt included, as subprocess.run does
                proc.kill()
                raise

    def forward(self, root_pid):
        if not self.sent:
            return
        ranks = training_ranks(root_pid)
        for signum, done in list(self.sent.items()):  # a signal may arrive meanwhile
            new = [pid for pid in ranks if pid not in done and catches_signal(pid, signum)]
            for pid in new:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    continue
                done.add(pid)
            if new:
                print(f"[launch] {signal.Signals(signum).name} received: passed to training rank process(es) "
                      f"{', '.join(map(str, sorted(new)))}; they save a checkpoint at their next step and exit",
                      flush=True)


def training_ranks(root_pid):
    """PIDs of the training ranks under `root_pid` (see StopForwarder)."""
    import psutil

    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    ranks = {}
    for proc in procs:
        try:
            if "LOCAL_RANK" in proc.environ():
                ranks[proc.pid] = proc.ppid()
        except psutil.Error:  # gone, a zombie, or not ours to read
            continue
    return [pid for pid, parent in ranks.items() if parent not in ranks]


def catches_signal(pid, signum):
    """Whether `pid` has a handler for `signum` installed (Linux: SigCgt in /proc); True where /proc cannot tell."""
    if not os.path.isdir("/proc/self"):
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
