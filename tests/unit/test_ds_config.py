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
