import json

import pytest

from train.config import ConfigError, load_config
from train.engine import DS_CONFIG_DIR, resolve_ds_config


def cfg(**extra):
    return load_config(overrides={"mode": "lora", "model": "m", "dataset": "d.jsonl", "micro_batch_size": 2,
                                  "gradient_accumulation_steps": 4, **extra})


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (2, True), (3, True)])
def test_shipped_files_resolve_and_deepspeed_parses_them(stage, offload):
    from deepspeed.runtime.config import DeepSpeedConfig

    config = cfg(zero_stage=stage, offload=offload)
    resolved = resolve_ds_config(config, world_size=2, hidden_size=64, precision="bf16", on_gpu=True)
    assert resolved["train_batch_size"] == 16 and resolved["bf16"]["enabled"] and not resolved["fp16"]["enabled"]
    assert resolved["zero_optimization"]["overlap_comm"] is False  # the safe default
    parsed = DeepSpeedConfig(dict(resolved, train_batch_size=2 * 4), mpu=None)  # world of one here
    assert parsed.zero_optimization_stage == stage
    assert parsed.gradient_accumulation_steps == 4


def test_fp16_fills_loss_scaling_section():
    resolved = resolve_ds_config(cfg(), 1, 64, "fp16", on_gpu=True)
    assert resolved["fp16"]["enabled"] and resolved["fp16"]["loss_scale"] == 0  # 0 = dynamic


def test_users_file_with_auto_and_extra_sections_is_accepted(tmp_path):
    user = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2, "overlap_comm": True},
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
            "scheduler": {"type": "WarmupLR"}, "flops_profiler": {"enabled": False}}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(user))
    resolved = resolve_ds_config(cfg(deepspeed_config=str(path)), 2, 64, "fp32")
    assert resolved["flops_profiler"] == {"enabled": False}
    assert "optimizer" not in resolved and resolved["zero_optimization"]["overlap_comm"] is True


def test_contradictions_are_reported_with_key_and_both_values(tmp_path):
    user = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": 3}, "optimizer": {"params": {"lr": 5e-5}}}
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError) as error:
        resolve_ds_config(cfg(deepspeed_config=str(path), learning_rate=2e-4, zero_stage=2), 2, 64, "fp32")
    message = str(error.value)
    assert "'train_micro_batch_size_per_gpu' is 8" in message and "gives 2" in message
    assert "'zero_optimization.stage' is 3" in message
    assert "'optimizer.params.lr' is 5e-05" in message


def test_broken_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 3"):
        resolve_ds_config(cfg(deepspeed_config=str(path)), 1, 64, "fp32")


def test_every_shipped_ds_config_is_named_for_its_stage():
    for path in DS_CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert f"zero{data['zero_optimization']['stage']}" in path.name


def test_zero3_keeps_lora_matrices_whole_on_every_rank():
    """Partitioned LoRA matrices are gathered and released on every pass; the persistence threshold keeps them."""
    from types import SimpleNamespace

    from train.model import largest_adapter_tensor

    arch = SimpleNamespace(hidden_size=64, intermediate_size=512)
    lora = cfg(zero_stage=3, lora_r=16)
    resolved = resolve_ds_config(lora, 2, 64, "bf16", on_gpu=True, largest_adapter=largest_adapter_tensor(lora, arch))
    assert resolved["zero_optimization"]["stage3_param_persistence_threshold"] == 16 * 512
    full = cfg(zero_stage=3, mode="full")
    resolved = resolve_ds_config(full, 2, 64, "bf16", on_gpu=True, largest_adapter=largest_adapter_tensor(full, arch))
    assert resolved["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * 64


def test_liger_kernels_are_refused_clearly_where_they_cannot_run():
    import torch

    from train.model import liger_kernels_wanted

    cpu = torch.device("cpu")
    assert liger_kernels_wanted(cfg(), cpu, "llama") is False  # auto: silently off on a CPU
    assert liger_kernels_wanted(cfg(liger_kernel=False), cpu, "llama") is False
    with pytest.raises(ValueError, match="liger_kernel: true but .*CUDA GPU.*liger_kernel: auto"):
        liger_kernels_wanted(cfg(liger_kernel=True), cpu, "llama")
    with pytest.raises(ConfigError, match="liger_kernel"):
        cfg(liger_kernel="yes")


def test_users_bucket_sizes_are_kept(tmp_path):
    """Tuning values with no run-config key are the user's choice, not a contradiction."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8,
                                                      "stage3_param_persistence_threshold": 1e4}}))
    resolved = resolve_ds_config(cfg(deepspeed_config=str(path), zero_stage=3), 1, 64, "bf16", on_gpu=True)
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert resolved["zero_optimization"]["stage3_param_persistence_threshold"] == 1e4
    assert resolved["zero_optimization"]["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (2, True), (3, True)])
def test_shipped_files_resolve_for_fp16_with_dynamic_loss_scaling(stage, offload):
    from deepspeed.runtime.config import DeepSpeedConfig

    resolved = resolve_ds_config(cfg(zero_stage=stage, offload=offload), world_size=2, hidden_size=64,
                                 precision="fp16", on_gpu=True)
    assert resolved["fp16"]["enabled"] and not resolved["bf16"]["enabled"]
    assert resolved["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    parsed = DeepSpeedConfig(dict(resolved, train_batch_size=2 * 4), mpu=None)  # world of one here
    assert parsed.float16_config.enabled and parsed.float16_config.loss_scale == 0
    assert not parsed.bfloat16_config.enabled
    assert parsed.zero_optimization_stage == stage


def test_overlap_comm_is_off_by_default_and_on_with_the_flag():
    from train.config import parse_overrides

    assert resolve_ds_config(cfg(), 1, 64, "bf16", on_gpu=True)["zero_optimization"]["overlap_comm"] is False
    for stage in (2, 3):
        on = cfg(zero_stage=stage, **parse_overrides(["--overlap_comm", "true"]))
        assert resolve_ds_config(on, 1, 64, "bf16", on_gpu=True)["zero_optimization"]["overlap_comm"] is True


def test_users_overlap_comm_with_contiguous_gradients_is_kept_with_one_warning(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                      "contiguous_gradients": True}}))
    resolved = resolve_ds_config(cfg(deepspeed_config=str(path)), 1, 64, "bf16", on_gpu=True)
    assert resolved["zero_optimization"]["overlap_comm"] is True
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "overlap_comm" in line]
    assert len(lines) == 1 and lines[0].isascii()
    assert "NaN grad norms" in lines[0] and "contiguous_gradients" in lines[0]
    assert '"overlap_comm": false' in lines[0] and str(path) in lines[0]


def test_no_overlap_warning_when_the_pair_is_not_set(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                      "contiguous_gradients": False}}))
    resolve_ds_config(cfg(deepspeed_config=str(path)), 1, 64, "bf16", on_gpu=True)
    resolve_ds_config(cfg(), 1, 64, "bf16", on_gpu=True)  # shipped file, overlap_comm off
    assert "overlap_comm" not in capsys.readouterr().err


def test_resolve_precision_on_cpu(monkeypatch):
    import torch

    from train.engine import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("fp32") == "fp32"
    with pytest.raises(ConfigError) as error:
        resolve_precision("fp16")
    message = str(error.value)
    assert "precision fp16 needs a GPU" in message and "precision: auto or fp32" in message
