"""Text training data: tokenise records with response-only labels, pack several examples into one row
(padding-free: position ids restart per example), split off an eval set, collate.

Formats: dolly (instruction/context/response), alpaca (instruction/input/output), chat (messages with role and
content; loss on assistant turns only), text (plain language modelling, cut into fixed blocks).
"""
import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.data.mixture import mix_for_run
from finetune_launcher.data.prepared import PreparedData
from finetune_launcher.data.prompts import render_instruction_prompt
from finetune_launcher.data.records import DataError, checked_records, seeded_split

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list
    labels: list


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0          # examples whose response lost tokens to max_length
    dropped_no_response: int = 0  # examples with no supervised token left (dropped)
    train_examples: int = 0
    eval_examples: int = 0
    train_rows: int = 0
    eval_rows: int = 0
    supervised_tokens: int = 0
    nonpad_fraction: float = 1.0
    format: str = ""
    mixture: dict = None  # per mixed dataset: examples taken (mix_datasets)
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- tokenising

def instruction_pair(record: Mapping[str, Any], fmt: str) -> tuple[str, str]:
    if fmt == "dolly":
        return render_instruction_prompt(record["instruction"], record.get("context") or ""), record["response"]
    return render_instruction_prompt(record["instruction"], record.get("input") or ""), record["output"]


