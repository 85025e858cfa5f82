"""The DeepSpeed config of a run: shipped files, users' and peers' files, "auto" filling, and which source decides
when the file and the run config disagree (the higher level; the same level is a contradiction)."""
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, resolve
from finetune_launcher.config import ConfigError

TINY = {"mode": "lora", "model": "builtin:tiny-llama", "dataset": "data/tiny_instruct.jsonl"}
HIDDEN, WIDEST = 192, 512  # builtin:tiny-llama

# ZeRO-3 files in the shape the peers ship them (written here, not copied): "auto" batch sizes and precision, an
# optimizer and a scheduler section, offload on or off, stage3_gather_16bit_weights_on_model_save as true or "auto".
PEER_STYLE_ZERO3 = {
    "llama-factory-style": {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "overlap_comm": False, "contiguous_gradients": True, "sub_group_size": 1e9,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
                              "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True}},
    "accelerate-style": {
        "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": False,
                              "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                              "stage3_param_persistence_threshold": "auto",
                              "stage3_gather_16bit_weights_on_model_save": "auto"},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 2000},
    "fastchat-style": {
        "fp16": {"enabled": "auto"},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": False,
                              "stage3_prefetch_bucket_size": 5e8, "stage3_param_persistence_threshold": 1e6,
                              "stage3_gather_16bit_weights_on_model_save": True},
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"},
}

# Peers' ZeRO-3 files as their projects ship them (contents copied): axolotl's deepspeed_configs/zero3_bf16.json and
# zero3_bf16_cpuoffload_all.json name ZeRO-3 fields without the stage3_ prefix, the transformers docs' DeepSpeed page
# writes ds_config_zero3.json with the deprecated stage3_gather_fp16_weights_on_model_save.
PEER_FILES = {
    "axolotl zero3_bf16.json": {
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 0,
                              "reduce_bucket_size": "auto", "prefetch_bucket_size": "auto",
                              "param_persistence_threshold": "auto", "max_live_parameters": 0,
                              "max_reuse_distance": 0, "gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": True}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False},
    "axolotl zero3_bf16_cpuoffload_all.json": {
        "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                              "contiguous_gradients": True, "sub_group_size": 0, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                              "max_live_parameters": 0, "max_reuse_distance": 0,
                              "gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": True}, "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False},
    "transformers docs ds_config_zero3.json": {
        "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                 "hysteresis": 2, "min_loss_scale": 1},
        "optimizer": {"type": "AdamW",
                      "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto"}},
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                              "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                              "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                              "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                              "stage3_gather_fp16_weights_on_model_save": True},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False},
}


def write_json(tmp_path, data, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def resolved(overrides=None, path=None, **kwargs):
    return resolve(path, {**({} if path else TINY), **(overrides or {})}, **kwargs)


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (2, True), (3, True)])
@pytest.mark.parametrize("on,precision", [("H100-80GB", "bf16"), ("V100-32GB", "fp16"), ("cpu", "fp32")])
def test_shipped_files_resolve_and_deepspeed_parses_them(stage, offload, on, precision):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = resolved({"zero_stage": stage, "offload": offload, "micro_batch_size": 2, "gradient_accumulation_steps": 4},
                   on=on)
    ds = cfg.deepspeed_dict()
    assert ds["train_batch_size"] == 2 * 4 * 2 and ds["zero_optimization"]["overlap_comm"] is False
    assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (precision == "bf16", precision == "fp16")
    parsed = DeepSpeedConfig(dict(ds, train_batch_size=2 * 4), mpu=None)  # a world of one here
    assert parsed.zero_optimization_stage == stage and parsed.gradient_accumulation_steps == 4
    if precision == "fp16":
        assert parsed.float16_config.enabled and parsed.float16_config.loss_scale == 0  # dynamic loss scaling


