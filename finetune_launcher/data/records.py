"""Reading training records: JSONL line by line (errors name the file and line) or anything `datasets` loads;
format detection and field checks for dolly, alpaca, chat and text records."""
import json
import random
from pathlib import Path

from finetune_launcher.errors import DataError  # noqa: F401 (re-exported)

FORMAT_FIELDS = {
    "dolly": (("instruction", "response"), ("context",)),
    "alpaca": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "text": (("text",), ()),
}


def read_jsonl(path):
    """Yield (line_number, record) from a JSONL file, with errors that name the file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                f"each line must be one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def load_records(source, split="train"):
    """Return (records, line_numbers, source_name). Local .jsonl is read line by line (exact error locations);
    other local files and hub names go through `datasets`."""
    path = Path(source)
    if path.suffix == ".jsonl" or (path.exists() and path.suffix == ".json" and _looks_like_jsonl(path)):
        numbered = list(read_jsonl(path))
        return [r for _, r in numbered], [n for n, _ in numbered], str(path)
    import datasets

    datasets.disable_progress_bars()
    if path.exists():
        kind = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}.get(path.suffix)
        if kind is None:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .csv, .parquet or .txt")
        loaded = datasets.load_dataset(kind, data_files=str(path), split="train")
    else:
        name, _, config_name = str(source).partition(":")
        try:
            loaded = datasets.load_dataset(name, config_name or None, split=split)
        except Exception as exc:  # offline, wrong name, ...: say what was tried
            raise DataError(f"dataset '{source}' is neither a local file nor a loadable hub dataset "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from None
    records = list(loaded)
    return records, list(range(1, len(records) + 1)), str(source)


def _looks_like_jsonl(path):
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
    return first == "{"


def detect_format(record, source):
    keys = set(record)
    for name, (required, _) in FORMAT_FIELDS.items():
        if set(required) <= keys:
            return name
    expected = "; ".join(f"{n}: {', '.join(r + o)}" for n, (r, o) in FORMAT_FIELDS.items())
    raise DataError(f"{source}: line 1 has fields {sorted(keys)}, which match no known format. "
                    f"Expected one of -- {expected}. Rename the fields or set dataset_format")


def check_fields(records, line_numbers, fmt, source):
    required, optional = FORMAT_FIELDS[fmt]
    for record, number in zip(records, line_numbers):
        missing = [k for k in required if k not in record]
        if missing:
            raise DataError(f"{source}:{number}: missing field(s) {missing} for format '{fmt}' "
                            f"(expected {list(required)} and optionally {list(optional)}; found {sorted(record)})")
        for key in required + optional:
            value = record.get(key)
            if fmt == "chat" and key == "messages":
                _check_messages(value, f"{source}:{number}")
            elif value is not None and not isinstance(value, str):
                raise DataError(f"{source}:{number}: field '{key}' must be a string, got {type(value).__name__}")


def _check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}].role is '{message['role']}'; use system, user or assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this conversation")


def seeded_split(items, fraction, seed):
    """(kept, held out): a seeded `fraction` of `items` (at least one) held out, both in their original order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(items) * fraction))
    return [items[i] for i in sorted(order[n_held:])], [items[i] for i in sorted(order[:n_held])]
