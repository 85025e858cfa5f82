"""Exit codes of every entry point (launchers, trainer, tools, Slurm job), in one place."""

OK = 0
USER_ERROR = 2       # a bad config, DeepSpeed file, dataset, model name or command line; the message says the fix
TRAINING_STOPPED = 3  # a guard stopped the run (non-finite loss or gradients, no supervised token); checkpoint kept
WONT_FIT = 4         # the pre-flight estimate refused the run (--force launches anyway)
NO_HEAD_NODE = 3     # inside a Slurm job: the head node's address for the rendezvous could not be found
INTERRUPTED = 130    # Ctrl-C in a tool


def exit_without_teardown(code):
    """End the process with `code` once its work is written (files closed, process group destroyed): the
    interpreter's teardown of torch, DeepSpeed and transformers takes seconds per process and does nothing for the
    run. Only for the normal end of a launcher or a rank; an exception still ends the process the usual way."""
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
