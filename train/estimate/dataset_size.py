"""Dataset size for the total-time estimate: the examples of a local JSONL counted, their tokens estimated from a
sample with the model's own tokenizer.json when it is local (hub datasets stay unknown: give --examples); for
vision-language data the pictures per row and their size from a sample, for diffusion the pictures of an image
folder."""
import json
import os
from dataclasses import replace
from pathlib import Path

EXACT_COUNT_BYTES = 256 * 1024 ** 2  # count lines of files up to this size; extrapolate beyond (stays fast)


def with_dataset_size(spec, config):
    """Count the examples of a local JSONL and estimate their tokens from the first 200; hub datasets stay
    unknown (give --examples)."""
    path = Path(config["dataset"])
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        return spec
    head = _first_lines(path, 200)
    if not head:
        return spec
    examples = _count_lines(path)
    if config["max_examples"]:
        examples = min(examples, config["max_examples"])
    examples = int(examples * (1 - config["eval_fraction"])) if not config["eval_dataset"] else examples
    try:
        sample = [_example_text(json.loads(line)) for line in head]
    except (json.JSONDecodeError, AttributeError):
        return replace(spec, examples=examples)
    return replace(spec, examples=examples, avg_tokens_per_example=_average_tokens(sample, config))


def is_text_blocks(config):
    """Whether the run trains on plain text cut into full max_length blocks (dataset_format text, named or detected
    from a local JSONL's first record as the data module detects it)."""
    fmt = config.get("dataset_format", "auto")
    if fmt != "auto":
        return fmt == "text"
    path = Path(str(config.get("dataset", "")))
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        return False
    head = _first_lines(path, 1)
    try:
        from train.data.records import detect_format

        return bool(head) and detect_format(json.loads(head[0]), str(path)) == "text"
    except (ValueError, AttributeError, TypeError):  # not JSON, or no known format: the data checks say so
        return False


def _first_lines(path, n):
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            if len(lines) >= n:
                break
    return lines


def _count_lines(path):
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
    from train.data.prompts import render_instruction_prompt

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
    from train.models.tiny import is_builtin, resolve_model_path

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



# ---------------------------------------------------------------- pictures

VL_SAMPLE_ROWS = 200


def with_vl_dataset_size(spec, config):
    """Vision-language rows (one per example, never packed): the examples of a local JSONL (with its mixture's
    share added), and from a sample of rows of each source the pictures per row and their mean size (a picture's
    header is read, not its pixels). Sources that are not local JSONL files leave the spec's assumptions."""
    sources = [(config["dataset"], 1.0 - sum(m["fraction"] for m in config.get("mix_datasets") or ()))]
    sources += [(m["dataset"], m["fraction"]) for m in config.get("mix_datasets") or ()]
    main = Path(sources[0][0])
    if not main.is_file() or main.suffix not in (".jsonl", ".json"):
        return spec
    examples = _count_lines(main)
    if config["max_examples"]:
        examples = min(examples, config["max_examples"])
    examples = int(examples * (1 - config["eval_fraction"])) if not config["eval_dataset"] else examples
    changes = {"examples": int(examples / max(sources[0][1], 1e-9))}
    samples = [(_picture_sample(Path(path)), fraction) for path, fraction in sources]
    if all(sample is not None for sample, _ in samples):
        per_row = sum(fraction * len(sizes) / rows for (sizes, rows), fraction in samples)
        sizes = [size for (found, _), _ in samples for size in found]
        changes["images_per_row"] = per_row
        if sizes:
            changes["image_size"] = (round(sum(w for w, _ in sizes) / len(sizes)),
                                     round(sum(h for _, h in sizes) / len(sizes)))
    return replace(spec, **changes)


def _picture_sample(path):
    """([(width, height)] of the pictures of the first rows, rows read), or None when the file cannot be read."""
    if not path.is_file():
        return None
    try:
        rows = [json.loads(line) for line in _first_lines(path, VL_SAMPLE_ROWS)]
    except json.JSONDecodeError:
        return None
    sizes = [size for row in rows for size in (_picture_size(path.parent, name) for name in _image_names(row))
             if size]
    return sizes, max(1, len(rows))


def _image_names(row):
    """Image paths of a row in either format of train/data/vision_language.py: an `images` list, or image items
    naming their file inline."""
    if not isinstance(row, dict):
        return []
    names = list(row.get("images") or [])
    for message in row.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for item in content if isinstance(content, list) else []:
            if isinstance(item, dict) and item.get("type") == "image":
                names.append(item.get("image", item.get("path")))
    return [name for name in names if isinstance(name, str)]


def _picture_size(base, name):
    from PIL import Image, UnidentifiedImageError

    path = Path(name).expanduser()
    try:
        with Image.open(path if path.is_absolute() else base / path) as image:
            return image.size
    except (OSError, UnidentifiedImageError, ValueError):
        return None  # the launcher's data checks name unreadable pictures


def with_image_count(spec, config):
    """Diffusion: the pictures of a local image folder (its metadata.jsonl lines), for the total time."""
    folder = Path(config["dataset"])
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file() and (folder / "train" / "metadata.jsonl").is_file():
        metadata = folder / "train" / "metadata.jsonl"
    if not metadata.is_file():
        return spec
    return replace(spec, examples=_count_lines(metadata))
