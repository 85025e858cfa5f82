"""The foundation's promise: `bash launch/train_lora.sh` trains a LoRA end to end with 2 processes + ZeRO-2."""
import math

import pytest
import torch

from tests.conftest import assert_ok, read_history

pytestmark = pytest.mark.slow


def test_default_run_exits_zero_on_an_ascii_console(default_lora_run):
    proc, _ = default_lora_run
    assert_ok(proc)
    assert "--nproc_per_node 2" in proc.stdout, "the launcher must print the exact command it runs"
    assert "ZeRO-2" in proc.stdout and "2 processes" in proc.stdout


def test_eval_loss_falls_below_seventy_percent_of_the_first(default_lora_run):
    _, run_dir = default_lora_run
    history = read_history(run_dir)
    evals = history["evals"]
    assert evals[0]["step"] == 0, "the baseline eval runs before training"
    assert evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"], evals


def test_history_has_documented_fields(default_lora_run):
    _, run_dir = default_lora_run
    history = read_history(run_dir)
    assert history["status"] == "completed"
    assert history["metadata"]["world_size"] == 2 and history["metadata"]["zero_stage"] == 2
    for record in history["records"]:
        for field in ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s"):
            assert field in record, field
        assert math.isfinite(record["loss"]) and record["loss"] > 0
    assert any("eval_loss" in r for r in history["records"])
    assert history["best"]["step"] > 0 and (run_dir / "best").is_dir()
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
