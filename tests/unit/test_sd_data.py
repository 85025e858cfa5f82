"""Image-caption data for the diffusion recipe: the shipped tiny dataset, reading with clear errors, pixel
transforms, deterministic sampling."""
import json
import types
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO
from finetune_launcher.data.records import DataError
from finetune_launcher.data.sampling import ShardedSampler
from finetune_launcher.recipes.diffusion.data import (eval_batches, image_to_pixels, load_image_captions,
                                                      read_imagefolder, training_batch)

SHIPPED = REPO / "data" / "tiny_sd"


@pytest.fixture(scope="module")
def clip_tokenizer():
    from transformers import AutoTokenizer

    from finetune_launcher.models.references import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-sd"), subfolder="tokenizer")


def write_folder(folder, rows, size=(24, 24)):
    """An imagefolder with one solid picture per row whose file_name ends in .png (other rows written as given)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        if isinstance(row, dict) and str(row.get("file_name", "")).endswith(".png"):
            Image.new("RGB", size, (10 * i, 100, 200)).save(folder / row["file_name"])
        lines.append(row if isinstance(row, str) else json.dumps(row))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_make_script_regenerates_the_shipped_dataset_byte_identically(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "data" / "make_tiny_sd_dataset.py"), "--out-dir",
                           str(tmp_path / "again")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shipped = sorted(p.relative_to(SHIPPED) for p in SHIPPED.rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert shipped == again and len(shipped) == 192 + 16 + 2
    assert all((SHIPPED / p).read_bytes() == (tmp_path / "again" / p).read_bytes() for p in shipped)
    assert sum((SHIPPED / p).stat().st_size for p in shipped) < 1_000_000


def test_shipped_splits_load_with_captions_of_shapes():
    train, validation = load_image_captions(SHIPPED), load_image_captions(SHIPPED, split="validation")
    assert (len(train), len(validation)) == (192, 16)
    assert all(c.startswith("a ") and c.endswith(" background") for c in train.captions + validation.captions)
    assert train.open_image(0).size == (64, 64)
    assert {c.split()[3] for c in train.captions} == {"circle", "square", "triangle"}


def test_missing_image_names_metadata_file_and_line(tmp_path):
    folder = write_folder(tmp_path / "f", [{"file_name": "a.png", "text": "x"}, {"file_name": "gone.png", "text": "y"}])
    (folder / "gone.png").unlink()
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: image file 'gone\.png' not found"):
        read_imagefolder(folder)


def test_unreadable_image_names_metadata_file_and_line(tmp_path):
    folder = write_folder(tmp_path / "f", [{"file_name": "a.png", "text": "x"}, {"file_name": "b.png", "text": "y"}])
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    data = read_imagefolder(folder)
    assert data.open_image(0).size == (24, 24)
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: cannot read image .*b\.png"):
        data.open_image(1)


def test_malformed_line_and_missing_caption_name_the_line_and_key(tmp_path):
    folder = write_folder(tmp_path / "bad", [{"file_name": "a.png", "text": "x"}, '{"file_name": "b.png", "te'])
    with pytest.raises(DataError, match=r"metadata\.jsonl:2: malformed JSON"):
        read_imagefolder(folder)
    folder = write_folder(tmp_path / "nocap", [{"file_name": "a.png", "caption": "x"}])
    with pytest.raises(DataError, match=r"metadata\.jsonl:1: field 'text' must be a non-empty string.*caption_column"):
        read_imagefolder(folder)
    assert read_imagefolder(folder, caption_column="caption").captions == ["x"]
    with pytest.raises(DataError, match=r"no metadata\.jsonl"):
        read_imagefolder(tmp_path)


def test_dataset_columns_are_named_in_the_config(tmp_path):
    import datasets

    rows = {"picture": [Image.new("RGB", (8, 8), (255, 0, 0))], "caption": ["a red square"]}
    features = datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "d.parquet"))
    source = str(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"no column 'image' \(columns: picture, caption\); set image_column"):
        load_image_captions(source, caption_column="caption")
    data = load_image_captions(source, image_column="picture", caption_column="caption")
    assert data.captions == ["a red square"] and data.open_image(0).getpixel((0, 0)) == (255, 0, 0)
    assert data.wheres[0].endswith("row 0")


def test_pixels_resize_crop_and_flip():
    # 80x40: the shorter side becomes 16, so 32x16; left half black, right half white.
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    image = Image.fromarray(pixels)
    centre = image_to_pixels(image, 16)
    assert centre.shape == (3, 16, 16) and centre.min() == -1.0 and centre.max() == 1.0
    assert centre[:, :, :7].max() == -1.0 and centre[:, :, 9:].min() == 1.0  # the centre crop straddles the edge
    assert torch.equal(image_to_pixels(image, 16, flip=True), centre.flip(-1))
    import random

    crops = {tuple(image_to_pixels(image, 16, center_crop=False, rng=random.Random(s)).mean(0)[0].tolist())
             for s in range(20)}
    assert len(crops) > 3  # random crops move
    assert torch.equal(image_to_pixels(image, 16, center_crop=False, rng=random.Random(3)),
                       image_to_pixels(image, 16, center_crop=False, rng=random.Random(3)))


def test_sampler_batches_are_a_pure_function_of_seed_rank_and_step(clip_tokenizer):
    data = load_image_captions(SHIPPED)

    class sampler:  # the diffusion task's draw: sampled indices, collated into training batches
        def __init__(self, rank, seed=7):
            self.rank, self.cfg = rank, types.SimpleNamespace(seed=seed, resolution=32, center_crop=False,
                                                              random_flip=True)
            self.indices = ShardedSampler(len(data), rank, 2, 2, 3, seed)
            self.steps_per_epoch = self.indices.steps_per_epoch

        def micro_batches(self, epoch, step):
            return [training_batch(data, clip_tokenizer, group, self.cfg, epoch, step, self.rank, k)
                    for k, group in enumerate(self.indices.micro_batches(epoch, step))]

    first, again = sampler(0).micro_batches(1, 4), sampler(0).micro_batches(1, 4)
    assert len(first) == 3 and first[0]["pixel_values"].shape == (2, 3, 32, 32)
    assert first[0]["input_ids"].shape == (2, clip_tokenizer.model_max_length)
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other_rank = sampler(1).micro_batches(1, 4)

    def indices(batches):
        return [int(i) for b in batches for i in b["index"]]

    assert not set(indices(first)) & set(indices(other_rank))
    assert len({int(b["noise_seed"]) for b in first + other_rank}) == 6
    assert not torch.equal(sampler(0, seed=8).micro_batches(1, 4)[0]["index"], first[0]["index"])
    caption = data.captions[int(first[0]["index"][0])]
    assert clip_tokenizer.decode(first[0]["input_ids"][0], skip_special_tokens=True) == caption
    steps = sampler(0).steps_per_epoch
    epoch = [i for step in range(steps) for i in indices(sampler(0).micro_batches(0, step))]
    assert len(set(epoch)) == len(epoch) == steps * 6  # no picture twice in an epoch on a rank


def test_eval_batches_give_every_rank_the_same_forwards_and_cover_each_image_once(clip_tokenizer):
    data = load_image_captions(SHIPPED, split="validation")  # 16 images over 3 ranks
    shares = [eval_batches(data, clip_tokenizer, rank, 3, 4, 32) for rank in range(3)]
    assert len({len(s) for s in shares}) == 1 and all(b["pixel_values"].shape[0] == 4 for s in shares for b in s)
    real = sorted(int(i) for s in shares for b in s for i, w in zip(b["index"], b["weight"]) if w == 1)
    assert real == list(range(16))
