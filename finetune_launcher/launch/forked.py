"""Ranks forked from the launcher: the default on one node without GPUs. The launcher has resolved the config and
checked the run already; it imports what every rank needs (torch, transformers, peft, DeepSpeed, the recipe) once and
forks the ranks with torch.multiprocessing (start method "fork"), each with the environment torchrun would give it
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, ...). A rank then starts training at once instead of spending about 7 s
of CPU on the same imports, and the imported code is shared between the ranks' memory.

Forking is safe only while CUDA has not started in the launcher. On an H200 importing peft (through bitsandbytes)
and Liger started it, so GPU machines default to torchrun; should CUDA start here anyway, the launcher names the
import and uses torchrun. A multi-node run needs torchrun's rendezvous."""
import importlib
import os
import signal
import sys

from finetune_launcher import recipe_table
from finetune_launcher.rank_imports import RANK_IMPORTS, leave_out_bitsandbytes
from finetune_launcher.launch import LaunchError
from finetune_launcher.launch.lifetime import die_with_parent, libc

RANK_THREADS_ENV = "FTL_RANK_OMP_NUM_THREADS"  # the caller's OMP_NUM_THREADS, kept for the ranks
RANK_ENTRY = "finetune_launcher.__main__"  # what `python -m finetune_launcher` runs


def compute_single_threaded():
    """Keep this process's OpenMP to one thread (call it before torch is imported; the ranks get the caller's
    OMP_NUM_THREADS back, see finetune_launcher.launch.commands.launch_env). The launcher computes nothing in
    parallel, and must not: libgomp's thread pool does not survive a fork, so a rank forked after the launcher had
    run a parallel region on several threads would hang at its own first one."""
    os.environ.setdefault(RANK_THREADS_ENV, os.environ.get("OMP_NUM_THREADS", ""))
    os.environ["OMP_NUM_THREADS"] = "1"


def fork_unavailable(options):
    """Why the ranks of a launch with these launcher options cannot be forked from the launcher, or None."""
    if int(options.get("--nnodes", "1")) > 1 or "--rdzv-endpoint" in options:
        return "a multi-node run (or a Slurm job) needs torchrun's rendezvous"
    return None


def cuda_started():
    """Whether CUDA has started in this process: a forked child could not use it."""
    return "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized()


def import_rank_modules(cfg):
    """Import, in the launcher, what the ranks of `cfg` will import; returns the module whose import started CUDA
    (the ranks then cannot be forked), or None."""
    leave_out_bitsandbytes(cfg)
    os.environ.setdefault("MPLBACKEND", "Agg")  # the curves are drawn without a display
    for name in (*rank_modules(cfg.recipe), *RANK_IMPORTS):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        if cuda_started():
            return name
    return None


def rank_modules(recipe):
    """The modules a rank of `recipe` runs: the rank's entry and the recipe's `train` part (recipe table)."""
    entry = recipe_table.get(recipe)
    return [RANK_ENTRY, f"{entry.package}.{entry.modules['train'].partition(':')[0]}"]


def rank_environments(env, nproc, master_port):
    """What torchrun sets for each local rank of a one-node run, over the launcher's environment `env`."""
    layout = {"WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": "0",
              "ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port),
              "TORCHELASTIC_RUN_ID": "none"}
    return {rank: dict(env, **layout, RANK=str(rank), LOCAL_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc))
            for rank in range(nproc)}


def start_forked_ranks(resolved, envs):
    """Fork one process per entry of `envs` (local rank -> environment), each running the trainer on the resolved
    config file; returns torch.multiprocessing's ProcessContext (pids, join)."""
    import torch.multiprocessing as mp

    libc()  # loaded here, so a rank only calls into it
    try:
        return mp.start_processes(forked_rank, args=(str(resolved), envs, os.getpid()), nprocs=len(envs),
                                  join=False, start_method="fork")
    except OSError as error:
        raise LaunchError(f"could not start the training processes: {error}") from error


def forked_rank(local_rank, resolved, envs, launcher_pid):
    """A forked rank: it dies with the launcher (a `kill -9` of the launcher alone must not leave it training as an
    orphan), its own environment, the stop signals as a fresh process has them, the thread count the launcher chose,
    then the trainer; it ends with os._exit and never returns into the launcher's code."""
    import traceback

    die_with_parent(launcher_pid, signal.SIGKILL)
    os.environ.clear()
    os.environ.update(envs[local_rank])
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # the launcher's forwarder must not swallow them here
            signal.signal(sig, signal.SIG_DFL)
    try:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        from finetune_launcher import exit_codes

        trainer = importlib.import_module(RANK_ENTRY)  # by name, as torchrun starts `python -m finetune_launcher`
        exit_codes.exit_without_teardown(trainer.exit_for_launcher(*trainer.main(["--resolved", resolved])))
    except BaseException:  # as an uncaught exception in a torchrun rank: the traceback on its stderr, exit 1
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
