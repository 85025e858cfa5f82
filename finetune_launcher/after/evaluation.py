"""What every recipe's evaluation after training shares: the report (eval loss and perplexity per model, side by
side, as a table and JSON), the token-weighted loss, and the order in which models are evaluated -- the base once
with each adapter switched on in turn, then each full or merged model. A recipe's after part (its `evaluate`) says
how its rows are read and scored: the causal LM's instruction, chat and text files, the vision-language model's
image conversations with answer accuracy."""
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from finetune_launcher.after.bases import qlora_note, uses_dequantized_base
from finetune_launcher.after.loading import load_adapters, load_full_model, read_training_info

DEFAULT_MAX_LENGTH = 1024


@dataclass
class Report:
    data: str
    fmt: str
    max_length: int
    results: dict = field(default_factory=dict)    # label -> metrics
    examples: list = field(default_factory=list)   # one dict per example: prompt, reference, generations

    def as_dict(self):
        return {"data": self.data, "format": self.fmt, "max_length": self.max_length, "models": self.results}


def new_report(options, fmt, info):
    max_length = options.max_length or info.get("max_length") or DEFAULT_MAX_LENGTH
    return Report(str(options.data), fmt, int(max_length))


def perplexity(loss):
    return math.exp(min(loss, 700.0))  # exp overflows past ~709; a loss that high means "no better than random"


def unique_label(label, source, taken):
    return label if label not in taken else source


def loss_result(source, loss, tokens, examples, info=None):
    """One model's row of the report."""
    result = {"model": source, "eval_loss": loss, "perplexity": perplexity(loss), "tokens": tokens,
              "examples": examples}
    if info and info.get("eval_loss") is not None:
        result["training_eval_loss"] = info["eval_loss"]
    return result


def summed_token_loss(model, batches):
    """(token-weighted mean loss, supervised token count) over `batches` (forward() inputs with labels): the sum of
    token losses over all supervised tokens divided by their count, as the trainer's eval computes it."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss_sum += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                              ignore_index=-100, reduction="sum"))
            tokens += int((labels[:, 1:] != -100).sum())
    return loss_sum / max(tokens, 1), tokens


def evaluate_each(options, log, start):
    """Evaluate the base (unless options.no_base) and each adapter of options.adapters, loaded once (QLoRA adapters
    on the de-quantized base they were trained against, and the base row says so), then each full or merged model
    of options.models. `start(preprocessor, info)` begins the recipe's evaluation, with the tokenizer or processor
    of the first model and its training_info.json; it returns an object with `.report` and
    `.measure(label, source, model, preprocessor, info)`."""
    evaluation = None
    if options.adapters:
        log(f"loading base and {len(options.adapters)} adapter(s)")
        loaded = load_adapters(options.adapters, options.base, options.dtype,
                               trust_remote_code=options.trust_remote_code, qlora_base=options.qlora_base)
        note = qlora_note(options.adapters, options.qlora_base)
        if note:
            log(note)
        preprocessor = loaded.processor or loaded.tokenizer
        evaluation = start(preprocessor, read_training_info(options.adapters[0]))
        if not options.no_base:
            source = str(loaded.reference)
            if uses_dequantized_base(options.adapters, options.qlora_base):
                source += " (NF4 de-quantized)"
            log(f"evaluating base {source}")
            with loaded.model.disable_adapter():
                evaluation.measure("base", source, loaded.model, preprocessor)
        for (label, peft_name), adapter_dir in zip(loaded.names.items(), options.adapters):
            log(f"evaluating {label} ({adapter_dir})")
            loaded.model.set_adapter(peft_name)
            evaluation.measure(label, str(adapter_dir), loaded.model, preprocessor, read_training_info(adapter_dir))
        del loaded
    for reference in options.models:
        log(f"loading model {reference}")
        model = load_full_model(reference, options.dtype, trust_remote_code=options.trust_remote_code)
        preprocessor = model.processor or model.tokenizer
        evaluation = evaluation or start(preprocessor, model.info)
        label = str(reference).rstrip("/").rpartition("/")[2] or str(reference)
        evaluation.measure(label, str(reference), model.model, preprocessor, model.info)
        del model
    return evaluation.report


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
