"""The tools after training, through their real command lines, on the embedded default run's best/ and final/:
merge, generate, evaluate and plot; and the errors for a missing or mismatched adapter. QLoRA: a real QLoRA run's
best/ (test_modes' qlora-z2) merged into and evaluated on the de-quantized base, against the 4-bit model."""
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, assert_ok, launcher_env, read_history

pytestmark = pytest.mark.slow

PROMPT = "What color is the fox?"
PROBE_IDS = [[5, 17, 42, 99, 7, 3, 250, 11, 600, 1000]]
SHARD_SIZE = "2MB"  # the tiny model is ~8 MB in float32: several shards


def run_tool(script, *args, stdin=None, timeout=300, fresh=False):
    """Run tools/<script> with these arguments: its own command line, as `python tools/<script>` runs it, in this
    process (the libraries already imported: a fresh interpreter costs 6-7 s of imports per call on 2 cores), or
    with `fresh` in a new interpreter on an ASCII-only console. One thread either way: the tiny models' small matrix
    products run up to 20x slower with two threads on a loaded 2-core machine."""
    if not fresh:
        return run_tool_here(script, args, stdin)
    env = launcher_env(PYTHONIOENCODING="ascii", LC_ALL="C", LANG="C", OMP_NUM_THREADS=1)
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *map(str, args)], cwd=REPO, env=env,
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def run_tool_here(script, args, stdin=None):
    """tools/<script> run as __main__ in this process with sys.argv, stdin, stdout and stderr swapped for the call;
    its exit status from SystemExit, and an exception it lets escape printed as the traceback a user would see."""
    import contextlib
    import io
    import runpy
    import traceback

    path = str(REPO / "tools" / script)
    saved = sys.argv, sys.stdin, torch.get_num_threads()
    sys.argv, sys.stdin = [path, *map(str, args)], io.StringIO(stdin or "")
    torch.set_num_threads(1)
    out, err, code = io.StringIO(), io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # noqa: BLE001 -- what the interpreter would print and exit 1 on
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, sys.stdin = saved[0], saved[1]
        torch.set_num_threads(saved[2])
    return subprocess.CompletedProcess([sys.executable, path, *map(str, args)], code, out.getvalue(), err.getvalue())


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


def eval_split(run_dir, path):
    """Write the run's own eval split (the trainer's split_eval on its recorded config) to `path`, so a tool's loss
    can be compared with the loss the trainer recorded."""
    from finetune_launcher.config import RunConfig
    from finetune_launcher.data.records import load_records
    from finetune_launcher.data.text import split_eval

    cfg = RunConfig.from_dict(read_history(run_dir)["metadata"]["config"])
    records, lines, _ = load_records(REPO / cfg.dataset)
    _, held_out = split_eval(records, lines, "dolly", cfg)
    path.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return path


@pytest.fixture(scope="module")
def held_out(run_dir, tmp_path_factory):
    return eval_split(run_dir, tmp_path_factory.mktemp("data") / "held_out.jsonl")


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
    ids = torch.tensor(PROBE_IDS)
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
    from finetune_launcher.after.loading import AdapterError
    from finetune_launcher.after.merge import check_merge_target

    adapter = run_dir / "best"
    for out in (adapter, run_dir, tiny_model_path):
        with pytest.raises(AdapterError, match="would overwrite the"):
            check_merge_target(out, adapter, tiny_model_path, overwrite=True)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(AdapterError, match="not a model directory"):
        check_merge_target(tmp_path, adapter, tiny_model_path, overwrite=True)


def test_merge_check_fails_on_logits_beyond_tolerance():
    from finetune_launcher.after.merge import logits_difference

    reference = [torch.zeros(1, 4, 8)]
    diff, tolerance = logits_difference(reference, [torch.full((1, 4, 8), 0.01)], torch.float32)
    assert diff == pytest.approx(0.01) and diff > tolerance


