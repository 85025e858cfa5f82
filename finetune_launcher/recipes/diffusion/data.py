"""Image-caption data for diffusion fine-tunes: read, check, transform, tokenise and batch deterministically.

Sources: a local imagefolder (a directory with metadata.jsonl, one {"file_name": ..., "text": ...} a line: the
convention of diffusers' training scripts and `datasets`' imagefolder; the caption column is configurable), or a hub
dataset through `datasets` with the image and caption columns named in the config. Pictures are resized (shorter
side to the resolution), cropped square (centre or random) and optionally flipped, as PIL + numpy (no torchvision),
to [-1, 1] tensors. The batch of (epoch, step) and its crops, flips and noise seed are pure functions of the seed,
rank and step, so resume needs only the step counter.
"""
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune_launcher.data.prepared import PreparedData
from finetune_launcher.data.records import DataError, read_jsonl
from finetune_launcher.data.sampling import mixed_seed

METADATA = "metadata.jsonl"


@dataclass(frozen=True)
class ImageCaptions:
    """Captioned images, indexed lazily. `wheres[i]` ("metadata.jsonl:LINE" or "DATASET row N") is named in every
    error about image i; `paths[i]` is its file (imagefolder) or None (hub rows, read from `hub` on demand)."""
    captions: list
    wheres: list
    paths: list
    hub: object = None
    image_column: str = "image"

    def __len__(self):
        return len(self.captions)

    def open_image(self, index):
        """Image `index` as RGB, with an error naming its file and line (or dataset row) when it cannot be read."""
        from PIL import Image

        path = self.paths[index]
        try:
            image = Image.open(path) if path is not None else self.hub[index][self.image_column]
            if isinstance(image, Image.Image):
                image.load()
        except (OSError, SyntaxError, ValueError) as exc:  # PIL: unidentified, truncated or corrupt data
            shown = f"image {path}" if path is not None else f"the image in column '{self.image_column}'"
            raise DataError(f"{self.wheres[index]}: cannot read {shown} ({type(exc).__name__}: {exc}); "
                            f"replace the picture or remove its line") from None
        if not isinstance(image, Image.Image):
            raise DataError(f"{self.wheres[index]}: column '{self.image_column}' holds {type(image).__name__}, "
                            f"not an image; set image_column to the dataset's image column")
        return image.convert("RGB")


def read_imagefolder(folder, image_column="file_name", caption_column="text"):
    """An imagefolder: `folder`/metadata.jsonl names each picture (relative to the folder) and its caption."""
    folder = Path(folder)
    metadata = folder / METADATA
    if not metadata.exists():
        raise DataError(f"{folder}: no {METADATA}; an image folder needs one line per picture, e.g. "
                        f'{{"{image_column}": "0001.png", "{caption_column}": "a red circle"}}')
    captions, wheres, paths = [], [], []
    for number, record in read_jsonl(metadata):
        where = f"{metadata}:{number}"
        for key in (image_column, caption_column):
            if not isinstance(record.get(key), str) or not record[key].strip():
                found = f"found {sorted(record)}" if key not in record else f"got {record[key]!r}"
                raise DataError(f"{where}: field '{key}' must be a non-empty string ({found}); set "
                                f"{'image_column' if key == image_column else 'caption_column'} to the right field")
        path = folder / record[image_column]
        if not path.is_file():
            raise DataError(f"{where}: image file '{record[image_column]}' not found ({path}); "
                            f"file names are relative to {folder}")
        captions.append(record[caption_column])
        wheres.append(where)
        paths.append(path)
    if not captions:
        raise DataError(f"{metadata}: no pictures listed")
    return ImageCaptions(captions, wheres, paths)


