"""Generate the embedded default image-caption dataset: small pictures of coloured shapes with captions.

Writes an imagefolder (the convention of diffusers' training scripts and `datasets`' imagefolder loader):
  OUT/train/metadata.jsonl        one {"file_name": "00000.png", "text": "a red circle on a white background"} a line
  OUT/train/00000.png ...
  OUT/validation/metadata.jsonl   held-out pictures (same captions' vocabulary, other shapes/positions)
Pictures are drawn with Pillow only (no antialiasing), so the files are byte-identical on every run with the same
arguments. Captions name nothing left/right, so horizontal flips keep them true.
Run: python data/make_tiny_sd_dataset.py [--out-dir DIR] [--train N] [--validation N] [--size PX] [--seed S]
"""
import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 40),
           "purple": (140, 50, 180), "orange": (245, 140, 20)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")


def draw_shape(draw, shape, box, colour):
    left, top, right, bottom = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((left + right) // 2, top), (right, bottom), (left, bottom)], fill=colour)


def make_picture(rng, size):
    """(PIL image, caption) for one random shape of a random colour, size and position."""
    shape, colour, background = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
    scale = rng.choice(SIZES)
    side = rng.randint(size // 5, size // 3) if scale == "small" else rng.randint(size // 2, (size * 3) // 4)
    left, top = rng.randint(1, size - side - 1), rng.randint(1, size - side - 1)
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw_shape(ImageDraw.Draw(image), shape, (left, top, left + side, top + side), COLOURS[colour])
    return image, f"a {scale} {colour} {shape} on a {background} background"


def write_split(directory, count, rng, size):
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        image, caption = make_picture(rng, size)
        name = f"{index:05d}.png"
        image.save(directory / name, format="PNG", optimize=False, compress_level=9)
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_dataset(out_dir, train=192, validation=16, size=64, seed=0):
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    write_split(out_dir / "train", train, rng, size)
    write_split(out_dir / "validation", validation, rng, size)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "tiny_sd"))
    parser.add_argument("--train", type=int, default=192)
    parser.add_argument("--validation", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_dataset(args.out_dir, args.train, args.validation, args.size, args.seed)
    print(f"wrote {args.train} training and {args.validation} validation pictures under {out}")


if __name__ == "__main__":
    main()