def test_a_failed_merge_check_raises_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    """The saved model's logits come out off by 1.0: merge_adapter raises, leaves no output and no temp directory,
    and an earlier merge at --out (with overwrite) stays as it was."""
    from finetune_launcher.after import merge as adapters

    real_difference = adapters.logits_difference
    monkeypatch.setattr(adapters, "logits_difference",
                        lambda expected, merged, dtype: real_difference(expected, [m + 1.0 for m in merged], dtype))
    parent = tmp_path / "merges"
    out = parent / "merged"
    with pytest.raises(adapters.AdapterError, match="nothing was written"):
        adapters.merge_adapter(run_dir / "best", out, log=lambda message: None)
    assert not out.exists()
    assert list(parent.iterdir()) == [], "a temp directory was left beside --out"

    earlier = parent / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    with pytest.raises(adapters.AdapterError, match="nothing was written"):
        adapters.merge_adapter(run_dir / "best", earlier, overwrite=True, log=lambda message: None)
    assert [p.name for p in parent.iterdir()] == ["earlier"]
    assert [p.name for p in earlier.iterdir()] == ["config.json"] and (earlier / "config.json").read_text() == "{}"


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


def test_base_model_generates_text():
    proc = run_tool("generate.py", "text", "--model", "builtin:tiny-llama", "--prompt", PROMPT, "--max-new-tokens", 16)
    assert_ok(proc)
    assert proc.stdout.strip(), "no text generated"
    assert "model: builtin:tiny-llama; prompt template: dolly" in proc.stderr, proc.stderr


def test_demo_prints_generations_next_to_references(run_dir):
    proc = run_tool("generate.py", "demo", "--adapter", run_dir / "final", "--limit", 2, "--max-new-tokens", 12,
                    fresh=True)  # a new interpreter on an ASCII-only console: the model's text must not crash it
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


def test_another_base_with_the_same_shapes_is_used_as_asked_and_said(run_dir, tiny_model_path, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model_path, other)
    proc = run_tool("generate.py", "text", "--adapter", run_dir / "best", "--base", other, "--prompt", PROMPT,
                    "--max-new-tokens", 8)
    assert_ok(proc)
    assert f"was trained on base 'builtin:tiny-llama'; using --base '{other}' as asked" in proc.stderr, proc.stderr
    same = run_tool("generate.py", "text", "--adapter", run_dir / "best", "--base", tiny_model_path, "--prompt",
                    PROMPT, "--max-new-tokens", 8)
    assert_ok(same)
    assert "as asked" not in same.stderr, "the recorded base under another name is the same base"
    assert same.stdout == proc.stdout, "a copy of the base generates the same text"


def test_without_training_info_the_base_comes_from_adapter_config(run_dir, tmp_path):
    adapter = tmp_path / "plain-peft-adapter"
    shutil.copytree(run_dir / "best", adapter)
    (adapter / "training_info.json").unlink()
    proc = run_tool("generate.py", "text", "--adapter", adapter, "--prompt", PROMPT, "--max-new-tokens", 8)
    assert_ok(proc)
    reference = run_tool("generate.py", "text", "--adapter", run_dir / "best", "--prompt", PROMPT,
                         "--max-new-tokens", 8)
    assert proc.stdout == reference.stdout and proc.stdout.strip()


# ---------------------------------------------------------------- QLoRA: the de-quantized base

@pytest.fixture(scope="module")
def qlora_run(mode_runs):
    """A real QLoRA run: the session's qlora-z2 (trained once, shared with test_modes)."""
    proc, path = mode_runs["qlora-z2"]
    assert_ok(proc)
    assert json.loads((path / "best" / "training_info.json").read_text())["mode"] == "qlora"
    return path


@pytest.fixture(scope="module")
def qlora_merges(qlora_run, tmp_path_factory):
    """best/ merged into the de-quantized base (the default; into an existing empty directory, which --overwrite
    replaces) and, with --qlora-base original, into the original base."""
    root = tmp_path_factory.mktemp("qlora_merge")
    (root / "dequantized").mkdir()
    procs = {"dequantized": run_tool("merge_lora.py", "--adapter", qlora_run / "best", "--out", root / "dequantized",
                                     "--overwrite"),
             "original": run_tool("merge_lora.py", "--adapter", qlora_run / "best", "--out", root / "original",
                                  "--qlora-base", "original")}
    for proc in procs.values():
        assert_ok(proc)
    return procs, {name: root / name for name in procs}


