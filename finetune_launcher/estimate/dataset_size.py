"""Dataset size for the total-time estimate: the examples of a local JSONL counted, their tokens estimated from a
sample with the model's own tokenizer.json when it is local (hub datasets stay unknown: give --examples). A recipe's
estimate part sizes its own kind of data with these (what a picture holds: recipes/<name>/estimate.py)."""
import json
import os
from pathlib import Path

from finetune_launcher.data.prompts import render_instruction_prompt
from finetune_launcher.data.records import detect_format
from finetune_launcher.models.references import is_builtin, resolve_model_path

EXACT_COUNT_BYTES = 256 * 1024 ** 2  # count lines of files up to this size; extrapolate beyond (stays fast)


def local_jsonl(path):
    """The path of a local JSONL dataset, or None (a hub dataset, a folder, no file)."""
    path = Path(path)
    return path if path.is_file() and path.suffix in (".jsonl", ".json") else None


def training_examples(path, config):
    """The examples of a local JSONL the run trains on: its lines, at most max_examples, less the eval split."""
    examples = count_lines(path)
    if config["max_examples"]:
        examples = min(examples, config["max_examples"])
    return int(examples * (1 - config["eval_fraction"])) if not config["eval_dataset"] else examples


def text_dataset_size(config):
    """{examples, avg_tokens_per_example, text_blocks} of a local JSONL (its tokens estimated from the first 200
    examples), or {} for a dataset that is not one (give --examples)."""
    path = local_jsonl(config["dataset"])
    head = first_lines(path, 200) if path else None
    if not head:
        return {}
    examples = training_examples(path, config)
    try:
        sample = [_example_text(json.loads(line)) for line in head]
    except (json.JSONDecodeError, AttributeError):
        return {"examples": examples}
    return {"examples": examples, "avg_tokens_per_example": _average_tokens(sample, config),
            "text_blocks": is_text_blocks(config, head[0])}


def is_text_blocks(config, first_line):
    """Whether the run trains on plain text cut into full max_length blocks (dataset_format text, named or detected
    from the first record as the data module detects it): full rows, no attention mask."""
    if config.get("dataset_format", "auto") != "auto":
        return config["dataset_format"] == "text"
    try:
        return detect_format(json.loads(first_line), str(config["dataset"])) == "text"
    except (ValueError, AttributeError, TypeError):  # not JSON, or no known format: the data checks say so
        return False


def first_lines(path, n):
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            if len(lines) >= n:
                break
    return lines


def count_lines(path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= EXACT_COUNT_BYTES:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + \
                (0 if size == 0 else 1) - _ends_with_newline(path)
        head = f.read(4 << 20)
    return int(size / max(1, len(head)) * head.count(b"\n"))


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return 1 if f.read(1) == b"\n" else 0


def _example_text(record):
    """The text an example trains on: its string fields with the instruction template around them."""
    if isinstance(record.get("messages"), list):
        return "\n".join(f"<|{m.get('role')}|>\n{m.get('content')}" for m in record["messages"])
    if "instruction" in record:
        answer = record.get("response") or record.get("output") or ""
        return render_instruction_prompt(record["instruction"], record.get("context") or record.get("input") or "") \
            + str(answer)
    return " ".join(str(v) for v in record.values() if isinstance(v, str))


def _average_tokens(texts, config):
    """With the model's own tokenizer.json when it is local (the builtin models have one), else 4 characters per
    token; plus one EOS."""
    ref = config["tokenizer"] or config["model"]
    tokenizer_file = (Path(resolve_model_path(ref)) if is_builtin(ref) else Path(ref)) / "tokenizer.json"
    count = None
    if tokenizer_file.is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            count = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts)
        except Exception:  # a tokenizer we cannot read: the generic ratio
            count = None
    if count is None:
        count = sum(len(text) for text in texts) / 4.0
    return count / max(1, len(texts)) + 1
