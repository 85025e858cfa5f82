"""Eval loss and perplexity on a held-out file, for a base model, adapters on it and full/merged models, side by
side. Examples are tokenised and masked by finetune_launcher.data exactly as in training (prompt tokens and each example's first
token unsupervised); the loss is the sum of token losses over all supervised tokens divided by their count, as the
trainer's eval computes it. Rows are not packed: each example is attended to on its own, which is what packing's
block-diagonal mask does too. Vision-language models are evaluated by finetune_launcher/recipes/vision_language/evaluation.py (loss and answer
accuracy), into the same report."""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetune_launcher.after.bases import VISION_LANGUAGE, model_kind, qlora_note, uses_dequantized_base
from finetune_launcher.after.generation import case_from_record, generate_for_case
from finetune_launcher.after.loading import (AdapterError, adapter_kind, check_adapter_dir, load_adapters, load_full_model,
                                 read_training_info, resolve_base, same_kind)
from finetune_launcher.data.records import DataError, check_fields, detect_format, load_records
from finetune_launcher.data.text import DataStats, collate, make_rows, supervised_tokens, tokenize_records
from finetune_launcher.models.references import resolve_model_path

DEFAULT_MAX_LENGTH = 1024


@dataclass
class EvalData:
    records: list
    source: str
    fmt: str


@dataclass
class Report:
    data: str
    fmt: str
    max_length: int
    results: dict = field(default_factory=dict)    # label -> metrics
    examples: list = field(default_factory=list)   # one dict per example: prompt, reference, generations

    def as_dict(self):
        return {"data": self.data, "format": self.fmt, "max_length": self.max_length, "models": self.results}


def read_eval_data(path, fmt="auto"):
    records, lines, source = load_records(path)
    if not records:
        raise DataError(f"{source}: no records to evaluate on")
    fmt = detect_format(records[0], source) if fmt == "auto" else fmt
    check_fields(records, lines, fmt, source)
    return EvalData(records, source, fmt)


def eval_rows(data, tokenizer, max_length):
    """Tokenised, masked, unpacked rows; raises DataError when no example keeps a supervised token."""
    stats = DataStats()
    examples = tokenize_records(data.records, data.fmt, tokenizer, max_length, stats)
    if not examples:
        raise DataError(f"{data.source}: no example has a supervised token left after tokenisation with "
                        f"max_length={max_length} ({stats.dropped_no_response} dropped); raise --max-length or "
                        f"check the fields for format '{data.fmt}'")
    return make_rows(examples, max_length, packing=False)


