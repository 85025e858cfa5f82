"""The tools after training, through their real command lines, on the embedded default run's best/ and final/:
merge, generate, evaluate and plot; and the errors for a missing or mismatched adapter."""
import json
import math
import random
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, assert_ok, launcher_env, read_history

pytestmark = pytest.mark.slow

PROMPT = "What color is the fox?"
SHARD_SIZE = "2MB"  # the tiny model is ~8 MB in float32: several shards


def run_tool(script, *args, stdin=None, timeout=300):
    """Run tools/<script> as a user would, on an ASCII-only console."""
    env = launcher_env(PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C")
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def assert_clear_error(proc, *expected):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error, proc.stderr[-3000:]
    for text in expected:
        assert text in error[0], error[0]


@pytest.fixture(scope="module")
def run_dir(default_lora_run):
    proc, path = default_lora_run
    assert_ok(proc)
    return path


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    proc = run_tool("merge_lora.py", "--adapter", run_dir / "best", "--out", out, "--max-shard-size", SHARD_SIZE)
    assert_ok(proc)
    return proc, out


@pytest.fixture(scope="module")
def held_out(run_dir, tmp_path_factory):
    """The run's own eval split (same seed and fraction as train.data.prepare_data), so the tool's loss can be
    compared with the loss the trainer recorded for best/."""
    config = read_history(run_dir)["metadata"]["config"]
    lines = [line for line in (REPO / config["dataset"]).read_text().splitlines() if line.strip()]
    order = list(range(len(lines)))
    random.Random(config["seed"]).shuffle(order)
    n_eval = max(1, int(len(lines) * config["eval_fraction"]))
    path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in sorted(order[:n_eval])))
    return path


@pytest.fixture(scope="module")
def evaluation(run_dir, held_out, tmp_path_factory):
    examples = tmp_path_factory.mktemp("eval") / "examples.jsonl"
    proc = run_tool("evaluate.py", "--adapter", run_dir / "best", "--adapter", run_dir / "final", "--data", held_out,
                    "--json", "--save-examples", 3, "--examples-out", examples, "--max-new-tokens", 16)
    assert_ok(proc)
    return proc, json.loads(proc.stdout), examples


# ---------------------------------------------------------------- merge

def test_merge_writes_sharded_safetensors_tokenizer_and_reports_the_check(merged):
    proc, out = merged
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1, list(out.iterdir())
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()
    assert "max abs diff" in proc.stdout, proc.stdout
    info = json.loads((out / "training_info.json").read_text())
    assert info["dataset_format"] == "dolly" and info["merged"]["base_model"] == "builtin:tiny-llama"


def test_merged_model_matches_base_plus_adapter(merged, run_dir, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = merged
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 600, 1000]])
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(out)(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), run_dir / "best")
        tuned_logits = tuned(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_path)(ids).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4), (merged_logits - tuned_logits).abs().max()
    assert not torch.allclose(merged_logits, base_logits, atol=1e-2), "the merge did not change the base"


def test_merge_refuses_to_overwrite_without_the_flag(merged, run_dir):
    _, out = merged
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    proc = run_tool("merge_lora.py", "--adapter", run_dir / "best", "--out", out)
    assert_clear_error(proc, "already exists", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_merge_never_writes_over_its_inputs_or_a_non_model_directory(run_dir, tmp_path, tiny_model_path):
    from train.adapters import AdapterError, check_merge_target

    adapter = run_dir / "best"
    for out in (adapter, run_dir, tiny_model_path):
        with pytest.raises(AdapterError, match="would overwrite the"):
            check_merge_target(out, adapter, tiny_model_path, overwrite=True)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="not a model directory"):
        check_merge_target(tmp_path, adapter, tiny_model_path, overwrite=True)


def test_merge_check_fails_on_logits_beyond_tolerance():
    from train.adapters import logits_difference

    reference = [torch.zeros(1, 4, 8)]
    diff, tolerance = logits_difference(reference, [torch.full((1, 4, 8), 0.01)], torch.float32)
    assert diff == pytest.approx(0.01) and diff > tolerance


# ---------------------------------------------------------------- generate

def test_adapter_and_merged_model_generate_the_same_greedy_text(merged, run_dir):
    _, out = merged
    from_adapter = run_tool("generate.py", "text", "--adapter", run_dir / "best", "--prompt", PROMPT,
                            "--max-new-tokens", 24)
    from_merged = run_tool("generate.py", "text", "--model", out, "--prompt", PROMPT, "--max-new-tokens", 24)
    assert_ok(from_adapter)
    assert_ok(from_merged)
    assert from_adapter.stdout.strip(), "no text generated"
    assert from_adapter.stdout == from_merged.stdout
    assert "prompt template: dolly" in from_adapter.stderr and "prompt template: dolly" in from_merged.stderr


