"""python -m finetune_launcher --config CONFIG [--key value ...]   (normally started by launch/train_*.sh through
torchrun, with --resolved FILE: the run config the launcher resolved once for every rank)"""
import os
import sys

from finetune_launcher import exit_codes
from finetune_launcher.console import ascii_safe, is_main_process, make_console_safe

USAGE = """usage: python -m finetune_launcher --config CONFIG.yaml [--key value ...]
       python -m finetune_launcher --resolved RUN_CONFIG.json      (what the launchers pass each rank)

Every key of the run config can be overridden, e.g. --learning_rate 1e-4 --lora_r 8 --zero 3 --offload.
Keys: `ftl keys` lists them; unknown keys are errors."""


def main(argv=None):
    make_console_safe()
    from finetune_launcher.config import RunConfig, resolve_run_config, split_command_line
    from finetune_launcher.errors import UserError
    from finetune_launcher.guards import TrainingError

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        return exit_codes.OK, False
    try:
        config_path, options, overrides = split_command_line(argv, value_options=("--resolved",))
        if "--resolved" in options:
            cfg = RunConfig.from_json_file(options["--resolved"])
        else:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
            cfg = resolve_run_config(config_path, overrides, procs_per_node=local, nnodes=max(1, world // local))
        from finetune_launcher.rank_imports import leave_out_bitsandbytes

        leave_out_bitsandbytes(cfg)
        from finetune_launcher.rank import run

        outcome = run(cfg)
        return outcome.code, outcome.preempted
    except UserError as error:
        return fail(error, exit_codes.USER_ERROR), False
    except TrainingError as error:
        return fail(error, exit_codes.TRAINING_STOPPED), False


# The error that stopped this rank, kept to the process's end: through its traceback it holds the failed step's
# engine and model. Freed after the process group is gone (and a peer may have exited already), a DDP model's C++
# teardown can block forever (seen on gloo: a rank that printed its error never exited). The rank ends with
# os._exit (exit_codes.exit_without_teardown), so nothing is freed.
_stopped_by = []


def fail(error, code):
    _stopped_by.append(error)
    if is_main_process():
        print(ascii_safe(f"error: {error}"), file=sys.stderr, flush=True)
    return code


def exit_for_launcher(code, preempted):
    """The process's exit status. Under our launcher (FTL_EXIT_CODE_FILE set) the trainer's own code goes to that
    file and a rank that stopped on an error every rank saw alike (config, data, a guard) exits 0, so torchrun ends
    quietly instead of printing its ChildFailedError report over our message; the launcher then exits with the
    code from the file."""
    path = os.environ.get("FTL_EXIT_CODE_FILE")  # one per node (each node's launcher has its own)
    if not path:
        return code
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(path, "w") as f:  # "0 preempted": a clean stop on a signal, checkpoint saved
            f.write(f"{code}{' preempted' if preempted else ''}\n")
    return exit_codes.OK


if __name__ == "__main__":
    exit_codes.exit_without_teardown(exit_for_launcher(*main()))
