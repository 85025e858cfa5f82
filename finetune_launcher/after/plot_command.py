"""Training and eval loss, learning rate and throughput curves from training_history.json into a PNG, with the same
code the trainer runs at the end of a run. Works on a run still in progress (the trainer rewrites the file
atomically after every logged step).

    ftl plot outputs/tiny_lora/training_history.json --out curves.png
    ftl plot outputs/tiny_lora          # a run directory; writes training_curves.png there
"""
import argparse
import sys
from pathlib import Path

from finetune_launcher.console import ascii_safe

HISTORY_FILE = "training_history.json"
DEFAULT_PNG = "training_curves.png"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="ftl plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("history", help=f"{HISTORY_FILE}, or the run directory that holds it")
    parser.add_argument("--out", help=f"PNG to write (default: {DEFAULT_PNG} beside the history file)")
    return parser.parse_args(argv)


def history_path(argument):
    path = Path(argument)
    if path.is_dir():
        path = path / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no training history at {path}; pass outputs/<run_name>/{HISTORY_FILE} (it appears "
                                f"after the first logged step)")
    return path


def summary(history):
    records, evals = history.get("records", []), history.get("evals", [])
    parts = [f"status {history.get('status', '?')}", f"{len(records)} logged steps"]
    if records:
        parts.append(f"last step {records[-1].get('step')} loss {records[-1].get('loss')}")
    if evals:
        parts.append(f"{len(evals)} evals, last eval loss {evals[-1].get('eval_loss')}")
    best = history.get("best")
    if best:
        parts.append(f"best step {best['step']} (eval loss {best['eval_loss']:.4f})")
    return ", ".join(parts)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from finetune_launcher.history import load_history, plot_history

    path = history_path(args.history)
    try:
        history = load_history(path)
    except ValueError as exc:
        raise FileNotFoundError(f"{path} is not valid JSON ({exc}); it is rewritten atomically, so this is not a "
                                f"half-written file: check that it is a training_history.json") from None
    out = Path(args.out) if args.out else path.with_name(DEFAULT_PNG)
    plot_history(history, out)
    print(ascii_safe(f"{summary(history)}\nwrote {out}"))
    return 0
