"""Prompts and generation for vision-language models after training. A prompt (text, optionally images) becomes a
conversation ending in an empty assistant turn, tokenised by the functions training uses
(finetune_launcher.recipes.vision_language.data.tokenize_conversation: the processor's chat template, one image token
per image patch group); the tokens before the first supervised label are the prompt, and the images' pixels come from
the training collator, so template, image tokens and pixels are exactly the training ones. Prompts are generated one at
a time and unpadded: the rows are right-padded in training, which batched generation cannot continue from. """
from finetune_launcher.after.generation import PromptCase, decoding_kwargs
from finetune_launcher.data.records import DataError
from finetune_launcher.data.text import IGNORE_INDEX
from finetune_launcher.recipes.vision_language.batching import VLCollator
from finetune_launcher.recipes.vision_language.data import (image_size, image_token_count, normalise_record, render,
                                                            tokenize_conversation)

END_OF_TURN_MARKER = "XQZMARKER"
CHECK_QUESTION, CHECK_ANSWER = "What color is the shape?", "red"


def is_vision_record(record):
    """A conversation with images: an `images` list, or content lists (the TRL / transformers form)."""
    messages = record.get("messages")
    return isinstance(messages, list) and (bool(record.get("images")) or any(
        isinstance(m, dict) and isinstance(m.get("content"), list) for m in messages))


def vl_messages(case):
    """The conversation to answer, as content lists: the case's own (from a dataset row), or one user turn with the
    images first and then the text (the order of the shipped data's "<image>question")."""
    if case.messages:
        return [dict(m) for m in case.messages]
    # "\n" between instruction and context, as the vision-language default's text-only rows are written
    text = f"{case.instruction}\n{case.context}" if case.context else case.instruction
    content = [{"type": "image"} for _ in case.images or ()] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def vl_case_from_record(record, base_dir, where):
    """A prompt case from a vision-language dataset row (messages with <image> placeholders or content lists,
    images relative to `base_dir`); a final assistant turn becomes the reference."""
    _, messages, images = normalise_record(_with_answer_slot(record), base_dir, where)
    reference = None
    if record["messages"][-1].get("role") == "assistant":
        reference = content_text(messages.pop()["content"])
    else:
        messages.pop()  # the empty slot _with_answer_slot added
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise DataError(f"{where}: the conversation has no user message to answer")
    return PromptCase(content_text(users[-1]["content"]), reference=reference, messages=messages, images=images)


def _with_answer_slot(record):
    """normalise_record wants an assistant turn; a prompt-only row gets an empty one."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) and \
            messages[-1].get("role") != "assistant":
        return dict(record, messages=messages + [{"role": "assistant", "content": ""}])
    return record


def content_text(content):
    return "".join(item["text"] for item in content if item["type"] == "text")


class VLPrompter:
    """Turns prompt cases into the inputs generate() takes, for one processor."""

    def __init__(self, processor):
        self.processor = processor
        self.collator = VLCollator(processor, pad_to_multiple=1)
        self.stop_ids = end_of_turn_ids(processor)

    def prompt_row(self, case, where="prompt"):
        """{input_ids, images, image_tokens, where}: the tokens training puts before the answer."""
        images = [str(p) for p in case.images or ()]
        counts = [image_token_count(self.processor, *image_size(p, where)) for p in images]
        messages = vl_messages(case) + [{"role": "assistant", "content": []}]
        ids, labels = tokenize_conversation(self.processor, messages, counts, where)
        first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        return {"input_ids": ids[:first], "labels": [IGNORE_INDEX] * first, "images": images,
                "image_tokens": counts, "where": where}

    def inputs(self, case, where="prompt"):
        """input_ids, attention_mask and, with images, pixel_values, image_grid_thw (and mm_token_type_ids where
        the model takes it: without it Qwen-VL's generate silently uses text positions for the image tokens)."""
        import torch

        row = self.prompt_row(case, where)
        if row["images"]:
            batch = self.collator([row])
            batch.pop("labels")
            return batch
        ids = torch.tensor([row["input_ids"]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def end_of_turn_ids(processor):
    """EOS and the special token the chat template closes an assistant turn with (<|im_end|> for Qwen): training
    supervises that token, so generation stops on it."""
    tokenizer = processor.tokenizer
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rendered = render(processor, [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                  {"role": "assistant", "content": [{"type": "text", "text": END_OF_TURN_MARKER}]}])
    after = tokenizer(rendered.split(END_OF_TURN_MARKER, 1)[-1], add_special_tokens=False)["input_ids"]
    added = getattr(tokenizer, "added_tokens_decoder", {})
    if after and (after[0] in tokenizer.all_special_ids or getattr(added.get(after[0]), "special", False)):
        stops.append(after[0])
    return sorted(set(stops))


def generate_vl(model, prompter, case, settings, stopping_criteria=None, where="prompt"):
    """Generate the answer to `case` (greedy unless settings.temperature > 0); returns the decoded new text."""
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in prompter.inputs(case, where).items()}
    tokenizer = prompter.processor.tokenizer
    kwargs = decoding_kwargs(settings, prompter.stop_ids, tokenizer.pad_token_id)
    if stopping_criteria is not None:
        kwargs["stopping_criteria"] = stopping_criteria
    with torch.no_grad():
        output = model.generate(**inputs, **kwargs)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ---------------------------------------------------------------- rows for checking a merge

def check_batches(processor, image_dir):
    """Two batches to compare a merged model with base + adapter: a picture (drawn into `image_dir`) with a question
    and its answer, through the training tokenisation and collator, and a text-only turn."""
    from PIL import Image, ImageDraw

    path = f"{image_dir}/check.png"
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(image).rectangle((12, 16, 44, 48), fill=(220, 30, 30))
    image.save(path)
    collator = VLCollator(processor, pad_to_multiple=1)
    batches = []
    for content, images in (([{"type": "image"}, {"type": "text", "text": CHECK_QUESTION}], [path]),
                            ([{"type": "text", "text": "Reverse the order of the words.\nred blue"}], [])):
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": [{"type": "text", "text": CHECK_ANSWER}]}]
        counts = [image_token_count(processor, *image_size(p, "merge check")) for p in images]
        ids, _ = tokenize_conversation(processor, messages, counts, "merge check")
        if images:
            batch = collator([{"input_ids": ids, "labels": ids, "images": images, "image_tokens": counts,
                               "where": "merge check"}])
            batch.pop("labels")
        else:
            import torch

            batch = {"input_ids": torch.tensor([ids])}
        batches.append(batch)
    return batches
