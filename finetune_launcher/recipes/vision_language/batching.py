"""Micro-batches of vision-language rows (from finetune_launcher/recipes/vision_language/data.py, whose docstring says
why batches are length-grouped rather than packed, and why a micro-batch without images gets a blank one)."""
import torch

from finetune_launcher.data.prepared import row_length
from finetune_launcher.data.records import DataError
from finetune_launcher.data.sampling import epoch_order, steps_per_epoch
from finetune_launcher.data.text import IGNORE_INDEX
from finetune_launcher.recipes.vision_language.data import load_image


class VLCollator:
    """rows -> the tensors the model's forward takes: input_ids, attention_mask, labels (right padding), and
    pixel_values + image_grid_thw (+ mm_token_type_ids where the processor returns it: Qwen2.5-VL and Qwen3-VL in
    transformers 5 need it for M-RoPE). Pixels are read here, from the rows' image paths."""

    def __init__(self, processor, pad_to_multiple=8):
        self.processor = processor
        tokenizer = processor.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        video_token = getattr(processor, "video_token", None)
        self.video_id = tokenizer.convert_tokens_to_ids(video_token) if video_token else None
        self.token_types = "mm_token_type_ids" in processor.model_input_names
        self.pad_to_multiple = pad_to_multiple
        self.blank_tokens, self.blank_pixels = blank_image(processor)

    def __call__(self, rows):
        ids = [list(r["input_ids"]) for r in rows]
        labels = [list(r["labels"]) for r in rows]
        pixels = self.pixels(rows)
        if pixels is None:
            ids[0] += self.blank_tokens
            labels[0] += [IGNORE_INDEX] * len(self.blank_tokens)
            pixels = self.blank_pixels
        width = -(-max(len(r) for r in ids) // self.pad_to_multiple) * self.pad_to_multiple
        batch = {
            "input_ids": torch.tensor([r + [self.pad_id] * (width - len(r)) for r in ids]),
            "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids]),
            "labels": torch.tensor([r + [IGNORE_INDEX] * (width - len(r)) for r in labels]),
            **pixels,
        }
        if self.token_types:
            types = (batch["input_ids"] == self.image_id).long()
            if self.video_id is not None:
                types += 2 * (batch["input_ids"] == self.video_id).long()
            batch["mm_token_type_ids"] = types
        return batch

    def pixels(self, rows):
        """pixel_values and image_grid_thw of all images of the rows, in row order (the order the model matches
        image features to image tokens); None when there is no image."""
        images = [(path, r["where"], n) for r in rows for path, n in zip(r["images"], r["image_tokens"])]
        if not images:
            return None
        out = self.processor.image_processor(images=[load_image(p, where) for p, where, _ in images],
                                             return_tensors="pt")
        merge = self.processor.image_processor.merge_size
        for (path, where, expected), grid in zip(images, out["image_grid_thw"]):
            got = int(grid.prod()) // (merge * merge)
            if got != expected:
                raise DataError(f"{where}: image {path} now gives {got} image tokens, {expected} when the data was "
                                f"read (the file changed, or the processor's min/max pixels differ)")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def blank_image(processor):
    """(tokens, pixel inputs) of the smallest image the processor makes: one patch-merge window, one image token."""
    from PIL import Image

    image_processor = processor.image_processor
    side = image_processor.patch_size * image_processor.merge_size
    out = image_processor(images=[Image.new("RGB", (side, side), (255, 255, 255))], return_tensors="pt",
                          size={"shortest_edge": side * side, "longest_edge": side * side})
    n = int(out["image_grid_thw"].prod()) // image_processor.merge_size ** 2
    vocab = processor.tokenizer.get_vocab()
    tokens = [vocab["<|vision_start|>"], *[vocab[processor.image_token]] * n, vocab["<|vision_end|>"]]
    return tokens, {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


class LengthGroupedSampler:
    """Deterministic shuffling, length grouping and sharding (the Sampler contract of finetune_launcher/task.py):
    the micro-batches of (epoch, step) are a pure function of the seed and rank, so resume needs only the step
    counter.

    Each optimizer step draws world x micro x accumulation rows from the epoch's shuffled order (the same draw on
    every rank), sorts them by length and cuts them into micro-batches of neighbours; micro-batch k goes to rank
    k mod world, so the ranks' micro-batches at each accumulation step have similar lengths too."""

    def __init__(self, rows, rank, world_size, micro_batch_size, grad_accum, seed):
        self.rows, self.rank, self.world = rows, rank, world_size
        self.micro, self.accum, self.seed = micro_batch_size, grad_accum, seed
        self.per_step = world_size * micro_batch_size * grad_accum
        self.steps_per_epoch = steps_per_epoch(len(rows), world_size, micro_batch_size, grad_accum)
        self._order = (None, None)  # (epoch, its order): shuffled once per epoch

    def micro_batches(self, epoch, step_in_epoch):
        """This rank's micro-batches of one optimizer step: `accum` lists of `micro` row indices."""
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.rows), self.seed, epoch))
        chosen = self._order[1][step_in_epoch * self.per_step:(step_in_epoch + 1) * self.per_step]
        chosen.sort(key=lambda i: (row_length(self.rows, i), i))
        chunks = [chosen[k:k + self.micro] for k in range(0, self.per_step, self.micro)]
        return chunks[self.rank::self.world]