FILE_LOADERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def read_hub_dataset(name, split, image_column="image", caption_column="text"):
    """A dataset `datasets` loads (a hub name, NAME:CONFIG, or a local parquet / arrow / csv / json file) with an
    image and a caption column."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(name)
    if path.is_file() and path.suffix not in FILE_LOADERS:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'; use an image folder with {METADATA} or "
                        f"a {', '.join(FILE_LOADERS)} file")
    dataset_name, _, config_name = str(name).partition(":")
    try:
        if path.is_file():
            loaded = datasets.load_dataset(FILE_LOADERS[path.suffix], data_files=str(path), split="train")
        else:
            loaded = datasets.load_dataset(dataset_name, config_name or None, split=split)
    except Exception as exc:  # offline, wrong name, wrong split: say what was tried
        raise DataError(f"dataset '{name}' (split {split}) is neither a local image folder nor a loadable "
                        f"dataset ({type(exc).__name__}: {str(exc)[:200]})") from None
    for key, setting in ((image_column, "image_column"), (caption_column, "caption_column")):
        if key not in loaded.column_names:
            raise DataError(f"dataset '{name}' (split {split}) has no column '{key}' (columns: "
                            f"{', '.join(loaded.column_names)}); set {setting}")
    captions = [str(c) for c in loaded[caption_column]]
    wheres = [f"dataset '{name}' ({split}) row {i}" for i in range(len(captions))]
    return ImageCaptions(captions, wheres, [None] * len(captions), loaded, image_column)


def has_split(source, split):
    """Whether `source` has a `split` of its own: SOURCE/SPLIT/metadata.jsonl for an image folder; for a dataset
    `datasets` loads, whether that split loads."""
    path = Path(source)
    if path.is_dir() or path.is_file():
        return (path / split / METADATA).is_file()
    try:
        read_hub_dataset(source, split)
    except DataError:
        return False
    return True


def split_held_out(data, fraction, seed):
    """(kept, held out): a seeded `fraction` of the pictures (at least one) held out, both in their order."""
    from finetune_launcher.data.records import seeded_split

    kept, held = seeded_split(list(range(len(data))), fraction, seed)
    return subset(data, kept), subset(data, held)


def subset(data, indices):
    hub = data.hub.select(indices) if data.hub is not None else None
    return ImageCaptions([data.captions[i] for i in indices], [data.wheres[i] for i in indices],
                         [data.paths[i] for i in indices], hub, data.image_column)


def load_image_captions(source, split="train", image_column=None, caption_column="text"):
    """A local imagefolder (SOURCE/metadata.jsonl, or SOURCE/SPLIT/metadata.jsonl), else a dataset file or a hub
    dataset through `datasets`."""
    path = Path(source)
    if path.is_dir():
        folder = path if (path / METADATA).exists() or not (path / split).is_dir() else path / split
        return read_imagefolder(folder, image_column or "file_name", caption_column)
    return read_hub_dataset(source, split, image_column or "image", caption_column)


def prepare_rows(cfg):
    """The recipe table's `rows` part: the run's training and held-out pictures (read lazily: names and captions)."""
    train_data, held_out = run_pictures(cfg)
    stats = {"format": "imagefolder", "train_images": len(train_data), "eval_images": len(held_out or []),
             "resolution": cfg.resolution}
    return PreparedData(train_data, held_out or [], stats)


def run_pictures(cfg):
    """(training pictures, held-out pictures or None): eval_dataset, else the dataset's validation/ split, else a
    seeded eval_fraction of the training pictures."""
    train_data = load_image_captions(cfg.dataset, cfg.dataset_split, cfg.image_column, cfg.caption_column)
    if cfg.eval_dataset:
        split = "validation" if has_split(cfg.eval_dataset, "validation") else cfg.dataset_split
        return train_data, load_image_captions(cfg.eval_dataset, split, cfg.image_column, cfg.caption_column)
    if has_split(cfg.dataset, "validation"):
        return train_data, load_image_captions(cfg.dataset, "validation", cfg.image_column, cfg.caption_column)
    if cfg.eval_fraction <= 0:
        return train_data, None
    return split_held_out(train_data, cfg.eval_fraction, cfg.seed)


# ---------------------------------------------------------------- pixels and tokens

def image_to_pixels(image, resolution, center_crop=True, flip=False, rng=None):
    """A PIL RGB picture -> float tensor (3, R, R) in [-1, 1]: shorter side resized to R (bilinear), then a centre
    or random (from `rng`) square crop, mirrored left-right when `flip`."""
    from PIL import Image

    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    return pixels.permute(2, 0, 1) / 127.5 - 1.0


def tokenize_captions(tokenizer, captions):
    """CLIP token ids padded / truncated to the tokenizer's length (77 for SD), as the pipeline encodes prompts."""
    return tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def pixel_digest(pixels):
    """A key for the exact pixels a sample feeds the VAE (picture, resolution, crop and flip all included)."""
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- batching

def training_batch(data, tokenizer, indices, cfg, epoch, step_in_epoch, rank, micro):
    """Pictures `indices` of `data` as micro-batch `micro` of a step: pixel_values (B, 3, R, R) in [-1, 1],
    input_ids (B, 77), index (B,) and noise_seed (0-d). Each picture's random crop and flip are seeded by (seed,
    epoch, picture), the noise and timesteps by (seed, epoch, step, rank, micro-batch): a resume draws the same."""
    pixels = []
    for index in indices:
        rng = random.Random(mixed_seed(cfg.seed, "view", epoch, index))
        flip = cfg.random_flip and rng.random() < 0.5
        pixels.append(image_to_pixels(data.open_image(index), cfg.resolution, cfg.center_crop, flip, rng))
    return {"pixel_values": torch.stack(pixels), "index": torch.tensor(indices, dtype=torch.long),
            "input_ids": tokenize_captions(tokenizer, [data.captions[i] for i in indices]),
            "noise_seed": torch.tensor(mixed_seed(cfg.seed, "noise", epoch, step_in_epoch, rank, micro))}


def eval_batches(data, tokenizer, rank, world_size, batch_size, resolution):
    """This rank's share of held-out images, centre-cropped and unflipped, in batches with a `weight` (1 for a real
    image, 0 for padding): every rank gets the same number of batches of the same size, so under ZeRO-3 all ranks
    run the same forwards. The `index` is the image's position in `data`, which fixes its noise and timesteps."""
    per_rank = -(-len(data) // world_size)
    per_rank = -(-per_rank // batch_size) * batch_size
    mine = list(range(rank, len(data), world_size))
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine += [mine[0] if mine else 0] * (per_rank - len(mine))
    batches = []
    for start in range(0, per_rank, batch_size):
        indices = mine[start: start + batch_size]
        pixels = torch.stack([image_to_pixels(data.open_image(i), resolution) for i in indices])
        batches.append({"pixel_values": pixels, "index": torch.tensor(indices, dtype=torch.long),
                        "input_ids": tokenize_captions(tokenizer, [data.captions[i] for i in indices]),
                        "weight": torch.tensor(weights[start: start + batch_size])})
    return batches
