"""The prompt `ftl generate` (tools/generate.py) gives the model is, token for token, the prompt part of the same
example as training tokenises it (finetune_launcher.data.tokenize_records, labels -100 on the prompt), so the template
cannot drift between them."""
import pytest
import torch

from finetune_launcher.after import generate_command
from finetune_launcher.after.loading import LoadedModel
from finetune_launcher.data.text import IGNORE_INDEX, DataStats, tokenize_records

RESPONSE = "36 86 87 92 99"


class RecordingModel:
    """Stands in for the model: records the prompt ids it is given and answers with EOS alone."""

    def __init__(self, eos_id):
        self.eos_id = eos_id
        self.prompts = []

    def parameters(self):
        yield torch.zeros(1)

    def generate(self, input_ids, **kwargs):
        self.prompts.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([[self.eos_id]])], dim=1)


def prompt_fed_by_the_tool(monkeypatch, tokenizer, fmt, *argv):
    """Run `ftl generate`'s main() with its command line, on a model trained with dataset format `fmt`."""
    model = RecordingModel(tokenizer.eos_token_id)
    loaded = LoadedModel("run/best", model, tokenizer, {"dataset_format": fmt}, "run/best")
    monkeypatch.setattr(generate_command, "load", lambda args: loaded)
    monkeypatch.setattr(generate_command, "check_source", lambda args: None)  # no adapter on disk: a stub model
    assert generate_command.main(["text", "--adapter", "run/best", *argv]) == 0
    assert len(model.prompts) == 1
    return model.prompts[0]


def training_record(fmt, instruction, context):
    if fmt == "dolly":
        return {"instruction": instruction, "context": context, "response": RESPONSE}
    if fmt == "alpaca":
        return {"instruction": instruction, "input": context, "output": RESPONSE}
    assert not context
    return {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": RESPONSE}]}


def trained_prompt(tokenizer, fmt, instruction, context):
    """The unsupervised head of the example training builds for this instruction, context and a response."""
    example, = tokenize_records([training_record(fmt, instruction, context)], fmt, tokenizer, 256, DataStats())
    start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in example.labels[:start])
    assert tokenizer.decode(example.labels[start:], skip_special_tokens=True).strip() == RESPONSE
    return example.input_ids[:start]


@pytest.mark.parametrize("fmt,instruction,context", [
    ("dolly", "What color is the fox?", ""),
    ("dolly", "Sort the numbers from smallest to largest.", "92 99 36 86 87"),
    ("dolly", "  Sort the numbers from smallest to largest.\n", "\n92 99 36 86 87  "),  # stripped by the template
    ("alpaca", "Sort the numbers from smallest to largest.", "92 99 36 86 87"),
    ("alpaca", "What color is the fox?", ""),
    ("chat", "What color is the fox?", ""),
])
def test_generate_feeds_the_prompt_training_tokenises(monkeypatch, tiny_tokenizer, fmt, instruction, context):
    argv = ["--prompt", instruction] + (["--context", context] if context else [])
    fed = prompt_fed_by_the_tool(monkeypatch, tiny_tokenizer, fmt, *argv)
    assert fed == trained_prompt(tiny_tokenizer, fmt, instruction, context)
    assert fed  # not an empty prompt that would trivially match


def test_context_changes_the_prompt(monkeypatch, tiny_tokenizer):
    without = prompt_fed_by_the_tool(monkeypatch, tiny_tokenizer, "dolly", "--prompt", "Sort the numbers.")
    with_context = prompt_fed_by_the_tool(monkeypatch, tiny_tokenizer, "dolly", "--prompt", "Sort the numbers.",
                                          "--context", "3 1 2")
    assert "3 1 2" in tiny_tokenizer.decode(with_context) and "3 1 2" not in tiny_tokenizer.decode(without)