@pytest.mark.parametrize("peer", sorted(PEER_STYLE_ZERO3))
def test_a_peers_zero3_file_on_the_command_line_decides_the_stage_over_the_yaml(tmp_path, peer):
    """`bash launch/train_lora.sh --deepspeed <their ds_z3 file>`: the shipped YAML says zero_stage: 2 and offload:
    false, the file is a ZeRO-3 (with or without offload) file given on the command line, which wins."""
    file = write_json(tmp_path, PEER_STYLE_ZERO3[peer])
    cfg = resolve(REPO / "configs" / "tiny_lora.yaml", {"deepspeed_config": file})
    zero = cfg.deepspeed["zero_optimization"]
    assert cfg.zero_stage == 3 and zero["stage"] == 3
    assert cfg.offload == ("offload_optimizer" in PEER_STYLE_ZERO3[peer]["zero_optimization"])
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # "auto" filled, not refused
    assert "optimizer" not in cfg.deepspeed and "scheduler" not in cfg.deepspeed
    assert any("zero_stage 3 from" in note for note in cfg.decisions["deepspeed"])


def test_the_same_level_contradicts_and_names_both_values(tmp_path):
    file = write_json(tmp_path, PEER_STYLE_ZERO3["llama-factory-style"])
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()) + f"zero_stage: 2\ndeepspeed_config: {file}\n")
    with pytest.raises(ConfigError) as error:
        resolve(yaml_path)
    message = str(error.value)
    assert "gives zero_stage 3" in message and "zero_stage: 2" in message and "auto" in message
    with pytest.raises(ConfigError, match="gives zero_stage 3"):
        resolved({"deepspeed_config": file, "zero_stage": 2})  # both on the command line


def test_a_run_config_value_above_the_file_wins_and_is_written_into_it(tmp_path):
    """The YAML names a ZeRO-3 file; --zero 2 on the command line is the higher level."""
    file = write_json(tmp_path, {**PEER_STYLE_ZERO3["llama-factory-style"], "train_micro_batch_size_per_gpu": 8})
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("".join(f"{k}: {v}\n" for k, v in TINY.items()) + f"deepspeed_config: {file}\n")
    cfg = resolve(yaml_path, {"zero_stage": 2, "micro_batch_size": 2})
    assert cfg.zero_stage == 2 and cfg.deepspeed["zero_optimization"]["stage"] == 2
    assert cfg.micro_batch_size == 2 and cfg.deepspeed["train_micro_batch_size_per_gpu"] == 2
    # ... and a concrete file value with the run-config key at its default is adopted
    assert resolve(yaml_path).micro_batch_size == 8


def test_a_files_precision_and_optimizer_values_are_adopted_over_defaults(tmp_path):
    file = write_json(tmp_path, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
                                 "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.8, 0.99]}}})
    cfg = resolved({"deepspeed_config": file}, on="H100-80GB")
    assert (cfg.precision, cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2) == ("bf16", 5e-5, 0.8, 0.99)
    with pytest.raises(ConfigError, match="gives learning_rate 5e-05"):
        resolved({"deepspeed_config": file, "learning_rate": 1e-4}, on="H100-80GB")


def test_a_ds_file_with_zero3_decides_the_checkpointing_estimate_too(tmp_path):
    """The checkpointing decision is taken after the file is read: a full fine-tune that fits on 8 x H100 only when
    ZeRO-3 shards the model states gets `auto: off` with the ZeRO-3 file and `auto: on` with ZeRO-2."""
    base = {"mode": "full", "model": "Qwen/Qwen2.5-14B-Instruct", "dataset": "d.jsonl", "max_length": 4096}
    zero2 = resolve(None, base, on="H100-80GB", procs=8, require_model=False)
    zero3 = resolve(None, {**base, "deepspeed_config": write_json(tmp_path, PEER_STYLE_ZERO3["llama-factory-style"])},
                    on="H100-80GB", procs=8, require_model=False)
    assert (zero2.zero_stage, zero3.zero_stage) == (2, 3)
    assert zero2.gradient_checkpointing is True and zero3.gradient_checkpointing is False
    from finetune_launcher.launch.preflight import preflight

    assert preflight(zero3).spec.zero_stage == 3 and preflight(zero2).spec.zero_stage == 2


def test_contradicting_batch_size_names_the_key(tmp_path):
    file = write_json(tmp_path, {"train_batch_size": 7, "zero_optimization": {"stage": 2}})
    with pytest.raises(ConfigError, match="train_batch_size is 7 .* set it to \"auto\""):
        resolved({"deepspeed_config": file})


def test_users_file_with_extra_sections_is_passed_through(tmp_path):
    file = write_json(tmp_path, {"zero_optimization": {"stage": 2}, "flops_profiler": {"enabled": False}})
    assert resolved({"deepspeed_config": file}).deepspeed["flops_profiler"] == {"enabled": False}


def test_broken_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "zero_optimization": {"stage": 2},\n  oops\n}')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 3"):
        resolved({"deepspeed_config": str(path)})


