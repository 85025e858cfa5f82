"""The tools after training on the vision-language default (configs/tiny_vl_lora.yaml through the real launcher, 2
processes): the run learns, its best/ answers held-out pictures correctly more often than the base (evaluate.py's
accuracy), evaluate.py measures the loss as training does, merge_lora.py writes a model that loads with
AutoModelForImageTextToText and gives base + adapter's logits, and generate.py answers about a picture. A short QLoRA
run's adapter is evaluated and merged on the de-quantized base, as trained."""
import json
import shutil

import pytest
import torch

from tests.conftest import REPO, assert_ok, read_history
from tests.e2e.test_tools import assert_clear_error, run_tool

pytestmark = pytest.mark.slow

DATA = REPO / "data" / "tiny_vl"
HELD_OUT = DATA / "held_out.jsonl"
PICTURE = DATA / "images" / "held_0001.png"
QUESTION = "Describe the shape in two words."


@pytest.fixture(scope="module")
def run_dir(vl_lora_run):
    proc, path = vl_lora_run
    assert_ok(proc)
    return path


@pytest.fixture(scope="module")
def evaluation(run_dir, tmp_path_factory):
    examples = tmp_path_factory.mktemp("vl_eval") / "examples.jsonl"
    proc = run_tool("evaluate.py", "--adapter", run_dir / "best", "--data", HELD_OUT, "--json", "--save-examples", 2,
                    "--examples-out", examples, "--max-new-tokens", 8)
    assert_ok(proc)
    return proc, json.loads(proc.stdout)["models"], examples


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vl_merge") / "merged"
    proc = run_tool("merge_lora.py", "--adapter", run_dir / "best", "--out", out)
    assert_ok(proc)
    return proc, out


def test_the_default_run_learns(run_dir):
    evals = read_history(run_dir)["evals"]
    assert evals[0]["step"] == 0
    best = json.loads((run_dir / "best" / "training_info.json").read_text())
    assert best["recipe"] == "vision_language"
    assert best["eval_loss"] < 0.7 * evals[0]["eval_loss"], (best["eval_loss"], evals[0]["eval_loss"])


def test_best_answers_held_out_pictures_correctly_more_often_than_the_base(evaluation):
    _, models, _ = evaluation
    assert models["base"]["answers"] == models["best"]["answers"] > 0
    assert models["best"]["accuracy"] > models["base"]["accuracy"], models


def test_evaluate_measures_the_loss_training_measured(evaluation, run_dir):
    """held_out.jsonl is the run's eval_dataset: the tool's losses are the trainer's evals at step 0 and for best/."""
    _, models, _ = evaluation
    recorded = json.loads((run_dir / "best" / "training_info.json").read_text())["eval_loss"]
    assert models["best"]["eval_loss"] == pytest.approx(recorded, rel=1e-3)
    assert models["base"]["eval_loss"] == pytest.approx(read_history(run_dir)["evals"][0]["eval_loss"], rel=1e-3)


def test_the_table_shows_accuracy_beside_the_loss(evaluation):
    proc, _, _ = evaluation
    lines = proc.stderr.splitlines()  # with --json on stdout, the table goes to stderr
    header = next(line for line in lines if line.startswith("model"))
    assert "eval_loss" in header and "accuracy" in header
    for label in ("base", "best"):
        row = next(line for line in lines if line.startswith(label + " "))
        assert "%" in row and "/192" in row, row


def test_save_examples_writes_prompts_images_references_and_generations(evaluation):
    _, _, path = evaluation
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["prompt"] and row["reference"] and set(row["generations"]) == {"base", "best"}
        assert row["images"] and all((DATA / "images" / p.rpartition("/")[2]).is_file() for p in row["images"])


def image_batch(processor):
    """The first held-out rows as training batches them."""
    from finetune_launcher.recipes.vision_language.data import load_vl_rows
    from finetune_launcher.recipes.vision_language.batching import VLCollator

    rows, _ = load_vl_rows(HELD_OUT, processor, 256)
    batch = VLCollator(processor)(rows[:3])
    batch.pop("labels")
    return batch


def test_merged_model_loads_with_the_ecosystem_and_gives_base_plus_adapter_logits(merged, run_dir, tiny_vl_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from finetune_launcher.recipes.vision_language.after import load_preprocessor

    proc, out = merged
    assert "max abs diff" in proc.stdout and (out / "processor_config.json").is_file()
    batch = image_batch(load_preprocessor(out))
    with torch.no_grad():
        merged_logits = AutoModelForImageTextToText.from_pretrained(out)(**batch).logits
        base = AutoModelForImageTextToText.from_pretrained(tiny_vl_path)
        base_logits = base(**batch).logits
        tuned_logits = PeftModel.from_pretrained(base, run_dir / "best")(**batch).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4), (merged_logits - tuned_logits).abs().max()
    assert not torch.allclose(merged_logits, base_logits, atol=1e-2), "the merge did not change the base"
    info = json.loads((out / "training_info.json").read_text())
    assert info["recipe"] == "vision_language" and info["merged"]["base_model"] == "builtin:tiny-qwen3-vl"


