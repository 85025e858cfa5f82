"""Eval loss and answer accuracy of vision-language models (base, adapters, merged models) on a held-out JSONL of
image + text conversations.

The loss is over the same rows and labels as training (finetune_launcher.recipes.vision_language.data.tokenize_rows:
assistant turns supervised, rows that max_length would cut through an image dropped; batches from the training
collator), the sum of token losses over all supervised tokens divided by their count, as the trainer's eval computes it.
The accuracy is over the rows whose conversation ends in its one assistant answer: the answer generated greedily from
the prompt (prompts.py), compared with the reference after lower-casing and removing punctuation and extra whitespace
(exact match)."""
import string

from finetune_launcher.after.evaluation import evaluate_each, loss_result, new_report, summed_token_loss, unique_label
from finetune_launcher.after.generation import PromptCase
from finetune_launcher.data.records import DataError
from finetune_launcher.recipes.vision_language.batching import VLCollator
from finetune_launcher.recipes.vision_language.data import read_conversations, tokenize_rows
from finetune_launcher.recipes.vision_language.prompts import VLPrompter, content_text, generate_vl

PROMPT_FORMAT = "vision_language"  # the report's format: the processor's chat template
PUNCTUATION = str.maketrans("", "", string.punctuation)
IMAGE_OVERFLOW = "drop"  # the schema's default; training_info.json does not record the run's choice


def normalise_answer(text, strip=True):
    """Lower case, no punctuation, single spaces: 'The  Blue square.' -> 'the blue square'."""
    text = str(text).lower().translate(PUNCTUATION)
    words = " ".join(text.split())
    if not strip and words and text[-1:].isspace():
        return words + " "  # the next word is still to come: for the prefix test of cannot_match
    return words


def answers_match(generated, reference):
    return normalise_answer(generated) == normalise_answer(reference)


def read_vl_eval_data(path):
    conversations = read_conversations(path)
    if not conversations:
        raise DataError(f"{path}: no records to evaluate on")
    return conversations


def vl_eval_rows(conversations, processor, max_length, source):
    rows, stats = tokenize_rows(conversations, processor, max_length, IMAGE_OVERFLOW)
    if not rows:
        raise DataError(f"{source}: no row is left to evaluate on ({stats.examples} read, "
                        f"{stats.dropped_image_overflow} dropped because max_length {max_length} would cut an image, "
                        f"{stats.dropped_no_response} with no supervised token left); raise --max-length")
    return rows, stats


def answer_cases(conversations):
    """[(where, PromptCase)] for each conversation that ends in its only assistant turn (the reference)."""
    cases = []
    for where, messages, images in conversations:
        if [m["role"] for m in messages].count("assistant") != 1 or messages[-1]["role"] != "assistant":
            continue
        users = [m for m in messages[:-1] if m["role"] == "user"]
        instruction = content_text(users[-1]["content"]) if users else ""
        cases.append((where, PromptCase(instruction, reference=content_text(messages[-1]["content"]),
                                        messages=messages[:-1], images=images)))
    return cases


def vl_eval_loss(model, rows, collator, batch_size=8):
    """(token-weighted mean loss, supervised token count) over `rows`, batched by the training collator."""
    ordered = sorted(rows, key=lambda r: len(r["input_ids"]))
    batches = (collator(ordered[start:start + batch_size]) for start in range(0, len(ordered), batch_size))
    return summed_token_loss(model, batches)


def cannot_match(reference, tokenizer, prompt_length):
    """A stopping criterion that ends generation as soon as the answer so far can no longer normalise to the
    reference (normalising a longer text only appends to the normalised shorter one), so wrong answers cost a few
    tokens, not max_new_tokens."""
    import torch
    from transformers import StoppingCriteria

    target = normalise_answer(reference) + " "

    class CannotMatch(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            text = tokenizer.decode(input_ids[0, prompt_length:], skip_special_tokens=True)
            hopeless = not text.endswith("\ufffd") and not target.startswith(normalise_answer(text, strip=False))
            return torch.full((input_ids.shape[0],), hopeless, dtype=torch.bool, device=input_ids.device)

    return CannotMatch()


def answer_accuracy(model, prompter, cases, settings, keep=0):
    """(correct, scored, generations of the first `keep` cases in full)."""
    from transformers import StoppingCriteriaList

    correct, kept = 0, []
    for i, (where, case) in enumerate(cases):
        if i < keep:
            answer = generate_vl(model, prompter, case, settings, where=where)
            kept.append(answer)
        else:
            length = len(prompter.prompt_row(case, where)["input_ids"])
            stop = StoppingCriteriaList([cannot_match(case.reference, prompter.processor.tokenizer, length)])
            answer = generate_vl(model, prompter, case, settings, stop, where)
        correct += answers_match(answer, case.reference)
    return correct, len(cases), kept


# ---------------------------------------------------------------- one model, then all of them

class VLEvaluation:
    """What every model of one evaluation shares: the rows, the answer cases, the collator and prompter."""

    def __init__(self, conversations, processor, options, report):
        self.options, self.report = options, report
        self.rows, self.stats = vl_eval_rows(conversations, processor, report.max_length, report.data)
        self.cases = answer_cases(conversations)
        self.collator, self.prompter = VLCollator(processor), VLPrompter(processor)

    def measure(self, label, source, model, processor=None, info=None):
        """The loss of the active model and, unless options.no_accuracy, its answer accuracy (processor: the one
        the rows were made with serves every model)."""
        options = self.options
        label = unique_label(label, source, self.report.results)
        loss, tokens = vl_eval_loss(model, self.rows, self.collator, options.batch_size)
        result = loss_result(source, loss, tokens, len(self.rows), info)
        if self.cases and not options.no_accuracy:
            correct, scored, kept = answer_accuracy(model, self.prompter, self.cases, options.generation,
                                                    options.save_examples)
            result.update(accuracy=correct / scored, correct=correct, answers=scored)
            self.keep_examples(label, kept)
        self.report.results[label] = result

    def keep_examples(self, label, generations):
        if not self.report.examples:
            self.report.examples = [{"prompt": case.instruction, "images": case.images, "reference": case.reference,
                                     "where": where, "generations": {}}
                                    for where, case in self.cases[:len(generations)]]
        for row, text in zip(self.report.examples, generations):
            row["generations"][label] = text


def evaluate_vl(options, log):
    """Evaluate the base (unless options.no_base), each vision-language adapter and each --model."""
    conversations = read_vl_eval_data(options.data)

    def start(processor, info):
        evaluation = VLEvaluation(conversations, processor, options, new_report(options, PROMPT_FORMAT, info))
        log(f"{len(evaluation.rows)} rows, {len(evaluation.cases)} with one reference answer")
        return evaluation

    return evaluate_each(options, log, start)