def test_zero_stage_1_files_are_refused_with_the_supported_stages(tmp_path):
    with pytest.raises(ConfigError, match="zero_optimization.stage is 1; this trainer runs ZeRO-2 and ZeRO-3"):
        resolved({"deepspeed_config": write_json(tmp_path, {"zero_optimization": {"stage": 1}})})


def test_every_shipped_ds_config_is_named_for_its_stage():
    for path in (REPO / "ds_configs").glob("*.json"):
        data = json.loads(path.read_text())
        assert f"zero{data['zero_optimization']['stage']}" in path.name


def test_zero3_keeps_lora_matrices_whole_on_every_rank():
    """Partitioned LoRA matrices are gathered and released on every pass; the persistence threshold keeps them."""
    lora = resolved({"zero_stage": 3, "lora_r": 16})
    assert lora.deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] == 16 * WIDEST
    full = resolved({"zero_stage": 3, "mode": "full"})
    assert full.deepspeed["zero_optimization"]["stage3_param_persistence_threshold"] == 10 * HIDDEN


def test_users_bucket_sizes_are_kept(tmp_path):
    """Tuning values with no run-config key are the user's choice, not a contradiction."""
    file = write_json(tmp_path, {"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8,
                                                       "stage3_param_persistence_threshold": 1e4}})
    zero = resolved({"deepspeed_config": file}).deepspeed["zero_optimization"]
    assert zero["reduce_bucket_size"] == 5e8 and zero["stage3_param_persistence_threshold"] == 1e4
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)


def test_overlap_comm_is_off_by_default_and_on_with_the_flag():
    for stage in (2, 3):
        assert resolved({"zero_stage": stage}).deepspeed["zero_optimization"]["overlap_comm"] is False
        assert resolved({"zero_stage": stage, "overlap_comm": True}).deepspeed["zero_optimization"]["overlap_comm"]


def test_users_overlap_comm_with_contiguous_gradients_is_kept_with_a_warning(tmp_path):
    file = write_json(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True}})
    cfg = resolved({"deepspeed_config": file})
    assert cfg.deepspeed["zero_optimization"]["overlap_comm"] is True and cfg.overlap_comm is True
    warnings = [n for n in cfg.decisions["deepspeed"] if n.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].isascii() and "NaN grad norms" in warnings[0]
    assert '"overlap_comm": false' in warnings[0] and file in warnings[0]
    quiet = write_json(tmp_path, {"zero_optimization": {"stage": 2, "overlap_comm": True,
                                                        "contiguous_gradients": False}}, "quiet.json")
    assert not [n for n in resolved({"deepspeed_config": quiet}).decisions["deepspeed"] if n.startswith("WARNING")]


