"""Vision-language data: both row formats, labels, the image truncation rule, bad rows, pixel bounds, blank images,
padding, the length-grouped sampler and dataset mixtures, on the shipped tiny dataset and the tiny Qwen3-VL."""
import itertools
import json
import shutil
from collections import Counter

import pytest
import torch
from PIL import Image

from tests.conftest import REPO, vl_settings
from finetune_launcher.config import ConfigError
from finetune_launcher.data.records import DataError
from finetune_launcher.data.text import IGNORE_INDEX, supervised_tokens
from finetune_launcher.data.mixture import mix_sources
from finetune_launcher.recipes.vision_language.data import (load_vl_rows, read_conversations, render, tokenize_rows,
                                        vision_token_ids)
from finetune_launcher.recipes.vision_language.batching import LengthGroupedSampler, VLCollator
from finetune_launcher.lm_task import eval_row_groups

DATA = REPO / "data" / "tiny_vl"


def head_rows(path, n):
    return [json.loads(line) for line in itertools.islice(open(path, encoding="utf-8"), n)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def copy_image(tmp_path, name="pic.png"):
    shutil.copy(DATA / "images" / "train_0000.png", tmp_path / name)
    return name


def image_row(image, question="What shape is in the picture?", answer="circle"):
    return {"messages": [{"role": "user", "content": f"<image>{question}"},
                         {"role": "assistant", "content": answer}], "images": [image]}


def text_row(question="Which shape has no corners?", answer="circle"):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def model(tiny_vl_path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vl_path).eval()


@pytest.fixture(scope="module")
def train_rows(vl_processor, tmp_path_factory):
    path = write_rows(tmp_path_factory.mktemp("vl") / "train.jsonl", head_rows(DATA / "train.jsonl", 120))
    shutil.copytree(DATA / "images", path.parent / "images")
    return load_vl_rows(path, vl_processor, 256)[0]


def test_both_formats_give_identical_tensors(vl_processor, tmp_path):
    shutil.copytree(DATA / "images", tmp_path / "images")
    factory = write_rows(tmp_path / "lf.jsonl", head_rows(DATA / "train.jsonl", 40))
    trl = write_rows(tmp_path / "trl.jsonl", head_rows(DATA / "train_trl.jsonl", 40))
    inline = [json.loads(json.dumps(r)) for r in head_rows(DATA / "train_trl.jsonl", 40)]
    for row in inline:  # the transformers variant: each image item names its file
        paths = iter(row.pop("images", []))
        for message in row["messages"]:
            for item in message["content"]:
                if item["type"] == "image":
                    item["path"] = next(paths)
    inline = write_rows(tmp_path / "inline.jsonl", inline)
    loaded = [load_vl_rows(p, vl_processor, 256)[0] for p in (factory, trl, inline)]
    assert sum(bool(r["images"]) for r in loaded[0]) > 20 and sum(not r["images"] for r in loaded[0]) > 0
    collate = VLCollator(vl_processor)
    for other in loaded[1:]:
        assert [(r["input_ids"], r["labels"], r["images"]) for r in other] == \
            [(r["input_ids"], r["labels"], r["images"]) for r in loaded[0]]
        for a, b in zip(loaded[0][::8], other[::8]):
            batch_a, batch_b = collate([a]), collate([b])
            assert batch_a.keys() == batch_b.keys()
            assert all(torch.equal(batch_a[k], batch_b[k]) for k in batch_a)


def test_tokens_and_pixels_equal_the_processors_own(vl_processor):
    """Our segment-wise tokenisation and lazily read pixels give what processor(text, images) gives for a row."""
    conversation = read_conversations(DATA / "train.jsonl")[0]
    where, messages, paths = conversation
    assert paths  # the first shipped row has an image
    (row,), _ = tokenize_rows([conversation], vl_processor, 256)
    ours = VLCollator(vl_processor, pad_to_multiple=1)([row])
    images = [Image.open(p).convert("RGB") for p in paths]
    reference = vl_processor(text=[render(vl_processor, messages)], images=images, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"):
        assert torch.equal(ours[key], reference[key]), key


def test_labels_only_on_assistant_answers(vl_processor, tmp_path):
    image = copy_image(tmp_path)
    row = {"messages": [{"role": "system", "content": "Answer briefly."},
                        {"role": "user", "content": "<image>What shape is in the picture?"},
                        {"role": "assistant", "content": "square"},
                        {"role": "user", "content": "Where is the shape?"},
                        {"role": "assistant", "content": "left"}], "images": [image]}
    (r,), _ = load_vl_rows(write_rows(tmp_path / "d.jsonl", [row]), vl_processor, 256)
    supervised = [t for t in r["labels"] if t != IGNORE_INDEX]
    assert vl_processor.tokenizer.decode(supervised) == "square<|im_end|>\nleft<|im_end|>\n"
    assert not vision_token_ids(vl_processor) & set(supervised)
    assert r["input_ids"].count(vl_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == r["image_tokens"][0]


def test_rows_cut_through_an_image_are_dropped_and_counted_or_refused(vl_processor, tmp_path):
    pictured = image_row(copy_image(tmp_path), question="Look at this picture, then say which shape you see:")
    pictured["messages"][0]["content"] = pictured["messages"][0]["content"].replace("<image>", "") + "<image>"
    short = text_row("Hi?", "ok")
    (full, plain), _ = load_vl_rows(write_rows(tmp_path / "full.jsonl", [pictured, short]), vl_processor, 256)
    end = full["input_ids"].index(vl_processor.tokenizer.convert_tokens_to_ids("<|vision_end|>"))
    assert len(plain["input_ids"]) <= end
    path = write_rows(tmp_path / "d.jsonl", [pictured, short, pictured])
    rows, stats = load_vl_rows(path, vl_processor, end)  # keeps the image tokens but not the closing marker
    assert (len(rows), stats.dropped_image_overflow, stats.image_rows, stats.text_rows) == (1, 2, 0, 1)
    assert rows[0]["input_ids"] == plain["input_ids"]
    with pytest.raises(DataError, match=rf"d\.jsonl:1: .*max_length {end} would cut through an image"):
        load_vl_rows(path, vl_processor, end, image_overflow="error")
    _, stats = load_vl_rows(path, vl_processor, end + 1)  # the image fits; its answer does not
    assert (stats.dropped_image_overflow, stats.dropped_no_response) == (0, 2)


def test_rows_cut_after_their_images_are_truncated_not_dropped(vl_processor, tmp_path):
    image = copy_image(tmp_path)
    path = write_rows(tmp_path / "d.jsonl", [image_row(image, answer="yellow circle")])
    (full,), _ = load_vl_rows(path, vl_processor, 256)
    cut = len(full["input_ids"]) - 2  # loses the closing <|im_end|> and newline, keeps the image and the answer
    (row,), stats = load_vl_rows(path, vl_processor, cut)
    assert row["input_ids"] == full["input_ids"][:cut] and row["images"] == full["images"]
    assert (stats.truncated, stats.dropped_image_overflow) == (1, 0)


@pytest.mark.parametrize("problem, message", [
    ("missing", r"d\.jsonl:2: image file not found: .*nowhere\.png"),
    ("corrupt", r"d\.jsonl:2: image file cannot be read: .*broken\.png"),
    ("count", r"d\.jsonl:2: 2 image\(s\) listed in 'images' but only 1 placeholder"),
    ("url", r"d\.jsonl:2: image 'https://example\.com/a\.png' is a URL"),
    ("item", r"d\.jsonl:2: messages\[0\]: content\[0\] must be"),
])
def test_bad_rows_name_the_file_and_line(vl_processor, tmp_path, problem, message):
    good = copy_image(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    bad = {"missing": image_row("nowhere.png"), "corrupt": image_row("broken.png"),
           "count": dict(image_row(good), images=[good, good]), "url": image_row("https://example.com/a.png"),
           "item": {"messages": [{"role": "user", "content": [{"type": "audio"}]},
                                 {"role": "assistant", "content": "x"}]}}[problem]
    with pytest.raises(DataError, match=message):
        load_vl_rows(write_rows(tmp_path / "d.jsonl", [image_row(good), bad]), vl_processor, 256)


def test_the_first_bad_row_is_named_with_the_count_of_bad_rows(vl_processor, tmp_path):
    """A missing image on line 2 (found when images are read) and a placeholder mismatch on line 4 (found when
    rows are parsed): the error names line 2 first, and how many lines are bad."""
    good = copy_image(tmp_path)
    rows = [image_row(good), image_row("nowhere.png"), text_row(), dict(image_row(good), images=[good, good]),
            image_row(good)]
    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_vl_rows(path, vl_processor, 256)
    assert str(error.value).startswith(f"{path}:2: image file not found: ")
    assert str(error.value).endswith(f"[the first of 2 bad lines in {path}; also line(s) 4]")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_runs_data_names_its_first_bad_row_whichever_split_holds_it(vl_processor, tmp_path, seed):
    """The launcher's data preparation, with a seeded eval split: a missing image on line 2 and a placeholder
    mismatch on line 5 are named first-line-first whether the split puts them in the train or the eval rows."""
    from types import SimpleNamespace

    from finetune_launcher.recipes.vision_language.data import prepare_vl_data

    good = copy_image(tmp_path)
    rows = [image_row(good)] * 6
    rows[1], rows[4] = image_row("nowhere.png"), dict(image_row(good), images=[good, good])
    path = write_rows(tmp_path / "d.jsonl", rows)
    cfg = SimpleNamespace(dataset=str(path), max_examples=None, eval_dataset=None, eval_fraction=0.5, seed=seed,
                          max_length=256, image_overflow="drop", mix_datasets=None)
    with pytest.raises(DataError) as error:
        prepare_vl_data(cfg, vl_processor)
    assert str(error.value).startswith(f"{path}:2: image file not found: ")
    assert str(error.value).endswith(f"[the first of 2 bad lines in {path}; also line(s) 5]")


def test_an_image_unreadable_at_batch_time_names_its_row(vl_processor, tmp_path):
    image = copy_image(tmp_path)
    rows, _ = load_vl_rows(write_rows(tmp_path / "d.jsonl", [image_row(image)]), vl_processor, 256)
    (tmp_path / image).write_bytes(b"gone")
    with pytest.raises(DataError, match=r"d\.jsonl:1: image file cannot be read"):
        VLCollator(vl_processor)(rows)


def test_max_and_min_pixels_bound_the_image_tokens(tiny_vl_path, tmp_path):
    from finetune_launcher.recipes.vision_language.model import load_processor

    image = copy_image(tmp_path)  # 64x64
    path = write_rows(tmp_path / "d.jsonl", [image_row(image)])
    cases = (({}, 16), ({"max_pixels": 32 * 32}, 4), ({"min_pixels": 128 * 128, "max_pixels": 128 * 128}, 64))
    for bounds, tokens in cases:
        processor = load_processor(vl_settings(**bounds))
        (row,), _ = load_vl_rows(path, processor, 512)
        batch = VLCollator(processor)([row])
        assert row["image_tokens"] == [tokens]
        assert int((batch["input_ids"] == processor.image_token_id).sum()) == tokens
        assert batch["pixel_values"].shape[0] == tokens * 4  # 2x2 patches merge into one token
    with pytest.raises(ConfigError, match="max_pixels: 100 must be an integer of at least 256"):
        load_processor(vl_settings(max_pixels=100))


def test_blank_image_keeps_real_token_outputs(vl_processor, model, tmp_path):
    rows, _ = load_vl_rows(write_rows(tmp_path / "d.jsonl", [text_row(), text_row("Which word is the opposite "
                                                                                  "of top?", "bottom")]),
                           vl_processor, 256)
    batch = VLCollator(vl_processor)(rows)
    image_id = vl_processor.image_token_id
    n0 = len(rows[0]["input_ids"])
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]  # one merge window: one image token
    assert batch["input_ids"][0, n0 + 1].item() == image_id and int((batch["input_ids"] == image_id).sum()) == 1
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert supervised_tokens(batch) == sum(sum(t != IGNORE_INDEX for t in r["labels"][1:]) for r in rows)
    plain = {k: batch[k][:, :n0] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        with_blank = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        without = model(**plain).logits
    torch.testing.assert_close(with_blank[0, :n0], without[0], atol=1e-5, rtol=1e-5)
    n1 = len(rows[1]["input_ids"])
    torch.testing.assert_close(with_blank[1, :n1], model(input_ids=batch["input_ids"][1:, :n1]).logits[0],
                               atol=1e-5, rtol=1e-5)


def test_padding_and_mixed_rows_leave_each_rows_outputs_unchanged(vl_processor, model, train_rows):
    """Right padding with an attention mask, what length-grouped batching relies on: each row's logits in a
    micro-batch of image and text rows of different lengths equal its own unpadded forward's."""
    rows = [next(r for r in train_rows if not r["images"])] + [r for r in train_rows if r["images"]][:3]
    assert len({len(r["input_ids"]) for r in rows}) > 1
    collate = VLCollator(vl_processor, pad_to_multiple=1)
    batch = collate(rows)
    assert batch["image_grid_thw"].shape[0] == 3  # the image rows' images; no blank one
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for i, row in enumerate(rows):
            alone = {k: v for k, v in collate([row]).items() if k != "labels"}
            n = len(row["input_ids"])
            torch.testing.assert_close(logits[i, :n], model(**alone).logits[0, :n], atol=1e-4, rtol=1e-4)


def test_sampler_is_deterministic_sharded_and_length_grouped(train_rows):
    def sampler(rank):
        return LengthGroupedSampler(train_rows, rank, 2, 4, 2, seed=7)

    def step_rows(sampler, epoch, step):
        return [[train_rows[i] for i in micro] for micro in sampler.micro_batches(epoch, step)]

    ranks = [sampler(0), sampler(1)]
    assert ranks[0].steps_per_epoch == len(train_rows) // 16
    seen = []
    for step in range(ranks[0].steps_per_epoch):
        groups = [step_rows(s, 1, step) for s in ranks]
        assert groups[0] == step_rows(sampler(0), 1, step)  # a pure function of (seed, epoch, step, rank)
        assert all(len(g) == 2 and all(len(m) == 4 for m in g) for g in groups)
        micro = sorted(([len(r["input_ids"]) for r in m] for g in groups for m in g), key=lambda m: (min(m), max(m)))
        # micro-batches are runs of neighbours in length: each one's longest row is no longer than the next's shortest
        assert all(max(a) <= min(b) for a, b in zip(micro, micro[1:]))
        seen += [r["where"] for g in groups for m in g for r in m]
    assert len(set(seen)) == len(seen) == ranks[0].steps_per_epoch * 16  # no row twice in an epoch
    assert step_rows(ranks[0], 0, 0) != step_rows(ranks[0], 1, 0)  # a new order each epoch


def test_length_grouping_pads_less_than_random_batches(train_rows):
    sampler = LengthGroupedSampler(train_rows, 0, 1, 4, 4, seed=3)

    def padding(micro_batches):
        return sum(max(len(r["input_ids"]) for r in m) * len(m) - sum(len(r["input_ids"]) for r in m)
                   for m in micro_batches)

    grouped = sum(padding([[train_rows[i] for i in m] for m in sampler.micro_batches(0, s)])
                  for s in range(sampler.steps_per_epoch))
    order = [train_rows[i] for i in range(sampler.steps_per_epoch * 16)]
    plain = padding([order[i:i + 4] for i in range(0, len(order), 4)])
    assert grouped < plain


def test_eval_groups_give_every_rank_the_same_number_of_forwards(train_rows):
    rows = train_rows[:7]
    groups = [eval_row_groups(rows, rank, 2, 2) for rank in range(2)]
    assert len(groups[0]) == len(groups[1]) == 2
    real = [r for g in groups for m in g for r in m if any(t != IGNORE_INDEX for t in r["labels"])]
    assert sorted(r["where"] for r in real) == sorted(r["where"] for r in rows)


def test_mixture_fractions_and_determinism():
    main = [("main", i) for i in range(700)]
    retention = [("retention", i) for i in range(1000)]
    mixed = mix_sources([("main", main), ("retention", retention)], [0.7, 0.3], seed=5)
    counts = Counter(source for source, _ in mixed.records)
    assert counts["main"] == 700 and sorted(r for r in mixed.records if r[0] == "main") == main
    assert abs(counts["retention"] / len(mixed.records) - 0.3) < 0.01
    assert mixed.counts == {"main": 700, "retention": 300} and mixed.repeated == {"main": 0, "retention": 0}
    assert len(set(mixed.records)) == len(mixed.records)  # a large enough pool: no repeats
    assert mix_sources([("main", main), ("retention", retention)], [0.7, 0.3], seed=5).records == mixed.records
    assert mix_sources([("main", main), ("retention", retention)], [0.7, 0.3], seed=6).records != mixed.records


def test_mixture_repeats_a_small_source_only_as_needed():
    mixed = mix_sources([("main", list(range(90))), ("small", ["a", "b", "c", "d"])], [0.9, 0.1], seed=0)
    small = Counter(r for r in mixed.records if isinstance(r, str))
    assert sum(small.values()) == 10 and mixed.repeated["small"] == 6
    assert set(small.values()) <= {2, 3}  # whole passes first, then a draw: as even as possible


@pytest.mark.parametrize("fractions, message", [([0.7, 0.4], "sum to 1.1"), ([0.7], "2 datasets"),
                                                ([1.2, -0.2], "must be in")])
def test_mixture_refuses_bad_fractions(fractions, message):
    with pytest.raises(DataError, match=message):
        mix_sources([("main", [1, 2]), ("other", [3])], fractions, seed=0)


def test_the_data_summary_counts_the_rows_the_run_trains_on(vl_processor, tmp_path, capsys):
    """With a text-only pool mixed in, the summary and the history's counts describe the mixed training rows (the
    rows drawn from the pool, not the whole pool), and the drawn rows are labelled as mixed in."""
    from types import SimpleNamespace

    from finetune_launcher.recipes.vision_language.data import prepare_vl_data
    from finetune_launcher.recipes.vision_language.recipe import report_data

    main = write_rows(tmp_path / "train.jsonl", head_rows(DATA / "train.jsonl", 40))
    shutil.copytree(DATA / "images", tmp_path / "images")
    pool = str(DATA / "retention.jsonl")
    cfg = SimpleNamespace(dataset=str(main), max_examples=None, eval_dataset=None, eval_fraction=0.1, seed=3,
                          max_length=256, image_overflow="drop", mix_datasets=[{"dataset": pool, "fraction": 0.1}])
    data = prepare_vl_data(cfg, vl_processor)
    rows, stats = data.train_rows, data.stats
    pictured = [r for r in rows if r["images"]]
    mixed = stats["mixture"]["counts"][pool]
    assert 0 < mixed < len(head_rows(pool, 1000))
    assert (stats["train_rows"], stats["image_rows"], stats["text_rows"]) == (len(rows), len(pictured),
                                                                              len(rows) - len(pictured))
    assert stats["images"] == sum(len(r["images"]) for r in rows)
    assert stats["image_tokens"] == sum(sum(r["image_tokens"]) for r in rows)
    report_data(stats, cfg)
    summary = capsys.readouterr().out
    assert f"{len(rows)} train / {len(data.eval_rows)} eval rows ({len(rows) - mixed} from {main}, {mixed} mixed " \
           f"in from {pool}): {len(pictured)} with images" in summary, summary
    assert f", {len(rows) - len(pictured)} text-only" in summary, summary
