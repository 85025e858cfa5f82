"""Image + text conversations: read, check, tokenise with the processor's chat template, batch.

Rows come in two formats, both JSONL with `messages` (roles system / user / assistant):
- LLaMA-Factory / ms-swift: string contents with `<image>` placeholders and a top-level `images` list;
- TRL / transformers: contents that are lists of {"type": "text", "text": ...} and {"type": "image"} items, an
  image item naming its file inline ("image" / "path" key) or taking the next entry of `images`.
Image paths are relative to the JSONL file. Both formats become the same content-list conversation, so they give
identical tensors. Pixels are read lazily, when a micro-batch is collated; reading only checks each image and takes
its size, which fixes its number of image tokens (bounded by the processor's min_pixels / max_pixels).

Labels: the loss is on assistant turns only (their text and the closing <|im_end|>); system and user turns, the
template's role headers and every image token are IGNORE_INDEX.

Rows longer than max_length: a row is cut only where no image is cut. When max_length falls inside an image the row
is dropped and counted (image_overflow="drop") or refused with its file and line (image_overflow="error"):
truncating through an image is what makes the model fail with "Image features and image tokens do not match".

Batching: length-grouped, not packed. Qwen-VL's multimodal RoPE (transformers' get_rope_index) gives each row 3-D
positions (temporal, height, width) in which the text after an image continues from the image's grid size, not from
its token count; it computes them per row from input_ids, mm_token_type_ids, image_grid_thw and the attention mask
(padding excluded), treating each row as ONE sequence. Packed rows would get positions running on from the previous
example and no block-diagonal mask: packing would need us to precompute per-example 3-D positions (get_rope_index is
a method of the loaded model) and pass them in the model's version-specific layout (Qwen3-VL takes a 4-row form whose
first row marks the sequence boundaries). Right padding with an attention mask leaves every row's result equal to its
unpadded forward (tested), and grouping rows of similar length in each step's micro-batches keeps the padding small;
with micro_batch_size 1 (large models) there is no padding at all.

Micro-batches with no image get a blank image (one image token) appended after the last real token of their first
row, so that every rank runs the vision tower in every forward: under ZeRO-3 a rank that skipped it would wait
forever in the parameter all-gathers the others are in. The blank's tokens have label IGNORE_INDEX and come after
every real token of the row, and attention is causal and positions are assigned left to right, so no real token
attends to them and the real tokens' outputs are unchanged (tested).
"""
from dataclasses import dataclass
from pathlib import Path

from finetune_launcher.data.prepared import PreparedData
from finetune_launcher.data.records import BadLines, DataError, checked_lines, read_jsonl, seeded_split
from finetune_launcher.recipes.vision_language.model import load_processor
from finetune_launcher.data.text import IGNORE_INDEX

IMAGE_PLACEHOLDER = "<image>"
IMAGE_OVERFLOW_CHOICES = ("drop", "error")
ROLES = ("system", "user", "assistant")


@dataclass
class VLStats:
    """What reading found (every row read, mixed-in pools included) and what the rows kept hold (count_rows: after
    a mixture, the rows the run trains on)."""
    examples: int = 0
    image_rows: int = 0
    text_rows: int = 0
    images: int = 0
    image_tokens: int = 0
    dropped_image_overflow: int = 0  # rows whose images max_length would cut (dropped)
    truncated: int = 0               # rows that lost supervised tokens to max_length
    dropped_no_response: int = 0     # rows with no supervised token left (dropped)

    def count_rows(self, rows):
        self.image_rows = sum(1 for row in rows if row["images"])
        self.text_rows = len(rows) - self.image_rows
        self.images = sum(len(row["images"]) for row in rows)
        self.image_tokens = sum(sum(row["image_tokens"]) for row in rows)
        return self

    def as_dict(self):
        return dict(self.__dict__)


# ---------------------------------------------------------------- reading

def read_conversations(path, bad_lines=None):
    """[(where, messages, image_paths)] for a JSONL file: `where` is "file:line", `messages` use content lists with
    {"type": "image"} items in the order of `image_paths` (absolute). Bad lines are left out and gathered in
    `bad_lines` (else raised: a DataError naming the first bad line and how many there are)."""
    path = Path(path)
    conversations = []
    with checked_lines(bad_lines) as bad:
        for number, record in read_jsonl(path, bad):
            with bad.checking(f"{path}:{number}"):
                conversations.append(normalise_record(record, path.parent, f"{path}:{number}"))
    return conversations


def normalise_record(record, base_dir, where):
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects "
                        f"(found fields {sorted(record)})")
    listed = record.get("images") or []
    if not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
        raise DataError(f"{where}: 'images' must be a list of image file paths")
    queue = list(listed)
    out, paths = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: messages[{i}] must have 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(f"{where}: messages[{i}].role is '{message['role']}'; use system, user or assistant")
        items = content_items(message["content"], queue, paths, f"{where}: messages[{i}]", len(listed))
        out.append({"role": message["role"], "content": items})
    if queue:
        raise DataError(f"{where}: {len(listed)} image(s) listed in 'images' but only {len(listed) - len(queue)} "
                        f"placeholder(s) ({IMAGE_PLACEHOLDER} or {{\"type\": \"image\"}}) in the messages")
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn from this conversation")
    return where, out, [resolve_image_path(p, base_dir, where) for p in paths]


