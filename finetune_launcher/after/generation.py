"""Prompts and generation after training. A prompt is tokenised by the same functions training used
(finetune_launcher.data.tokenize_instructions / tokenize_chat with an empty response), and the tokens before the first
supervised label are what the model is given: the template, BOS and token boundaries are exactly the training ones.
A recipe's after part decides what its models are prompted with (parts.LanguageModelPart: prompt_format, answerer,
case_from_record): the causal LM's with the text templates here, the vision-language model's with its processor
(the same rule, finetune_launcher/recipes/vision_language/after.py).
"""
import os
from dataclasses import dataclass
from pathlib import Path

from finetune_launcher.after.parts import language_model_parts
from finetune_launcher.data.records import DataError, read_jsonl
from finetune_launcher.data.text import IGNORE_INDEX, tokenize_chat, tokenize_instructions

PROMPT_FORMATS = ("auto", "dolly", "alpaca", "chat", "text")
DEFAULT_FORMAT = "dolly"  # finetune_launcher.data.prompts' instruction template, for a model without training_info.json


@dataclass
class PromptCase:
    """One prompt, independent of the template: an instruction with optional context, or a conversation; plus the
    reference answer when the source has one."""
    instruction: str
    context: str = ""
    reference: str = None
    messages: list = None
    images: list = None  # image file paths, for a vision-language model


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, deterministic
    top_p: float = 1.0
    seed: int = 0


def text_prompt_format(requested, info):
    """The text template to apply: as asked, else the format the model was trained on (training_info.json)."""
    if requested and requested != "auto":
        return requested
    return info.get("dataset_format") or DEFAULT_FORMAT


# ---------------------------------------------------------------- prompt sources

def case_from_record(record, where, base_dir="."):
    """A PromptCase from a prompt-file line or a dataset record: the first recipe's after part (in the table's order,
    the most specific first) that reads it; image paths are relative to `base_dir`."""
    for part in language_model_parts():
        case = part.case_from_record(record, base_dir, where)
        if case is not None:
            return case
    raise DataError(f"{where}: found fields {sorted(record)}; a prompt needs 'prompt' or 'instruction' (optional "
                    f"'context'), 'messages', or 'text'")


def text_case_from_record(record, base_dir, where):
    """A PromptCase from a text record (dolly, alpaca, chat, text, or {prompt, context, image / images}); None for
    a record of none of these formats."""
    if "messages" in record:
        messages = list(record["messages"])
        reference = None
        if messages and messages[-1].get("role") == "assistant":
            reference = messages.pop()["content"]
        users = [m["content"] for m in messages if m.get("role") == "user"]
        if not users:
            raise DataError(f"{where}: the conversation has no user message to answer")
        return PromptCase(users[-1], reference=reference, messages=messages)
    for key in ("prompt", "instruction", "text"):
        if key in record:
            context = record.get("context") or record.get("input") or ""
            reference = record.get("response") or record.get("output") or record.get("reference")
            return PromptCase(record[key], context, reference, images=record_images(record, base_dir, where))
    return None


def record_images(record, base_dir, where):
    """The `image` (one path) or `images` (a list) of a prompt line, relative to `base_dir`; None when neither."""
    images = record.get("images", [record["image"]] if "image" in record else None)
    if images is None:
        return None
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'image' must be an image file path, 'images' a list of them")
    if any("://" in p for p in images):
        raise DataError(f"{where}: images are not downloaded: save the image locally and give its path")
    return [os.path.normpath(Path(base_dir) / Path(p).expanduser()) for p in images]


def read_prompt_file(path):
    """Prompts from a .jsonl file (any record case_from_record accepts) or a text file (one prompt per line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}; pass a .jsonl file of {{\"prompt\": ...}} lines or a .txt "
                        f"file with one prompt per line")
    if path.suffix in (".jsonl", ".json"):
        return [case_from_record(record, f"{path}:{number}", path.parent) for number, record in read_jsonl(path)]
    lines = path.read_text(encoding="utf-8").splitlines()
    return [PromptCase(line.strip()) for line in lines if line.strip()]


# ---------------------------------------------------------------- prompt tokens, as in training

def prompt_ids(case, fmt, tokenizer):
    """Token ids of the prompt for `case` in template `fmt`, produced by the training tokenisation."""
    if fmt == "text":
        text = f"{case.instruction}\n{case.context}" if case.context else case.instruction
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if fmt == "chat":
        example = tokenize_chat({"messages": chat_messages(case) + [{"role": "assistant", "content": ""}]},
                                tokenizer)
    elif fmt == "dolly":
        record = {"instruction": case.instruction, "context": case.context, "response": ""}
        example = tokenize_instructions([record], "dolly", tokenizer)[0]
    elif fmt == "alpaca":
        record = {"instruction": case.instruction, "input": case.context, "output": ""}
        example = tokenize_instructions([record], "alpaca", tokenizer)[0]
    else:
        raise DataError(f"unknown prompt format '{fmt}'; use one of {', '.join(PROMPT_FORMATS)}")
    return unsupervised_prefix(example)


def chat_messages(case):
    if case.messages:
        return case.messages
    content = f"{case.instruction}\n\n{case.context}" if case.context else case.instruction
    return [{"role": "user", "content": content}]


def unsupervised_prefix(example):
    """The tokens before the first label the loss would train on: the prompt the model answers."""
    for i, label in enumerate(example.labels):
        if label != IGNORE_INDEX:
            return example.input_ids[:i]
    return example.input_ids


def stop_token_ids(tokenizer, fmt):
    """EOS, and for chat the special token the template puts after an assistant turn (<|end|>, <|im_end|>,
    <|eot_id|>, ...): chat training supervises that token, not EOS."""
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "chat":
        marker = "XQZMARKER"
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
        after = tokenizer(rendered.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
        special = getattr(tokenizer, "added_tokens_decoder", {})
        if after and (after[0] in tokenizer.all_special_ids or getattr(special.get(after[0]), "special", False)):
            stops.append(after[0])
    return sorted(set(stops))


# ---------------------------------------------------------------- generating

def generate_text(model, tokenizer, ids, fmt, settings):
    """Generate a continuation of prompt token ids; returns the decoded new text (special tokens removed)."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    kwargs = decoding_kwargs(settings, stop_token_ids(tokenizer, fmt), tokenizer.pad_token_id)
    kwargs["attention_mask"] = torch.ones_like(input_ids)
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, **kwargs)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()


def decoding_kwargs(settings, stop_ids, pad_id):
    """generate() arguments: greedy (settings.temperature 0) or seeded sampling, stopping on `stop_ids`."""
    import torch

    kwargs = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id)
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_for_case(model, tokenizer, case, fmt, settings):
    if case.images:
        raise DataError("an image was given, but this is a causal language model without a vision tower; images "
                        "need a vision-language run's adapter (e.g. outputs/tiny_vl_lora/best)")
    return generate_text(model, tokenizer, prompt_ids(case, fmt, tokenizer), fmt, settings)
