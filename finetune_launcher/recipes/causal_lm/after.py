"""The causal LM after training (finetune_launcher/after/parts.py: LanguageModelPart): AutoModelForCausalLM and the
tokenizer saved beside the weights, prompts in the run's text template, the merge checked on a templated instruction
row, and the eval loss and perplexity on a held-out file in any training format. Examples are tokenised and masked by
finetune_launcher.data exactly as in training (prompt tokens and each example's first token unsupervised); rows are
not packed: each example is attended to on its own, which is what packing's block-diagonal mask does too."""
from dataclasses import dataclass

from finetune_launcher.after.bases import load_tokenizer_from
from finetune_launcher.after.evaluation import evaluate_each, loss_result, new_report, summed_token_loss, unique_label
from finetune_launcher.after.generation import (generate_for_case, text_case_from_record, text_prompt_format)
from finetune_launcher.data.records import DataError, check_fields, detect_format, load_records
from finetune_launcher.data.text import DataStats, collate, make_rows, tokenize_records

LABEL = "causal-LM"
COMMANDS = ("evaluate", "generate", "merge")
WEIGHT_FILES = ()  # a peft adapter like any language model's: training_info.json or the base's config tells
PREPROCESSOR = "tokenizer"
TAKES_IMAGES = False
DEMO_PROMPTS = "tools/demo_prompts.jsonl"
MERGE_CHECK = "an instruction row and random token ids"
CHECK_EXAMPLE = ("Sort the numbers from smallest to largest.", "92 99 36 86 87", "36 86 87 92 99")

case_from_record = text_case_from_record


def usage(directory):
    return f"ftl generate text --adapter {directory} --prompt ... (or ftl evaluate, ftl merge)"


def auto_model_class():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load_preprocessor(path, trust_remote_code=False):
    return load_tokenizer_from(path, trust_remote_code)


def training_quantization(path, dtype, trust_remote_code=False):
    """NF4 with double quant, uint8 storage, as the trainer loads a QLoRA base."""
    from finetune_launcher.dtypes import precision_of
    from finetune_launcher.models.prepare import nf4_config

    return nf4_config(precision_of(dtype), "uint8")


def merge_check_inputs(tokenizer, model, scratch_dir):
    """A templated instruction example (the kind of text the adapter was trained on) and random token ids."""
    import torch

    from finetune_launcher.data.prompts import render_instruction_prompt

    instruction, context, response = CHECK_EXAMPLE
    text = render_instruction_prompt(instruction, context) + response
    real = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generator = torch.Generator().manual_seed(0)
    vocab_size = model.get_input_embeddings().weight.shape[0]
    return [{"input_ids": real}, {"input_ids": torch.randint(0, vocab_size, (1, 48), generator=generator)}]


def prompt_format(requested, info):
    return text_prompt_format(requested, info)


def answerer(loaded, fmt, settings):
    return lambda case: generate_for_case(loaded.model, loaded.tokenizer, case, fmt, settings)


# ---------------------------------------------------------------- evaluation

@dataclass
class EvalData:
    records: list
    source: str
    fmt: str


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
    """(token-weighted mean loss, supervised token count) over `rows`, similar lengths batched together."""
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))
    batches = (collate(ordered[start:start + batch_size], pad_id, packed=False)
               for start in range(0, len(ordered), batch_size))
    return summed_token_loss(model, batches)


def prompt_cases(data, count):
    if data.fmt == "text":
        raise DataError(f"{data.source}: --save-examples needs instruction or chat data (a prompt and a reference); "
                        f"this file is plain text")
    return [text_case_from_record(r, ".", f"{data.source} record {i + 1}") for i, r in enumerate(data.records[:count])]


class TextEvaluation:
    """The rows of one held-out file, tokenised once per tokenizer, and the report the models are measured into."""

    def __init__(self, data, options, report):
        self.data, self.options, self.report = data, options, report
        self.rows = {}  # id(tokenizer) -> rows

    def measure(self, label, source, model, tokenizer, info=None):
        """The loss of the active model and, with options.save_examples, its generations for the first examples."""
        if id(tokenizer) not in self.rows:
            self.rows[id(tokenizer)] = eval_rows(self.data, tokenizer, self.report.max_length)
        rows = self.rows[id(tokenizer)]
        loss, tokens = eval_loss(model, rows, tokenizer.pad_token_id, self.options.batch_size)
        label = unique_label(label, source, self.report.results)
        self.report.results[label] = loss_result(source, loss, tokens, len(rows), info)
        if self.options.save_examples:
            self.add_generations(label, model, tokenizer)

    def add_generations(self, label, model, tokenizer):
        cases = prompt_cases(self.data, self.options.save_examples)
        if not self.report.examples:
            self.report.examples = [{"instruction": c.instruction, "context": c.context, "reference": c.reference,
                                     "generations": {}} for c in cases]
        for case, row in zip(cases, self.report.examples):
            row["generations"][label] = generate_for_case(model, tokenizer, case, self.data.fmt,
                                                          self.options.generation)


def evaluate(options, log):
    """Eval loss and perplexity of the base, each adapter and each --model on options.data."""
    data = read_eval_data(options.data, options.format)
    if options.save_examples:
        prompt_cases(data, options.save_examples)  # fail before loading any model
    return evaluate_each(options, log, lambda tokenizer, info: TextEvaluation(data, options,
                                                                              new_report(options, data.fmt, info)))
