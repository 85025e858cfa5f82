"""Real launches for the tests without a fresh interpreter for each. A forkserver per test worker imports the
launcher and everything its ranks import once (torch, transformers, peft, DeepSpeed, diffusers: about 8 CPU-seconds
a launch otherwise); each launch is a child forked from it that runs `finetune_launcher.launch`'s main with the
arguments `launch/<script>` passes (read from the script itself), in the test's environment and working directory,
its output in files. The launcher code, the checks, the forked ranks and the exit code are the real ones; what
differs from `bash launch/train_*.sh` is only the interpreter start, so the tests that check the shell scripts, the
console encoding, the umask or signals to the launcher process run them as a user would (tests.conftest.run_launcher
decides)."""
import multiprocessing
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune_launcher import recipe_table
from finetune_launcher.launch.forked import rank_modules
from finetune_launcher.rank_imports import RANK_IMPORTS

REPO = Path(__file__).resolve().parent.parent
# read by the interpreter or at import: a launch that sets them needs a fresh interpreter
IMPORT_TIME_ENV = ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LC_CTYPE", "LANG", "HF_HUB_OFFLINE",
                   "TRANSFORMERS_OFFLINE", "HF_HOME")
# the launcher's modules, then what its ranks import (the same list the launcher imports before it forks)
PRELOAD = ["tests.forkserver_init", "finetune_launcher.launch.cli", "finetune_launcher.launch.commands",
           "finetune_launcher.launch.prechecks", "finetune_launcher.launch.preflight",
           "finetune_launcher.launch.signals",
           *(module for name in recipe_table.names() for module in rank_modules(name)), *RANK_IMPORTS]
_context = None


def script_arguments(script):
    """What launch/<script> passes to `python -m finetune_launcher.launch` before the user's arguments."""
    for line in (REPO / "launch" / script).read_text().splitlines():
        if line.startswith("ftl_launch "):
            return [word for word in shlex.split(line)[1:] if word != "$@"]
    raise ValueError(f"launch/{script} has no ftl_launch line")


def needs_fresh_interpreter(env):
    return any(env.get(key) != os.environ.get(key) for key in IMPORT_TIME_ENV)


def start(script, args, env, out_dir):
    """Start launch/<script> ARGS through the forkserver, its output to out_dir/stdout and out_dir/stderr; returns
    the child (a multiprocessing Process that leads its own session, with the ranks in it)."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    argv = [*script_arguments(script), *map(str, args)]
    outputs = [str(Path(out_dir) / name) for name in ("stdout", "stderr")]
    child = _context.Process(target=run_launcher_main, args=(argv, dict(env), str(REPO), *outputs))
    child.start()
    return child


def kill(child, first=None):
    """SIGKILL the launcher and its ranks at once (a node failure), then reap the launcher. With `first` (SIGABRT:
    each process prints its Python stack, tests/forkserver_init.py) that signal goes to them a second before."""
    try:
        if first is not None:
            os.killpg(child.pid, first)
            time.sleep(1)
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.join()


def launch(script, args, env, timeout):
    """launch/<script> ARGS through the forkserver; a CompletedProcess as subprocess.run(capture_output=True)."""
    shown = ["bash", f"launch/{script}", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="ftl-test-launch-") as scratch:
        child = start(script, args, env, scratch)
        child.join(timeout)
        timed_out = child.is_alive()
        if timed_out:
            kill(child, first=signal.SIGABRT)  # where it hangs, in the stacks its processes print
        out, err = ((Path(scratch) / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        if timed_out:
            print(f"STDOUT (tail):\n{out[-4000:]}\nSTDERR (tail, with the stacks):\n{err[-12000:]}", file=sys.stderr)
            raise subprocess.TimeoutExpired(shown, timeout, out, err)
        return subprocess.CompletedProcess(shown, child.exitcode, out, err)


def run_launcher_main(argv, env, cwd, out_path, err_path):
    """In the forked child: the test's environment and directory, output to the files, then the launcher."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    recipe_table._plugins_loaded = False  # import the recipes the test's FTL_RECIPES names (preloaded: none)
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    from finetune_launcher import exit_codes
    from finetune_launcher.launch.cli import main

    exit_codes.exit_without_teardown(main(argv))