def content_items(content, queue, paths, where, n_listed):
    """Content as a list of {"type": "text"} / {"type": "image"} items; image paths appended to `paths`."""
    def take_listed():
        if not queue:
            raise DataError(f"{where}: more image placeholders than the {n_listed} file(s) in 'images'")
        paths.append(queue.pop(0))
        return {"type": "image"}

    if isinstance(content, str):
        items = []
        for k, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                items.append(take_listed())
            if text:
                items.append({"type": "text", "text": text})
        return items
    if not isinstance(content, list):
        raise DataError(f"{where}: 'content' must be a string or a list of {{\"type\": ...}} items")
    items = []
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            items.append({"type": "text", "text": item["text"]})
        elif kind == "image":
            inline = item.get("image", item.get("path", item.get("url")))
            if inline is None:
                items.append(take_listed())
            elif isinstance(inline, str):
                paths.append(inline)
                items.append({"type": "image"})
            else:
                raise DataError(f"{where}: content[{j}] image must be a file path string")
        else:
            raise DataError(f"{where}: content[{j}] must be {{\"type\": \"text\", \"text\": ...}} or "
                            f"{{\"type\": \"image\", ...}}; got {item!r:.80}")
    return items


def resolve_image_path(name, base_dir, where):
    if "://" in name:
        raise DataError(f"{where}: image '{name}' is a URL; images are not downloaded: save it locally and give "
                        f"its path (relative to the JSONL file)")
    path = Path(name).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def image_size(path, where):
    """(height, width) of an image file, checked for readability; DataError naming the row otherwise."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: image file cannot be read: {path} ({type(exc).__name__}: {exc})") from None
    return height, width


def load_image(path, where):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image file not found: {path}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: image file cannot be read: {path} ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- tokenising

def image_token_count(processor, height, width):
    """Image tokens the model sees for an image of this size (after the processor's min/max pixel bounds)."""
    merge = processor.image_processor.merge_size
    return processor.image_processor.get_number_of_image_patches(height, width, {}) // (merge * merge)


def render(processor, messages, add_generation_prompt=False):
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(processor, messages, token_counts, where):
    """(input_ids, labels): each message's tokens are the difference between successive renders of the chat
    template; assistant bodies are supervised, everything else and every image token is IGNORE_INDEX."""
    tokenizer = processor.tokenizer
    unsupervised = vision_token_ids(processor)
    counts = iter(token_counts)
    input_ids, labels, rendered = [], [], ""
    for i, message in enumerate(messages):
        pieces = []  # (text, supervised)
        if message["role"] == "assistant":
            header = render(processor, messages[:i], add_generation_prompt=True)
            pieces.append((_after(header, rendered, where), False))
            full = render(processor, messages[: i + 1])
            pieces.append((_after(full, header, where), True))
        else:
            full = render(processor, messages[: i + 1])
            pieces.append((_after(full, rendered, where), False))
        for text, supervised in pieces:
            ids = tokenizer(expand_images(text, processor.image_token, counts, where),
                            add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += [t if supervised and t not in unsupervised else IGNORE_INDEX for t in ids]
        rendered = full
    if next(counts, None) is not None:
        raise DataError(f"{where}: the chat template rendered fewer images than the row has")
    return input_ids, labels


def vision_token_ids(processor):
    """Ids of the image / video pads and the vision start / end markers (never supervised)."""
    tokens = [processor.image_token, getattr(processor, "video_token", None), "<|vision_start|>", "<|vision_end|>"]
    vocab = processor.tokenizer.get_vocab()
    return {vocab[t] for t in tokens if t in vocab}


def _after(text, prefix, where):
    if not text.startswith(prefix):
        raise DataError(f"{where}: the chat template renders earlier turns differently once later turns are added, "
                        f"so assistant turns cannot be located; use a template that renders conversations "
                        f"incrementally")
    return text[len(prefix):]


def expand_images(text, image_token, counts, where):
    """Repeat the template's single image token once per image token of the next image."""
    parts = text.split(image_token)
    out = parts[0]
    for part in parts[1:]:
        n = next(counts, None)
        if n is None:
            raise DataError(f"{where}: the chat template rendered more images than the row has")
        out += image_token * n + part
    return out


def fit_to_length(row, max_length, image_overflow, stats, image_id):
    """The row cut to max_length where that cuts no image; None when it is dropped (counted in stats)."""
    ids, labels = row["input_ids"], row["labels"]
    if len(ids) > max_length:
        image_positions = [k for k, t in enumerate(ids) if t == image_id]
        if image_positions and image_positions[-1] + 1 >= max_length:  # +1: the image's closing marker
            if image_overflow == "error":
                raise DataError(
                    f"{row['where']}: {len(ids)} tokens ({len(image_positions)} of them image tokens) and max_length "
                    f"{max_length} would cut through an image. Raise max_length, lower max_pixels (fewer tokens per "
                    f"image), or let such rows be dropped and counted (image_overflow: drop)")
            stats.dropped_image_overflow += 1
            return None
        before = sum(1 for t in labels if t != IGNORE_INDEX)
        ids, labels = ids[:max_length], labels[:max_length]
        if sum(1 for t in labels if t != IGNORE_INDEX) < before:
            stats.truncated += 1
    if not any(t != IGNORE_INDEX for t in labels[1:]):
        stats.dropped_no_response += 1
        return None
    return dict(row, input_ids=ids, labels=labels)


def tokenize_rows(conversations, processor, max_length, image_overflow="drop", stats=None, bad_lines=None):
    """Conversations from read_conversations -> rows {input_ids, labels, images, image_tokens, where}, in order;
    rows that do not fit are dropped or refused by `image_overflow` (counted in `stats`, a VLStats). Rows that
    cannot be read (an image, the template) are gathered in `bad_lines` (else raised, the first with the count)."""
    if image_overflow not in IMAGE_OVERFLOW_CHOICES:
        raise DataError(f"image_overflow is '{image_overflow}'; use one of {', '.join(IMAGE_OVERFLOW_CHOICES)}")
    stats = stats if stats is not None else VLStats()
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    rows = []
    with checked_lines(bad_lines) as bad:
        for where, messages, paths in conversations:
            with bad.checking(where):
                row = tokenize_row(processor, where, messages, paths, stats)
                row = fit_to_length(row, max_length, image_overflow, stats, image_id)
                if row is not None:
                    rows.append(row)
    return rows, stats.count_rows(rows)


def tokenize_row(processor, where, messages, paths, stats):
    counts = [image_token_count(processor, *image_size(p, where)) for p in paths]
    input_ids, labels = tokenize_conversation(processor, messages, counts, where)
    stats.examples += 1
    return {"input_ids": input_ids, "labels": labels, "images": paths, "image_tokens": counts, "where": where}


def file_rows(path, processor, max_length, image_overflow, stats):
    """The rows of one JSONL file, every line read and checked before one DataError names the first bad line."""
    bad = BadLines()
    rows, _ = tokenize_rows(read_conversations(path, bad), processor, max_length, image_overflow, stats, bad)
    bad.raise_first()
    return rows


def load_vl_rows(path, processor, max_length, image_overflow="drop"):
    """Read and tokenise one JSONL file: (rows, VLStats)."""
    stats = VLStats()
    rows = file_rows(path, processor, max_length, image_overflow, stats)
    if not rows:
        raise DataError(f"{path}: no row is left to train on ({stats.examples} read, {stats.dropped_image_overflow} "
                        f"dropped because max_length {max_length} would cut an image, {stats.dropped_no_response} "
                        f"with no supervised token left)")
    return rows, stats


def prepare_rows(cfg):
    """The recipe table's `rows` part: the run's rows, tokenised with the model's processor."""
    return prepare_vl_data(cfg, load_processor(cfg))


def prepare_vl_data(cfg, processor):
    """The run's rows: the dataset (its eval split held out: eval_dataset, else a seeded eval_fraction of it), with
    cfg.mix_datasets mixed in, tokenised with the processor; raises DataError when nothing is left to train on."""
    from finetune_launcher.data.mixture import mix_for_run

    bad = BadLines()
    conversations = read_conversations(cfg.dataset, bad)
    if not conversations and not bad.found:
        raise DataError(f"{cfg.dataset}: no records")
    if cfg.max_examples:
        conversations = conversations[:cfg.max_examples]
    held_out = []
    if cfg.eval_fraction > 0 and not cfg.eval_dataset:
        conversations, held_out = seeded_split(conversations, cfg.eval_fraction, cfg.seed)
    stats = VLStats()
    rows, _ = tokenize_rows(conversations, processor, cfg.max_length, cfg.image_overflow, stats, bad)
    eval_rows, _ = tokenize_rows(held_out, processor, cfg.max_length, cfg.image_overflow, VLStats(), bad)
    bad.raise_first()
    if cfg.eval_dataset:
        eval_rows = file_rows(cfg.eval_dataset, processor, cfg.max_length, cfg.image_overflow, VLStats())
    rows, mixture = mix_for_run(cfg, rows, lambda path: file_rows(path, processor, cfg.max_length,
                                                                  cfg.image_overflow, stats))
    if not rows:
        raise DataError(f"{cfg.dataset}: no row is left to train on ({stats.examples} read, "
                        f"{stats.dropped_image_overflow} dropped because max_length {cfg.max_length} would cut an "
                        f"image, {stats.dropped_no_response} with no supervised token left); raise max_length or "
                        f"lower max_pixels")
    stats.count_rows(rows)  # the rows the run trains on, mixed-in rows included
    facts = {**stats.as_dict(), "format": "vision_language", "train_rows": len(rows), "eval_rows": len(eval_rows),
             "mixture": mixture}
    return PreparedData(rows, eval_rows, facts)