def test_demo_prints_generations_next_to_references(run_dir):
    proc = run_tool("generate.py", "demo", "--adapter", run_dir / "final", "--limit", 2, "--max-new-tokens", 12)
    assert_ok(proc)
    assert "[1/2]" in proc.stdout and "[2/2]" in proc.stdout and "reference:" in proc.stdout, proc.stdout


def test_interactive_answers_each_line_until_end_of_input(run_dir):
    proc = run_tool("generate.py", "interactive", "--adapter", run_dir / "best", "--max-new-tokens", 12,
                    stdin=f"{PROMPT}\nWhat color is the cat?\n")
    assert_ok(proc)
    assert proc.stdout.count("> ") == 3, proc.stdout  # two answers, then the prompt that reads end of input


# ---------------------------------------------------------------- evaluate

def test_evaluate_reports_base_best_final_with_tuned_below_base(evaluation, run_dir):
    _, report, _ = evaluation
    models = report["models"]
    assert set(models) == {"base", "best", "final"}
    for result in models.values():
        assert math.isfinite(result["eval_loss"]) and math.isfinite(result["perplexity"]), result
        assert result["tokens"] > 0
    assert models["best"]["eval_loss"] < models["base"]["eval_loss"]
    assert models["final"]["eval_loss"] < models["base"]["eval_loss"]


def test_evaluate_masks_like_training(evaluation, run_dir):
    """On the run's own eval split, the tool's loss for best/ is the eval loss the trainer recorded for it."""
    _, report, _ = evaluation
    recorded = json.loads((run_dir / "best" / "training_info.json").read_text())["eval_loss"]
    assert report["models"]["best"]["eval_loss"] == pytest.approx(recorded, rel=1e-3)
    first_eval = read_history(run_dir)["evals"][0]
    assert first_eval["step"] == 0
    assert report["models"]["base"]["eval_loss"] == pytest.approx(first_eval["eval_loss"], rel=1e-3)


def test_evaluate_prints_a_table(evaluation):
    proc, _, _ = evaluation
    table = proc.stderr  # with --json on stdout, the table goes to stderr
    assert "eval_loss" in table and "perplexity" in table
    for label in ("base", "best", "final"):
        assert any(line.startswith(label) for line in table.splitlines()), table


def test_save_examples_writes_generations_beside_references(evaluation):
    _, report, path = evaluation
    assert report["examples_file"] == str(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["instruction"] and row["reference"]
        assert set(row["generations"]) == {"base", "best", "final"}


# ---------------------------------------------------------------- plot

def test_plot_works_on_a_run_in_progress(run_dir, tmp_path):
    history = read_history(run_dir)
    history.update(status="running", best=None, records=history["records"][:3], evals=history["evals"][:1])
    path = tmp_path / "training_history.json"
    path.write_text(json.dumps(history))
    png = tmp_path / "curves.png"
    proc = run_tool("plot_history.py", path, "--out", png)
    assert_ok(proc)
    assert png.stat().st_size > 1000
    assert "status running" in proc.stdout


# ---------------------------------------------------------------- errors

def test_missing_adapter_directory_is_a_clear_error(tmp_path):
    proc = run_tool("generate.py", "text", "--adapter", tmp_path / "no_such_run" / "best", "--prompt", PROMPT)
    assert_clear_error(proc, "adapter directory not found", "no_such_run")


def test_adapter_on_another_base_names_the_base_it_expects(run_dir, tmp_path):
    proc = run_tool("evaluate.py", "--adapter", run_dir / "best", "--base", "builtin:small-llama",
                    "--data", REPO / "data" / "tiny_instruct.jsonl")
    assert_clear_error(proc, "trained on base 'builtin:tiny-llama'", "builtin:small-llama")


def test_merge_of_a_qlora_adapter_uses_the_dequantized_base(run_dir, tmp_path):
    """A QLoRA adapter is a LoRA adapter whose run loaded the base in 4 bits; training_info.json says so. Also:
    --overwrite replaces an existing (here empty) directory."""
    adapter = tmp_path / "qlora_best"
    shutil.copytree(run_dir / "best", adapter)
    info = json.loads((adapter / "training_info.json").read_text())
    (adapter / "training_info.json").write_text(json.dumps({**info, "mode": "qlora"}))
    out = tmp_path / "merged"
    out.mkdir()
    proc = run_tool("merge_lora.py", "--adapter", adapter, "--out", out, "--overwrite")
    assert_ok(proc)
    assert "de-quantized" in proc.stdout and (out / "model.safetensors").exists()