def test_offload_on_the_cpu_uses_torch_adamw():
    assert resolved({"offload": True, "zero_stage": 3}).deepspeed["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in resolved({"offload": True}, on="H100-80GB").deepspeed


def test_the_shipped_configs_are_found_from_an_installed_package(tmp_path):
    """pip install puts ds_configs/, the Slurm job and the embedded configs under <prefix>/share/finetune-launcher;
    the package finds them there as in a checkout."""
    import subprocess
    import sys

    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--prefix",
                    str(prefix), str(REPO)], check=True, capture_output=True, timeout=600)
    site = next(prefix.glob("lib/python*/site-packages"))
    code = ("from finetune_launcher.resources import resource; "
            "print(resource('ds_configs/zero3.json')); print(resource('launch/slurm/train.sbatch')); "
            "print(resource('configs/tiny_lora.yaml')); print(resource('data/tiny_instruct.jsonl'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = [Path(line) for line in out.stdout.split()]
    assert all(path.is_file() and prefix in path.parents for path in found), found


# ---------------------------------------------------------------- what DeepSpeed itself accepts

def deepspeed_accepts(cfg):
    """DeepSpeed's own config classes on the resolved dict, as a rank builds them (for a world of one here)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = cfg.deepspeed_dict()
    return DeepSpeedConfig(dict(ds, train_batch_size=cfg.micro_batch_size * cfg.gradient_accumulation_steps))


@pytest.mark.parametrize("peer", sorted(PEER_FILES))
def test_peer_files_in_every_spelling_resolve_to_a_dict_deepspeed_accepts(tmp_path, peer):
    """Each spelling DeepSpeed accepts is one setting: the filler neither adds a second spelling beside the file's
    (DeepSpeed refuses two) nor leaves an unprefixed "auto" unfilled; the file's own values are kept."""
    cfg = resolve(REPO / "configs" / "tiny_lora.yaml", {"deepspeed_config": write_json(tmp_path, PEER_FILES[peer])})
    parsed = deepspeed_accepts(cfg).zero_config
    given = PEER_FILES[peer]["zero_optimization"]
    assert parsed.stage == 3 and parsed.gather_16bit_weights_on_model_save is True
    assert parsed.prefetch_bucket_size == int(0.9 * HIDDEN * HIDDEN)  # "auto" filled in whichever spelling
    live = given.get("max_live_parameters", given.get("stage3_max_live_parameters"))
    assert parsed.max_live_parameters == live


def test_deprecated_and_old_spellings_keep_their_meaning(tmp_path):
    """`cpu_offload: true` is DeepSpeed's old offload_optimizer to the CPU, `bfloat16` its old `bf16`."""
    file = write_json(tmp_path, {"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2, "cpu_offload": True}})
    cfg = resolve(REPO / "configs" / "tiny_lora.yaml", {"deepspeed_config": file})
    assert cfg.offload is True and cfg.precision == "bf16"
    parsed = deepspeed_accepts(cfg)
    assert parsed.zero_config.offload_optimizer.device == "cpu" and parsed.bfloat16_config.enabled


def test_two_spellings_of_one_setting_in_a_file_are_refused_naming_both(tmp_path):
    file = write_json(tmp_path, {"zero_optimization": {"stage": 3, "max_live_parameters": 1e8,
                                                       "stage3_max_live_parameters": 1e9}})
    with pytest.raises(ConfigError) as error:
        resolved({"deepspeed_config": file})
    message = str(error.value)
    assert "'zero_optimization.max_live_parameters'" in message and "'zero_optimization.stage3_max_live_parameters'" \
        in message and "keep one" in message and "\n" not in message


@pytest.mark.parametrize("zero,key,suggestion", [
    ({"stage": 2, "overlap_com": False}, "zero_optimization.overlap_com", "overlap_comm"),
    ({"stage": 3, "offload_param": {"device": "cpu", "pin_memroy": True}}, "zero_optimization.offload_param.pin_memroy",
     "pin_memory"),
])
def test_a_key_deepspeed_does_not_know_is_refused_before_launch(tmp_path, capsys, zero, key, suggestion):
    """The launcher says it in one `error:` line naming the file, the key and the close match, and exits 2; no rank
    starts to fail with DeepSpeed's pydantic traceback."""
    from finetune_launcher.launch.cli import main

    file = write_json(tmp_path, {"zero_optimization": zero})
    assert main(["--mode", "lora", str(REPO / "configs" / "tiny_lora.yaml"), "--deepspeed", file, "--dry-run"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {file}: key '{key}'"), errors
    assert f"did you mean '{suggestion}'" in errors[0] and "Traceback" not in errors[0]


def test_a_value_deepspeed_refuses_names_the_key(tmp_path):
    file = write_json(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": "big"}})
    with pytest.raises(ConfigError, match=r"key 'zero_optimization.reduce_bucket_size'"):
        resolved({"deepspeed_config": file})
