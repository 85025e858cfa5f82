"""Generate the embedded default dataset: a deterministic synthetic instruction task.

Writes data/tiny_instruct.jsonl with Dolly fields (instruction, context, response), data/tiny_chat.jsonl
(the same tasks as `messages` conversations) and data/tiny_text.jsonl (plain `text` documents for language
modelling). The tasks are small enough for a ~2M-parameter model to learn in a few hundred CPU steps, so the
default run shows a real loss drop. Run: python data/make_tiny_dataset.py [--out-dir DIR] [--n N] [--seed S]
"""
import argparse
import json
import random
from pathlib import Path

WORDS = ["red", "blue", "green", "gold", "pink", "gray", "cyan", "lime", "navy", "teal", "rose", "plum"]
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "ant", "bat", "cow", "eel", "hen"]
COLORS = ["black", "white", "brown", "orange", "purple", "yellow"]
ANIMAL_COLOR = {a: COLORS[i % len(COLORS)] for i, a in enumerate(ANIMALS)}


def reverse_words(rng):
    words = rng.sample(WORDS, rng.randint(3, 5))
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def sort_numbers(rng):
    numbers = rng.sample(range(10, 100), rng.randint(3, 5))
    return ("Sort the numbers from smallest to largest.", " ".join(map(str, numbers)),
            " ".join(map(str, sorted(numbers))))


def animal_color(rng):
    animal = rng.choice(ANIMALS)
    return f"What color is the {animal}?", "", f"The {animal} is {ANIMAL_COLOR[animal]}."


def copy_upper(rng):
    words = rng.sample(WORDS, rng.randint(2, 4))
    return "Repeat the words in capital letters.", " ".join(words), " ".join(w.upper() for w in words)


TASKS = [reverse_words, sort_numbers, animal_color, copy_upper]


def make_examples(n, seed):
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        instruction, context, response = TASKS[i % len(TASKS)](rng)
        examples.append({"instruction": instruction, "context": context, "response": response})
    rng.shuffle(examples)
    return examples


def as_chat(example):
    user = example["instruction"] + (f"\n{example['context']}" if example["context"] else "")
    return {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": user},
                         {"role": "assistant", "content": example["response"]}]}


def as_text(examples):
    """Paragraph-like documents, a few facts each, for plain language modelling."""
    for i in range(0, len(examples), 4):
        facts = [f"{e['instruction']} {e['context']} The answer is {e['response']}".replace("  ", " ")
                 for e in examples[i: i + 4]]
        yield {"text": " ".join(facts)}


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        count = 0
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    print(f"wrote {count} records to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(Path(__file__).parent),
                        help="where to write the three files (created, with its parents, when missing)")
    parser.add_argument("--n", type=int, default=2400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    examples = make_examples(args.n, args.seed)
    write_jsonl(out / "tiny_instruct.jsonl", examples)
    write_jsonl(out / "tiny_chat.jsonl", (as_chat(e) for e in examples[:800]))
    write_jsonl(out / "tiny_text.jsonl", as_text(examples[:1600]))


if __name__ == "__main__":
    main()