def tokenize_instructions(records: Sequence[Mapping[str, Any]], fmt: str, tokenizer: Any) -> list[Example]:
    pairs = [instruction_pair(r, fmt) for r in records]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id else []
    examples = []
    for prompt, response in zip(prompts, responses):
        prompt = bos + prompt
        response = response + eos
        examples.append(Example(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return examples


def tokenize_chat(record: Mapping[str, Any], tokenizer: Any) -> Example:
    """Loss on assistant contents only: each message's tokens are the difference between successive renders."""
    messages = record["messages"]
    input_ids, labels, rendered = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            head_ids = tokenizer(header[len(rendered):], add_special_tokens=False)["input_ids"]
            body_ids = tokenizer(full[len(header):], add_special_tokens=False)["input_ids"]
            input_ids += head_ids + body_ids
            labels += [IGNORE_INDEX] * len(head_ids) + body_ids
        else:
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            ids = tokenizer(full[len(rendered):], add_special_tokens=False)["input_ids"]
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        rendered = full
    return Example(input_ids, labels)


def tokenize_text_blocks(records: Sequence[Mapping[str, Any]], tokenizer: Any, block_size: int) -> list[Example]:
    """Language modelling: concatenate documents (EOS between) and cut into full blocks."""
    texts = [r["text"] for r in records if r["text"] and r["text"].strip()]
    stream = []
    eos = tokenizer.eos_token_id
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    blocks = [stream[i: i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
    return [Example(b, list(b)) for b in blocks]


def truncate(examples: Sequence[Example], max_length: int, stats: DataStats) -> list[Example]:
    kept = []
    for example in examples:
        if len(example.input_ids) > max_length:
            supervised_before = sum(1 for t in example.labels if t != IGNORE_INDEX)
            example = Example(example.input_ids[:max_length], example.labels[:max_length])
            if sum(1 for t in example.labels if t != IGNORE_INDEX) < supervised_before:
                stats.truncated += 1
        if sum(1 for t in example.labels[1:] if t != IGNORE_INDEX) == 0:
            stats.dropped_no_response += 1
            continue
        kept.append(example)
    return kept


# ---------------------------------------------------------------- packing and batching

def pack_examples(examples: Sequence[Example], capacity: int) -> list[list[Example]]:
    """Best-fit-decreasing bin packing: a list of rows, each a list of examples with total length <= capacity."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    free, bins = [], []  # free: sorted list of (remaining capacity, bin index)
    for i in order:
        length = len(examples[i].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            remaining, b = free.pop(slot)
        else:
            remaining, b = capacity, len(bins)
            bins.append([])
        bins[b].append(examples[i])
        if remaining - length > 0:
            bisect.insort(free, (remaining - length, b))
    return bins


def row_from_examples(examples: Sequence[Example]) -> dict[str, list[int]]:
    """One packed row: concatenated ids, labels with each example's first token unsupervised, restarting positions."""
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX] + example.labels[1:]
        position_ids += list(range(len(example.input_ids)))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def make_rows(examples: Sequence[Example], max_length: int, packing: bool) -> list[dict[str, list[int]]]:
    groups = pack_examples(examples, max_length) if packing else [[e] for e in examples]
    return [row_from_examples(g) for g in groups]


def collate(rows: Sequence[Mapping[str, Any]], pad_id: int, packed: bool,
            pad_to_multiple: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad rows into tensors. Packed rows carry position_ids (no attention mask: transformers derives the
    block-diagonal mask from the restarting positions); padded rows carry an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    ids, labels, positions, mask = [], [], [], []
    for r in rows:
        n = len(r["input_ids"])
        pad = width - n
        ids.append(r["input_ids"] + [pad_id] * pad)
        labels.append(r["labels"] + [IGNORE_INDEX] * pad)
        positions.append(r["position_ids"] + list(range(pad)))
        mask.append([1] * n + [0] * pad)
    batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
    if packed:
        batch["position_ids"] = torch.tensor(positions)
    else:
        batch["attention_mask"] = torch.tensor(mask)
    return batch


def supervised_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss (labels are shifted inside the model: position 0 never counts)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def nonpad_fraction(rows: Sequence[Mapping[str, Any]], width: int) -> float:
    return sum(len(r["input_ids"]) for r in rows) / max(1, width * len(rows))


# ---------------------------------------------------------------- the dataset a run trains on

def prepare_data(cfg: "RunConfig", tokenizer: Any) -> PreparedData:
    """Read, check, tokenise, truncate, split and pack, following the run config. Raises DataError with the
    cause when nothing trainable is left."""
    stats = DataStats()
    records, lines, source, fmt = checked_records(cfg.dataset, cfg.dataset_format, cfg.model, cfg.dataset_split,
                                                  cfg.max_examples)
    if not records:
        raise DataError(f"{source}: no records")
    stats.format, stats.examples = fmt, len(records)
    records, eval_records = split_eval(records, lines, fmt, cfg)

    packed = cfg.packing and fmt != "text"
    train = tokenize_records(records, fmt, tokenizer, cfg.max_length, stats)
    train, stats.mixture = mix_for_run(cfg, train, lambda path: tokenize_file(path, tokenizer, cfg, stats))
    evals = tokenize_records(eval_records, fmt, tokenizer, cfg.max_length, stats) if eval_records else []
    if not train:
        raise DataError(
            f"{source}: no example has a supervised token left after tokenisation ({stats.examples} read, "
            f"{stats.dropped_no_response} dropped because the response was empty or cut off). Likely causes: "
            f"prompts longer than max_length={cfg.max_length} (raise max_length), empty responses, or the "
            f"wrong field names for format '{fmt}'")
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    train_rows = make_rows(train, cfg.max_length, packed)
    eval_rows = make_rows(evals, cfg.max_length, packed)
    stats.train_rows, stats.eval_rows = len(train_rows), len(eval_rows)
    stats.supervised_tokens = sum(sum(1 for t in r["labels"][1:] if t != IGNORE_INDEX) for r in train_rows)
    stats.nonpad_fraction = nonpad_fraction(train_rows, cfg.max_length) if packed else 1.0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return PreparedData(train_rows, eval_rows, {**stats.as_dict(), "packed": packed},
                        {"pad_id": pad_id, "packed": packed})


def tokenize_file(path: str, tokenizer: Any, cfg: "RunConfig", stats: DataStats) -> list[Example]:
    """The examples of a dataset mixed into the run (its own format, detected as for the main dataset)."""
    records, _, source, fmt = checked_records(path, "auto", cfg.model)
    if not records:
        raise DataError(f"{source}: no records (mix_datasets)")
    return tokenize_records(records, fmt, tokenizer, cfg.max_length, stats)


def split_eval(records: list[dict[str, Any]], lines: list[int], fmt: str,
               cfg: "RunConfig") -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(train records, eval records or None): the eval_dataset file, else a seeded eval_fraction of the records."""
    if cfg.eval_dataset:
        return records, checked_records(cfg.eval_dataset, fmt, cfg.model)[0]
    if cfg.eval_fraction <= 0:
        return records, None
    return seeded_split(records, cfg.eval_fraction, cfg.seed)


def tokenize_records(records: Sequence[Mapping[str, Any]], fmt: str, tokenizer: Any, max_length: int,
                     stats: DataStats) -> list[Example]:
    """Records of format `fmt` -> Examples, as training tokenises them: instruction and chat records with the prompt
    masked out of the labels, truncated to `max_length` (truncated and dropped examples counted in `stats`, a
    DataStats); text records concatenated and cut into `max_length` blocks."""
    if fmt == "text":
        return tokenize_text_blocks(records, tokenizer, max_length)
    if fmt == "chat":
        examples = [tokenize_chat(r, tokenizer) for r in records]
    else:
        examples = tokenize_instructions(records, fmt, tokenizer)
    return truncate(examples, max_length, stats)
