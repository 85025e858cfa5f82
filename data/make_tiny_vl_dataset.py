"""Generate the embedded vision-language dataset: pictures of one shape, drawn with Pillow, with short questions.

Each 64x64 picture shows a circle, square or triangle in one of four colours, placed left, right, top or bottom.
Questions ask for the shape, the colour, the position, or both colour and shape; every answer is one or two words.
Writes into --out-dir (default data/tiny_vl/):
  images/*.png       the pictures (train_*.png, held_*.png)
  train.jsonl        LLaMA-Factory / ms-swift format: `<image>` placeholders in the messages plus an `images` list;
                     some rows are multi-turn, some have a system message, some are text-only (no image)
  train_trl.jsonl    the same rows in the TRL / transformers format: content lists of {"type": "image"} and
                     {"type": "text", "text": ...} items, with the same `images` list
  held_out.jsonl     new pictures (another seed), every question kind once per picture, for evaluation
  retention.jsonl    text-only chat rows (word tasks), a "retention" pool for dataset mixtures
Image paths are relative to the JSONL files. The output is a pure function of the arguments: running the script
again gives byte-identical files. Run: python data/make_tiny_vl_dataset.py [--out-dir DIR] [--n-train N] [--seed S]
"""
import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (225, 195, 20)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48)}
QUESTIONS = {
    "shape": ("What shape is in the picture?", lambda s: s["shape"]),
    "color": ("What color is the shape?", lambda s: s["color"]),
    "position": ("Where is the shape?", lambda s: s["position"]),
    "describe": ("Describe the shape in two words.", lambda s: f"{s['color']} {s['shape']}"),
}
SYSTEM = "Answer with one or two words."
TEXT_FACTS = [
    ("How many sides does a triangle have?", "three"),
    ("How many corners does a square have?", "four"),
    ("Which shape has no corners?", "circle"),
    ("What color do you get by mixing blue and yellow?", "green"),
    ("Which word is the opposite of left?", "right"),
    ("Which word is the opposite of top?", "bottom"),
]
WORDS = ["red", "blue", "green", "gold", "pink", "gray", "cyan", "lime", "navy", "teal", "rose", "plum"]


def random_scene(rng):
    return {"shape": rng.choice(SHAPES), "color": rng.choice(sorted(COLORS)), "position": rng.choice(sorted(POSITIONS)),
            "radius": rng.randint(8, 11), "dx": rng.randint(-3, 3), "dy": rng.randint(-3, 3)}


def draw(scene):
    image = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    cx, cy = POSITIONS[scene["position"]]
    cx, cy, r = cx + scene["dx"], cy + scene["dy"], scene["radius"]
    fill = COLORS[scene["color"]]
    if scene["shape"] == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene["shape"] == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def qa(scene, kind):
    question, answer = QUESTIONS[kind]
    return question, answer(scene)


def llama_factory_row(turns, image, system=False):
    """turns: [(question, answer)]; the image placeholder goes before the first question."""
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for i, (question, answer) in enumerate(turns):
        prefix = "<image>" if image and i == 0 else ""
        messages += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    row = {"messages": messages}
    if image:
        row["images"] = [image]
    return row


def as_trl(row):
    """The same conversation as content lists: `<image>` becomes an {"type": "image"} item."""
    messages = []
    for message in row["messages"]:
        items = []
        for i, text in enumerate(message["content"].split("<image>")):
            if i > 0:
                items.append({"type": "image"})
            if text:
                items.append({"type": "text", "text": text})
        messages.append({"role": message["role"], "content": items})
    out = {"messages": messages}
    if "images" in row:
        out["images"] = row["images"]
    return out


def picture_rows(rng, n_images, prefix, image_dir, held_out):
    rows, kinds = [], sorted(QUESTIONS)
    for i in range(n_images):
        scene = random_scene(rng)
        name = f"images/{prefix}_{i:04d}.png"
        draw(scene).save(image_dir / Path(name).name, format="PNG", optimize=False, compress_level=9)
        if held_out:
            rows += [llama_factory_row([qa(scene, kind)], name) for kind in kinds]
            continue
        first, second = rng.sample(kinds, 2)
        if i % 5 == 0:  # multi-turn: both answers are supervised
            rows.append(llama_factory_row([qa(scene, first), qa(scene, second)], name, system=i % 10 == 0))
        else:
            rows.append(llama_factory_row([qa(scene, first)], name, system=i % 7 == 0))
            rows.append(llama_factory_row([qa(scene, second)], name))
    return rows


def text_rows(rng, n):
    return [llama_factory_row([rng.choice(TEXT_FACTS)], None, system=rng.random() < 0.3) for _ in range(n)]


def retention_rows(rng, n):
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        if i % 2:
            task, answer = "Repeat the words in capital letters.", " ".join(w.upper() for w in words)
        else:
            task, answer = "Reverse the order of the words.", " ".join(reversed(words))
        rows.append({"messages": [{"role": "user", "content": f"{task}\n{' '.join(words)}"},
                                  {"role": "assistant", "content": answer}]})
    return rows


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent / "tiny_vl"),
                        help="where to write the files (created, with its parents, when missing)")
    parser.add_argument("--n-train", type=int, default=400, help="training pictures")
    parser.add_argument("--n-held-out", type=int, default=48, help="held-out pictures")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out_dir)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    train = picture_rows(rng, args.n_train, "train", image_dir, held_out=False)
    train += text_rows(rng, max(1, len(train) // 10))
    rng.shuffle(train)
    held_out = picture_rows(random.Random(args.seed + 1000), args.n_held_out, "held", image_dir, held_out=True)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "train_trl.jsonl", [as_trl(r) for r in train])
    write_jsonl(out / "held_out.jsonl", held_out)
    write_jsonl(out / "retention.jsonl", retention_rows(random.Random(args.seed + 2000), 200))


if __name__ == "__main__":
    main()
