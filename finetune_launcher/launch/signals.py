"""Stop signals around the launcher: SIGTERM / SIGUSR1 sent to `launch/train_*.sh` reach the training ranks, which
save a checkpoint at their next step and exit 0; inside a Slurm step (srun) the launcher ignores both, since Slurm
signals every process of the step itself. And no rank outlives the launcher: a `kill -9` of the launcher alone takes
its forked ranks, or the launcher tool (torchrun, accelerate, DeepSpeed's runner) and through it its workers, along
(see die_with_parent)."""
import functools
import os
import signal
import subprocess
import time

from finetune_launcher.launch.forked import start_forked_ranks
from finetune_launcher.launch.lifetime import die_with_parent, libc

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def run_and_report(cmd, env, code_file):
    """Run the launcher command; return the trainer's own exit code, which the ranks write to `code_file` (torchrun
    turns every failure into 1, and the ranks exit 0 after an error they all saw alike). SIGTERM / SIGUSR1 received
    meanwhile are passed to the training ranks (see StopForwarder)."""
    env = dict(env, FTL_EXIT_CODE_FILE=str(code_file))
    with StopForwarder(code_file) as forwarder:
        returncode = forwarder.run(cmd, env)
    return trainer_exit_code(returncode, code_file, forwarder)


def fork_and_report(resolved, envs, code_file):
    """As run_and_report, for ranks forked from this process (finetune_launcher.launch.forked): `envs` maps each local
    rank to its environment."""
    envs = {rank: dict(env, FTL_EXIT_CODE_FILE=str(code_file)) for rank, env in envs.items()}
    with StopForwarder(code_file) as forwarder:
        returncode = forwarder.watch(start_forked_ranks(resolved, envs))
    # Here a failure is a rank's own (no launcher tool between): it wins over what the others recorded.
    return returncode or trainer_exit_code(returncode, code_file, forwarder)


def trainer_exit_code(returncode, code_file, forwarder):
    """The code the ranks wrote to `code_file` where there is one, else the launcher tool's `returncode`."""
    from pathlib import Path

    code_file = Path(code_file)
    words = code_file.read_text().split() if code_file.exists() else []
    if words and words[0].isdigit():
        # After a stop signal the launcher tool itself may report a failure (it was signalled too: the whole process
        # group, or Slurm) although the ranks saved their checkpoint and exited 0: the trainer's code wins then.
        trainer_code = int(words[0])
        if (returncode == 0 or trainer_code != 0 or forwarder.received or forwarder.killed_lingering
                or "preempted" in words):
            return trainer_code
    return returncode


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

    Forked ranks (finetune_launcher.launch.forked) are known by their PIDs instead, and wait for the signal the same
    way.

    Inside a Slurm step the launcher ignores both signals instead (the child inherits that; torchrun and the
    trainer install their own handlers): Slurm has signalled every process of the step already."""

    POLL_S = 0.5
    GRACE_S = 10  # after a forked rank fails, how long the others get to end by themselves before SIGTERM / SIGKILL
    LINGER_S = 60  # after local rank 0 recorded the run's exit code, how long the other ranks get to exit

    def __init__(self, code_file=None):
        self.received = []   # signal numbers, in the order they came
        self.sent = {}       # signal number -> pids of the ranks it has been passed to
        self.previous = {}
        self.code_file = code_file
        self.ended_at = None  # when the code file appeared (monotonic seconds)
        self.killed_lingering = False

    def install(self):
        slurm = in_slurm_step()
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, signal.SIG_IGN if slurm else self._on_signal)
        return self

    def __enter__(self):
        return self.install()

    def __exit__(self, *_exc):
        self.uninstall()

    def uninstall(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _on_signal(self, signum, _frame):
        self.received.append(signum)
        self.sent[signum] = set()  # (again) to every rank

    def run(self, cmd, env):
        """Popen + wait (as subprocess.run), passing stop signals on while the command runs; returns its code. The
        command gets SIGTERM should this process die first: torchrun (also under accelerate) and DeepSpeed's runner
        stop their workers on SIGTERM (not on SIGKILL, which would leave them running in their own sessions)."""
        parent_death = functools.partial(die_with_parent, os.getpid(), signal.SIGTERM, libc())
        with subprocess.Popen(cmd, env=env, preexec_fn=parent_death) as proc:
            try:
                while True:
                    try:
                        return proc.wait(timeout=self.POLL_S)
                    except subprocess.TimeoutExpired:
                        if self.sent:
                            self.forward(training_ranks(proc.pid))
                        if self.lingering():
                            self.kill_lingering(training_ranks(proc.pid))
            except BaseException:  # KeyboardInterrupt included, as subprocess.run does
                proc.kill()
                raise

    def watch(self, ranks):
        """Wait for forked ranks (a torch.multiprocessing ProcessContext), passing stop signals on; returns 0, or
        the exit code of the first rank that failed (the others are then stopped, as torchrun does)."""
        import torch.multiprocessing as mp

        try:
            while not ranks.join(timeout=self.POLL_S, grace_period=self.GRACE_S):
                if self.sent:
                    self.forward(ranks.pids())
                if self.lingering():  # only the living: an exited rank's pid may be another process's by now
                    self.kill_lingering([process.pid for process in ranks.processes if process.is_alive()])
        except mp.ProcessExitedException as failed:
            if self.killed_lingering:
                return 0  # the code the ranks recorded decides
            return failed.exit_code if failed.exit_code > 0 else 128 - failed.exit_code
        except BaseException:
            for process in ranks.processes:
                process.kill()
            raise
        return 0

    def lingering(self):
        """Whether the ranks still running should have exited: local rank 0 recorded the run's exit code (the last
        thing it does) LINGER_S ago. Every rank ends at the same step, so such a rank is stuck (seen: a C++ teardown
        blocked on gloo, fixed in finetune_launcher.__main__) and would hold the job's machines forever."""
        if self.killed_lingering or self.code_file is None:
            return False
        if self.ended_at is None:
            if not os.path.exists(self.code_file):
                return False
            self.ended_at = time.monotonic()
        return time.monotonic() - self.ended_at >= self.LINGER_S

    def kill_lingering(self, ranks):
        """SIGKILL the rank PIDs `ranks` that are still running, saying so."""
        killed = []
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                continue
        self.killed_lingering = True
        if killed:
            print(f"[launch] the run ended (local rank 0 exited), but rank process(es) "
                  f"{', '.join(map(str, sorted(killed)))} had not exited {self.LINGER_S} s later: killed them",
                  flush=True)

    def forward(self, ranks):
        """Pass each signal received to each of the rank PIDs `ranks` that has not had it, once it catches it."""
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
