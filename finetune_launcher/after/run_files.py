"""Reading what a run wrote beside its weights (training_info.json), and the error every tool after training
raises for a model, adapter or directory the user named."""
import json
from pathlib import Path

TRAINING_INFO = "training_info.json"


class AdapterError(ValueError):
    """A problem with a model or adapter the user named; the message says which path and what to pass instead."""


def read_json_file(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the file is damaged, "
                           f"re-save the weights or pass the base with --base") from None


def read_training_info(directory):
    path = Path(directory) / TRAINING_INFO
    return read_json_file(path) if path.is_file() else {}
