"""python -m train --config CONFIG [--key value ...]   (normally started by launch/train_*.sh through torchrun)"""
import sys

from train.console import ascii_safe, is_main_process, make_console_safe

USAGE = """usage: python -m train --config CONFIG.yaml [--key value ...]

Every key of the run config can be overridden, e.g. --learning_rate 1e-4 --lora_r 8 --zero 3 --offload.
Keys: see train/config_schema.json; unknown keys are errors."""

EXIT_CONFIG_ERROR = 2


def split_args(argv):
    config_path, rest, i = None, [], 0
    while i < len(argv):
        if argv[i] in ("-h", "--help"):
            print(USAGE)
            sys.exit(0)
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise SystemExit("error: --config needs a path")
            config_path = argv[i + 1]
            i += 2
        elif argv[i].startswith("--config="):
            config_path = argv[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(argv[i])
            i += 1
    return config_path, rest


def main(argv=None):
    make_console_safe()
    from train.config import ConfigError, load_config, parse_overrides
    from train.data import DataError

    try:
        config_path, rest = split_args(sys.argv[1:] if argv is None else argv)
        config = load_config(config_path, parse_overrides(rest))
    except ConfigError as error:
        return fail(error, EXIT_CONFIG_ERROR)
    from train.loop import TrainingError, run

    try:
        return run(config)
    except (ConfigError, DataError) as error:
        return fail(error, EXIT_CONFIG_ERROR)
    except TrainingError as error:
        return fail(error, 3)


def fail(error, code):
    if is_main_process():
        print(ascii_safe(f"error: {error}"), file=sys.stderr, flush=True)
    return code


def record_exit_code(code):
    """torchrun reports any failed worker as exit 1; the launcher reads the trainer's own code from this file."""
    import os

    path = os.environ.get("FTL_EXIT_CODE_FILE")  # one per node (each node's launcher has its own)
    if path and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(path, "w") as f:  # "0 preempted": a clean stop on a signal, checkpoint saved
            f.write(f"{code}{' preempted' if os.environ.get('FTL_PREEMPTED') else ''}\n")
    return code


if __name__ == "__main__":
    sys.exit(record_exit_code(main()))
