"""Which engine a sharded run gets before launch (`engine: auto` and the refusals of `engine: fsdp2`), and what a
checkpoint is compared on when it resumes: the global batch for engines whose checkpoints load on any number of
processes, the engine itself across engines (the training itself is in tests/e2e/test_fsdp2.py)."""
import json

import pytest

from finetune_launcher.checkpoint import IDENTITY_FILE, resume_differences, training_identity
from finetune_launcher.config import ConfigError
from tests.conftest import resolve

TINY = {"mode": "lora", "model": "builtin:tiny-llama", "dataset": "data/tiny_instruct.jsonl"}


def resolved(on="H200", procs=2, **overrides):
    return resolve(None, {**TINY, **overrides}, on=on, procs=procs)


@pytest.mark.parametrize("mode", ["lora", "qlora", "full"])
def test_zero3_on_gpus_runs_fsdp2_with_compiled_layers(mode):
    cfg = resolved(mode=mode, zero_stage=3)
    assert cfg.engine == "fsdp2" and "1.07x the unsharded step" in cfg.decisions["engine"]
    assert cfg.compile_layers is True


@pytest.mark.parametrize("overrides,why", [
    ({"deepspeed_config": "ds_configs/zero3.json"}, "a DeepSpeed file was given (ds_configs/zero3.json)"),
    ({"offload": True}, "optimizer offload is DeepSpeed's"),
    ({"precision": "fp16"}, "fp16 loss scaling is DeepSpeed's"),
    ({"engine": "deepspeed"}, "set in the run config"),
])
def test_zero3_keeps_deepspeed_exactly_where_it_is_asked_for_or_fsdp2_is_not_the_measured_choice(overrides, why):
    cfg = resolved(**{"zero_stage": 3, **overrides})
    assert cfg.engine == "deepspeed" and why in cfg.decisions["engine"]


def test_on_the_cpu_zero3_stays_on_deepspeed_unless_fsdp2_is_asked_for():
    assert resolved(on="cpu", zero_stage=3).engine == "deepspeed"
    cfg = resolved(on="cpu", zero_stage=3, engine="fsdp2", mode="qlora")
    assert (cfg.engine, cfg.decisions["engine"]) == ("fsdp2", "set in the run config")
    assert cfg.bnb_4bit_quant_storage == "float32", "NF4 weights stored in the compute dtype, so FSDP can shard them"


@pytest.mark.parametrize("overrides,needle", [
    ({}, "fsdp2 shards weights, gradients and optimizer states, which is zero_stage 3 (this run has zero_stage 2: "
         "add --zero 3)"),
    ({"zero_stage": 3, "offload": True}, "optimizer offload is DeepSpeed's"),
    ({"zero_stage": 3, "deepspeed_config": "ds_configs/zero3.json"}, "remove deepspeed_config to run fsdp2"),
    ({"zero_stage": 3, "precision": "fp16"}, "fp16 loss scaling is DeepSpeed's"),
])
def test_fsdp2_where_it_cannot_run_is_refused_before_launch_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as error:
        resolved(engine="fsdp2", **overrides)
    assert str(error.value).startswith("key 'engine': fsdp2, but ") and needle in str(error.value)


def identity(engine, procs, micro, accumulation):
    return training_identity(resolved(on="cpu", procs=procs, engine=engine, zero_stage=3, micro_batch_size=micro,
                                      gradient_accumulation_steps=accumulation))


def test_an_fsdp2_checkpoint_is_compared_on_the_global_batch_and_deepspeeds_on_the_process_count():
    two, one = identity("fsdp2", 2, 1, 2), identity("fsdp2", 1, 1, 4)
    assert two == one and two["global_batch_size"] == 4 and "world_size" not in two
    assert identity("fsdp2", 2, 1, 4) != two, "a larger global batch trains something else"
    assert identity("deepspeed", 2, 1, 2)["world_size"] == 2


def saved(tmp_path, settings):
    (tmp_path / IDENTITY_FILE).write_text(json.dumps(settings))
    return tmp_path


def test_a_change_of_engine_alone_is_named_as_such_both_ways(tmp_path):
    deepspeed, fsdp2 = identity("deepspeed", 2, 1, 2), identity("fsdp2", 2, 1, 2)
    assert resume_differences(saved(tmp_path, deepspeed), fsdp2) == [("engine", "deepspeed", "fsdp2")]
    assert resume_differences(saved(tmp_path, fsdp2), deepspeed) == [("engine", "fsdp2", "deepspeed")]
    assert resume_differences(saved(tmp_path, deepspeed), identity("deepspeed", 1, 1, 4)) == [
        ("gradient_accumulation_steps", 2, 4), ("world_size", 2, 1)], "a DeepSpeed checkpoint keeps its world"


def test_a_ddp_checkpoint_recorded_by_process_count_still_resumes_with_the_same_global_batch(tmp_path):
    now = training_identity(resolved(on="cpu", procs=1, engine="ddp", gradient_accumulation_steps=2))
    recorded = {k: v for k, v in now.items() if k != "global_batch_size"}
    recorded.update(world_size=2, micro_batch_size=1, gradient_accumulation_steps=1)
    assert resume_differences(saved(tmp_path, recorded), now) == []
