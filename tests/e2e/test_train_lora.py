"""The foundation's promise: `bash launch/train_lora.sh` trains a LoRA end to end with 2 processes + ZeRO-2."""
import math
import re

import pytest
import torch

from tests.conftest import REPO, assert_ok, read_history

pytestmark = pytest.mark.slow


def test_default_run_exits_zero_on_an_ascii_console(default_lora_run):
    proc, _ = default_lora_run
    assert_ok(proc)
    assert "+ fork 2 rank(s) of: " in proc.stdout and " -m finetune_launcher --resolved " in proc.stdout, \
        "the launcher must say how it starts the ranks and what each runs"
    assert "ZeRO-2" in proc.stdout and "2 processes" in proc.stdout
    # the speed switches say what they decided, in one line each, also where they cannot run
    assert "liger kernels: off (Liger's kernels are Triton kernels and need a CUDA GPU" in proc.stdout
    assert "gradient checkpointing: set in the run config" in proc.stdout


def test_eval_loss_falls_as_far_as_the_readme_says(default_lora_run):
    """README: "eval loss falls from about A to about B": the start within 10% of A, the end at most 10% above B."""
    _, run_dir = default_lora_run
    promised = re.search(r"eval loss falls from about (\d+(?:\.\d+)?) to about (\d+(?:\.\d+)?)",
                         (REPO / "README.md").read_text())
    start, end = float(promised.group(1)), float(promised.group(2))
    evals = read_history(run_dir)["evals"]
    assert evals[0]["step"] == 0, "the baseline eval runs before training"
    assert abs(evals[0]["eval_loss"] - start) < 0.1 * start, evals
    assert evals[-1]["eval_loss"] < 1.1 * end, evals


def test_history_has_documented_fields(default_lora_run):
    _, run_dir = default_lora_run
    history = read_history(run_dir)
    assert history["status"] == "completed"
    engine = history["metadata"]["engine"]  # what the DeepSpeed engine reported, not what the test asked for
    assert engine["world_size"] == 2 and engine["zero_stage"] == 2 and engine["precision"] == "fp32"
    for record in history["records"]:
        for field in ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"):
            assert field in record, field
        assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert any("eval_loss" in r for r in history["records"])
    assert history["best"]["step"] > 0 and (run_dir / "best").is_dir()
    saved = {entry["what"] for entry in history["saves"]}
    assert {"best", "final", "checkpoint"} <= saved and all(e["seconds"] >= 0 for e in history["saves"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "training_curves.png").stat().st_size > 1000


@pytest.mark.parametrize("which", ["best", "final"])
def test_saved_adapters_load_with_peft_and_change_logits(default_lora_run, tiny_model_path, which):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir = default_lora_run
    adapter = run_dir / which
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (adapter / name).exists(), name
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), adapter)
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-3)


def test_saved_files_are_readable_by_group_and_others_under_umask_022(default_lora_run):
    """best/, final/, checkpoints and the history are meant to be shared: the run (umask 022) must not leave any of
    them private to its owner, as files written through a temporary file can be (mkstemp makes them 0600)."""
    _, run_dir = default_lora_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    for which in ("best", "final"):
        assert (run_dir / which / "training_info.json") in files, which
    assert (run_dir / "checkpoints" / "latest") in files and (run_dir / "training_history.json") in files
    private = [f"{p.relative_to(run_dir)} {p.stat().st_mode & 0o777:o}" for p in files
               if p.stat().st_mode & 0o044 != 0o044]
    assert not private, "files not readable by group and others: " + ", ".join(private)


def test_history_records_precision_data_and_the_estimate_beside_the_measurement(default_lora_run):
    _, run_dir = default_lora_run
    meta = read_history(run_dir)["metadata"]
    assert meta["precision"] == "fp32" and meta["device"].startswith("cpu"), "CPU runs train in fp32"
    data = meta["data"]
    assert data["format"] == "dolly" and data["truncated"] == 0 and data["dropped_no_response"] == 0
    assert data["train_examples"] + data["eval_examples"] == data["examples"] > 0
    estimate = meta["estimate"]
    assert estimate["predicted_step_time_s"] > 0 and estimate["measured_step_time_s"] > 0
    assert estimate["measured_at_step"] >= 1


def test_rank_zero_alone_shows_progress_with_an_eta(default_lora_run):
    proc, run_dir = default_lora_run
    total = read_history(run_dir)["metadata"]["total_steps"]
    progress = [line for line in proc.stderr.splitlines() if re.match(rf"step \d+/{total} \[[#.]{{20}}\] ", line)]
    assert len(progress) > 3 and all(" ETA " in line for line in progress), proc.stderr[-2000:]
    steps = [int(line.split()[1].split("/")[0]) for line in progress]
    assert steps == sorted(set(steps)), "one progress line per logged step: rank 0 only"
    assert steps[-1] == total and "100%" in progress[-1] and progress[-1].endswith("ETA 0:00:00"), progress[-1]
    assert "estimate vs measured after warm-up" in proc.stdout
