"""Reading training records: JSONL line by line (errors name the file and line) or anything `datasets` loads;
format detection and field checks for dolly, alpaca, chat and text records. Every line of a file is checked before
one error is raised: it names the first bad line and how many there are (BadLines)."""
import contextlib
import json
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from finetune_launcher.errors import DataError  # noqa: F401 (re-exported)

FORMAT_FIELDS = {
    "dolly": (("instruction", "response"), ("context",)),
    "alpaca": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "text": (("text",), ()),
}
Item = TypeVar("Item")


class BadLines:
    """The bad lines of one data file, gathered while every line is checked, so that the one error names the first
    bad line and how many there are (a file is fixed in one pass, not one line per run). Each entry is the first
    problem of a line, keyed by its "file:line"."""

    def __init__(self) -> None:
        self.found = {}

    def add(self, where: str, message: str) -> None:
        self.found.setdefault(where, message)

    @contextlib.contextmanager
    def checking(self, where: str) -> Iterator[None]:
        """Record a DataError raised in the block as the problem of `where` ("file:line"), and go on."""
        try:
            yield
        except DataError as error:
            self.add(where, str(error))

    def raise_first(self) -> None:
        """DataError naming the first bad line (and the others' line numbers), if any line was bad."""
        if not self.found:
            return
        ordered = sorted(self.found, key=_file_and_line)
        first, others = self.found[ordered[0]], [str(_file_and_line(where)[1]) for where in ordered[1:]]
        if others:
            listed = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            first += f" [the first of {len(ordered)} bad lines in {_file_and_line(ordered[0])[0]}; also line(s) " \
                     f"{listed}]"
        raise DataError(first)


def _file_and_line(where: str) -> tuple[str, int]:
    file, _, line = where.rpartition(":")
    return (file, int(line)) if line.isdigit() else (where, 0)


@contextlib.contextmanager
def checked_lines(bad_lines: BadLines | None = None) -> Iterator[BadLines]:
    """The BadLines to gather a file's problems in: `bad_lines` when the caller gathers across several checks
    (and raises itself), else a new one raised at the end of the block."""
    if bad_lines is not None:
        yield bad_lines
        return
    bad_lines = BadLines()
    yield bad_lines
    bad_lines.raise_first()


def read_jsonl(path: str | Path, bad_lines: BadLines | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) from a JSONL file; malformed lines are skipped and gathered in `bad_lines`
    (else raised, the first of them with their count, once the file is read)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    with checked_lines(bad_lines) as bad, open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                bad.add(where, f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); each line must be one "
                               f"JSON object")
                continue
            if not isinstance(record, dict):
                bad.add(where, f"{where}: expected a JSON object, got {type(record).__name__}")
                continue
            yield number, record


def load_records(source: str | Path, split: str = "train",
                 bad_lines: BadLines | None = None) -> tuple[list[dict[str, Any]], list[int], str]:
    """Return (records, line_numbers, source_name). Local .jsonl is read line by line (exact error locations; bad
    lines gathered in `bad_lines`, see read_jsonl); other local files and hub names go through `datasets`."""
    path = Path(source)
    if path.suffix == ".jsonl" or (path.exists() and path.suffix == ".json" and _looks_like_jsonl(path)):
        numbered = list(read_jsonl(path, bad_lines))
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


def _looks_like_jsonl(path: Path) -> bool:
    with open(path, encoding="utf-8") as f:
        first = f.read(1)
    return first == "{"


def detect_format(record: Mapping[str, Any], source: str, line: int = 1) -> str:
    """The format whose required fields `record` (of line `line`) has."""
    keys = set(record)
    for name, (required, _) in FORMAT_FIELDS.items():
        if set(required) <= keys:
            return name
    expected = "; ".join(f"{n}: {', '.join(r + o)}" for n, (r, o) in FORMAT_FIELDS.items())
    raise DataError(f"{source}: line {line} has fields {sorted(keys)}, which match no known format. "
                    f"Expected one of -- {expected}. Rename the fields or set dataset_format")


def check_fields(records: Sequence[Mapping[str, Any]], line_numbers: Sequence[int], fmt: str, source: str,
                 bad_lines: BadLines | None = None) -> None:
    """Every record has the fields of `fmt`, of the right types; problems gathered in `bad_lines` (else raised, the
    first bad line with the count of bad lines)."""
    with checked_lines(bad_lines) as bad:
        for record, number in zip(records, line_numbers):
            with bad.checking(f"{source}:{number}"):
                _check_record(record, fmt, f"{source}:{number}")


def _check_record(record: Mapping[str, Any], fmt: str, where: str) -> None:
    required, optional = FORMAT_FIELDS[fmt]
    missing = [k for k in required if k not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} for format '{fmt}' "
                        f"(expected {list(required)} and optionally {list(optional)}; found {sorted(record)})")
    for key in required + optional:
        value = record.get(key)
        if fmt == "chat" and key == "messages":
            _check_messages(value, where)
        elif value is not None and not isinstance(value, str):
            raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")


def checked_records(source: str | Path, fmt: str, model: str, split: str = "train",
                    max_examples: int | None = None) -> tuple[list[dict[str, Any]], list[int], str, str]:
    """(records, line numbers, source name, format) of a text model's data file (its first `max_examples` records,
    when set), every line read and checked: one DataError naming the first bad line and how many there are. `fmt`
    "auto" detects the format from the first record. A file of image rows is refused, naming `model`."""
    bad = BadLines()
    records, lines, name = load_records(source, split, bad)
    if max_examples:
        records, lines = records[:max_examples], lines[:max_examples]
    refuse_images(records, lines, name, model)
    if records and fmt == "auto":
        with bad.checking(f"{name}:{lines[0]}"):
            fmt = detect_format(records[0], name, lines[0])
    if fmt != "auto":
        check_fields(records, lines, fmt, name, bad)
    bad.raise_first()
    return records, lines, name, fmt


def refuse_images(records: Sequence[Mapping[str, Any]], lines: Sequence[int], source: str, model: str) -> None:
    """A text-only model never sees a picture: it would train on "<image>" as text with the images dropped. Image
    rows (an `images` or `videos` list, LLaMA-Factory's format, or image items in a message's content, TRL's) are
    refused, naming the first of them, how many there are and the model."""
    pictured = [number for record, number in zip(records, lines) if has_images(record)]
    if pictured:
        raise DataError(f"{source}:{pictured[0]}: {len(pictured)} of the {len(records)} rows have images (the first "
                        f"here), but {model} is a text-only model: it would read <image> as text and never see the "
                        f"pictures. Use an image-text-to-text model (e.g. model: builtin:tiny-qwen3-vl) for this "
                        f"data, or remove the images from it")


def has_images(record: Mapping[str, Any]) -> bool:
    if any(record.get(key) for key in ("images", "videos")):
        return True
    messages = record.get("messages")
    contents = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    return any(isinstance(item, dict) and item.get("type") in ("image", "video")
               for content in contents if isinstance(content, list) for item in content)


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}].role is '{message['role']}'; use system, user or assistant")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this conversation")


def seeded_split(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(kept, held out): a seeded `fraction` of `items` (at least one) held out, both in their original order."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(items) * fraction))
    return [items[i] for i in sorted(order[n_held:])], [items[i] for i in sorted(order[:n_held])]