def four_bit_logits(run_dir, ids):
    """best/ on the base loaded in 4 bits as its run loaded it (the run's own config and precision, bitsandbytes on
    the CPU), without merging anything."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_launcher.dtypes import torch_dtype
    from finetune_launcher.models.prepare import disable_cpu_weight_repacking, nf4_config
    from finetune_launcher.models.references import resolve_model_path

    metadata = read_history(run_dir)["metadata"]
    config, precision = metadata["config"], metadata["precision"]
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(config["model"]), dtype=torch_dtype(precision), device_map={"": "cpu"},
        quantization_config=nf4_config(precision, config["bnb_4bit_quant_storage"]))
    disable_cpu_weight_repacking(base)
    model = PeftModel.from_pretrained(base, run_dir / "best").eval()
    with torch.no_grad():
        return model(ids).logits.float()


def saved_model_logits(path, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path)(ids).logits.float()


def test_qlora_merge_matches_the_4bit_model_it_was_trained_as(qlora_run, qlora_merges):
    procs, outs = qlora_merges
    assert "merging into the de-quantized base" in procs["dequantized"].stdout, procs["dequantized"].stdout
    assert "merging into the original full-precision base" in procs["original"].stdout, procs["original"].stdout
    for name, out in outs.items():
        assert json.loads((out / "training_info.json").read_text())["merged"]["qlora_base"] == name
    ids = torch.tensor(PROBE_IDS)
    four_bit = four_bit_logits(qlora_run, ids)
    dequantized = float((saved_model_logits(outs["dequantized"], ids) - four_bit).abs().max())
    original = float((saved_model_logits(outs["original"], ids) - four_bit).abs().max())
    assert dequantized < 1e-4, dequantized
    assert original > 1e-2 and original > 100 * dequantized, (original, dequantized)


def test_qlora_adapter_is_evaluated_and_generates_as_trained(qlora_run, qlora_merges, tmp_path):
    """evaluate.py on the run's own eval split gives the losses the trainer measured on the 4-bit model (step 0 for
    the base, best/'s eval loss); generate.py from the adapter equals the de-quantized merge."""
    _, outs = qlora_merges
    proc = run_tool("evaluate.py", "--adapter", qlora_run / "best", "--data",
                    eval_split(qlora_run, tmp_path / "held_out.jsonl"), "--json")
    assert_ok(proc)
    assert "run on the de-quantized base" in proc.stderr, proc.stderr
    models = json.loads(proc.stdout)["models"]
    recorded = json.loads((qlora_run / "best" / "training_info.json").read_text())["eval_loss"]
    assert models["best"]["eval_loss"] == pytest.approx(recorded, rel=1e-3)
    first_eval = read_history(qlora_run)["evals"][0]
    assert first_eval["step"] == 0
    assert models["base"]["eval_loss"] == pytest.approx(first_eval["eval_loss"], rel=1e-3)
    assert models["base"]["model"] == "builtin:tiny-llama (NF4 de-quantized)"

    from_adapter = run_tool("generate.py", "text", "--adapter", qlora_run / "best", "--prompt", PROMPT,
                            "--max-new-tokens", 24)
    from_merged = run_tool("generate.py", "text", "--model", outs["dequantized"], "--prompt", PROMPT,
                           "--max-new-tokens", 24)
    assert_ok(from_adapter)
    assert_ok(from_merged)
    assert "run on the de-quantized base" in from_adapter.stderr, from_adapter.stderr
    assert from_adapter.stdout.strip() and from_adapter.stdout == from_merged.stdout


def test_qlora_without_bitsandbytes_is_a_clear_error_naming_the_original_base(qlora_run, tmp_path, monkeypatch):
    from finetune_launcher.after import loading, merge

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    out = tmp_path / "merged"
    with pytest.raises(loading.AdapterError, match="needs bitsandbytes.*--qlora-base original"):
        merge.merge_adapter(qlora_run / "best", out, log=lambda message: None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(loading.AdapterError, match="--qlora-base original"):
        loading.load_adapter(qlora_run / "best", device=torch.device("cpu"))


def test_lora_and_qlora_adapters_are_not_evaluated_on_one_base(run_dir, qlora_run):
    proc = run_tool("evaluate.py", "--adapter", run_dir / "best", "--adapter", qlora_run / "best",
                    "--data", REPO / "data" / "tiny_instruct.jsonl")
    assert_clear_error(proc, "separate runs", "--qlora-base original")