def eval_loss(model, rows, pad_id, batch_size=8):
    """(token-weighted mean loss, supervised token count) over `rows`."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))  # similar lengths together: less padding
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ordered), batch_size):
            batch = collate(ordered[start:start + batch_size], pad_id, packed=False)
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            loss_sum += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                              ignore_index=-100, reduction="sum"))
            tokens += supervised_tokens({"labels": labels})
    return loss_sum / max(tokens, 1), tokens


def perplexity(loss):
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; a loss that high means "no better than random"


# ---------------------------------------------------------------- one model, then all of them

def measure(label, source, model, tokenizer, rows, data, options, report, info=None):
    """Evaluate the active model on `rows` and, with options.save_examples, generate for the first examples."""
    loss, tokens = eval_loss(model, rows, tokenizer.pad_token_id, options.batch_size)
    result = {"model": source, "eval_loss": loss, "perplexity": perplexity(loss), "tokens": tokens,
              "examples": len(rows)}
    if info and info.get("eval_loss") is not None:
        result["training_eval_loss"] = info["eval_loss"]
    label = unique_label(label, source, report.results)
    report.results[label] = result
    if options.save_examples:
        add_generations(label, model, tokenizer, data, options, report)


def unique_label(label, source, taken):
    return label if label not in taken else source


def prompt_cases(data, count):
    if data.fmt == "text":
        raise DataError(f"{data.source}: --save-examples needs instruction or chat data (a prompt and a reference); "
                        f"this file is plain text")
    return [case_from_record(r, f"{data.source} record {i + 1}") for i, r in enumerate(data.records[:count])]


def add_generations(label, model, tokenizer, data, options, report):
    cases = prompt_cases(data, options.save_examples)
    if not report.examples:
        report.examples = [{"instruction": c.instruction, "context": c.context, "reference": c.reference,
                            "generations": {}} for c in cases]
    for case, row in zip(cases, report.examples):
        row["generations"][label] = generate_for_case(model, tokenizer, case, data.fmt, options.generation)


def evaluation_kind(options):
    """The one kind (causal LM or vision-language) of everything to evaluate, from configs only."""
    sources = [str(d) for d in options.adapters] + [str(m) for m in options.models]
    kinds = [adapter_kind(check_adapter_dir(d), resolve_base(d, options.base)[1], options.trust_remote_code)
             for d in options.adapters]
    kinds += [model_kind(resolve_model_path(str(m)), options.trust_remote_code) for m in options.models]
    return same_kind(sources, kinds)


def evaluate_all(options, log=print):
    """Evaluate the base (unless options.no_base), each adapter and each --model on options.data."""
    if not options.adapters and not options.models:
        raise AdapterError("nothing to evaluate: pass --adapter DIR and/or --model REF")
    if evaluation_kind(options) == VISION_LANGUAGE:
        from finetune_launcher.recipes.vision_language.evaluation import evaluate_vl

        return evaluate_vl(options, log, new_report)
    data = read_eval_data(options.data, options.format)
    if options.save_examples:
        prompt_cases(data, options.save_examples)  # fail before loading any model
    report = evaluate_adapters(options, data, log) if options.adapters else None
    for reference in options.models:
        log(f"loading model {reference}")
        loaded = load_full_model(reference, options.dtype, trust_remote_code=options.trust_remote_code)
        report = report or new_report(options, data.fmt, loaded.info)
        rows = eval_rows(data, loaded.tokenizer, report.max_length)
        measure(Path(str(reference)).name or str(reference), str(reference), loaded.model, loaded.tokenizer, rows,
                data, options, report, loaded.info)
        del loaded
    return report


def evaluate_adapters(options, data, log):
    """The base once, each adapter switched on in turn; all share the first adapter's tokenizer and rows. For QLoRA
    adapters the base is the de-quantized one they were trained against, and the base row says so."""
    qlora_base = options.qlora_base
    log(f"loading base and {len(options.adapters)} adapter(s)")
    loaded = load_adapters(options.adapters, options.base, options.dtype,
                           trust_remote_code=options.trust_remote_code, qlora_base=qlora_base)
    model, tokenizer = loaded.model, loaded.tokenizer
    note = qlora_note(options.adapters, qlora_base)
    if note:
        log(note)
    base_source = str(loaded.reference)
    if uses_dequantized_base(options.adapters, qlora_base):
        base_source += " (NF4 de-quantized)"
    report = new_report(options, data.fmt, read_training_info(options.adapters[0]))
    rows = eval_rows(data, tokenizer, report.max_length)
    if not options.no_base:
        log(f"evaluating base {base_source}")
        with model.disable_adapter():
            measure("base", base_source, model, tokenizer, rows, data, options, report)
    for (label, peft_name), adapter_dir in zip(loaded.names.items(), options.adapters):
        log(f"evaluating {label} ({adapter_dir})")
        model.set_adapter(peft_name)
        measure(label, str(adapter_dir), model, tokenizer, rows, data, options, report,
                read_training_info(adapter_dir))
    return report


def new_report(options, fmt, info):
    max_length = options.max_length or info.get("max_length") or DEFAULT_MAX_LENGTH
    return Report(str(options.data), fmt, int(max_length))


# ---------------------------------------------------------------- output

def format_table(report):
    """One line per model; an accuracy column (correct/answers) when the models were scored on answers."""
    scored = any("accuracy" in r for r in report.results.values())
    accuracy = f" {'accuracy':>16}" if scored else ""
    header = f"{'model':<14} {'eval_loss':>10} {'perplexity':>12} {'tokens':>8}{accuracy}  source"
    lines = [f"eval on {report.data} ({report.fmt}, max_length {report.max_length})", header, "-" * len(header)]
    for label, r in report.results.items():
        cell = ""
        if scored:
            cell = f" {r['accuracy']:>7.1%} {r['correct']:>4d}/{r['answers']:<4d}" if "accuracy" in r else " " * 17
        lines.append(f"{label:<14} {r['eval_loss']:>10.4f} {r['perplexity']:>12.3f} {r['tokens']:>8d}{cell}  "
                     f"{r['model']}")
    return "\n".join(lines)


def write_examples(report, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in report.examples:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")
    return path