def test_adapter_and_merged_model_answer_about_a_picture_alike(merged, run_dir):
    _, out = merged
    args = ("--image", PICTURE, "--prompt", QUESTION, "--max-new-tokens", 8)
    from_adapter = run_tool("generate.py", "text", "--adapter", run_dir / "best", *args)
    from_merged = run_tool("generate.py", "text", "--model", out, *args)
    assert_ok(from_adapter)
    assert_ok(from_merged)
    assert from_adapter.stdout.strip() and from_adapter.stdout == from_merged.stdout
    assert "prompt template: vision_language" in from_adapter.stderr


def test_demo_and_interactive_take_images(run_dir, tmp_path):
    shutil.copy(PICTURE, tmp_path / "picture.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": QUESTION, "image": "picture.png", "reference": "yellow circle"}) + "\n"
                       + json.dumps({"prompt": "Reverse the order of the words.", "context": "red blue"}) + "\n")
    demo = run_tool("generate.py", "demo", "--adapter", run_dir / "best", "--prompts", prompts, "--max-new-tokens", 8,
                    fresh=True)  # a new interpreter on an ASCII-only console
    assert_ok(demo)
    assert f"(image {tmp_path / 'picture.png'})" in demo.stdout and "[2/2]" in demo.stdout, demo.stdout
    interactive = run_tool("generate.py", "interactive", "--adapter", run_dir / "best", "--max-new-tokens", 8,
                           stdin=f"/image {tmp_path / 'missing.png'}\n/image {PICTURE}\n{QUESTION}\n{QUESTION}\n")
    assert_ok(interactive)
    assert "image file not found" in interactive.stderr and "goes with the next prompt" in interactive.stderr
    assert interactive.stdout.count("> ") == 5, interactive.stdout  # 4 lines, then the prompt that reads the end
    answers = [line.replace("> ", "").strip() for line in interactive.stdout.splitlines()]
    assert len([a for a in answers if a]) == 2, interactive.stdout


def test_an_image_for_a_text_model_is_a_clear_error(tmp_path):
    proc = run_tool("generate.py", "text", "--model", "builtin:tiny-llama", "--image", PICTURE, "--prompt", QUESTION)
    assert_clear_error(proc, "--image needs a vision-language model", "builtin:tiny-llama")
    missing = run_tool("generate.py", "text", "--model", "builtin:tiny-llama", "--image", tmp_path / "no.png",
                       "--prompt", QUESTION)
    assert_clear_error(missing, "image file not found", "no.png")


@pytest.fixture(scope="module")
def qlora_run(recipe_runs):
    """The vision-language QLoRA default (configs/tiny_vl_qlora.yaml, shortened), shared with the recipe's tests."""
    proc, run_dir = recipe_runs["vl-qlora"]
    assert_ok(proc)
    return run_dir


def test_a_qlora_vl_adapter_and_its_merge_are_evaluated_as_trained(qlora_run, tmp_path):
    """On the de-quantized base the tools reproduce the trainer's 4-bit eval losses (step 0 for the base, best/'s),
    and the merged model gives best/'s loss."""
    merged = tmp_path / "merged"
    assert_ok(run_tool("merge_lora.py", "--adapter", qlora_run / "best", "--out", merged))
    proc = run_tool("evaluate.py", "--adapter", qlora_run / "best", "--model", merged, "--data", HELD_OUT, "--json",
                    "--no-accuracy")
    assert_ok(proc)
    models = json.loads(proc.stdout)["models"]
    recorded = json.loads((qlora_run / "best" / "training_info.json").read_text())
    assert recorded["mode"] == "qlora" and models["base"]["model"].endswith("(NF4 de-quantized)")
    assert models["base"]["eval_loss"] == pytest.approx(read_history(qlora_run)["evals"][0]["eval_loss"], rel=1e-3)
    assert models["best"]["eval_loss"] == pytest.approx(recorded["eval_loss"], rel=1e-3)
    assert models["merged"]["eval_loss"] == pytest.approx(models["best"]["eval_loss"], rel=1e-4)
    assert "accuracy" not in models["best"]
