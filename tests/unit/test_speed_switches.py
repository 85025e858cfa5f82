"""What `engine: auto` and `compile_layers: auto` decide before launch, and the clear refusals of `ddp` / `true`
where they cannot run (the training equivalence is in tests/e2e/test_speed_switches.py)."""
import pytest

from tests.conftest import resolve
from finetune_launcher.config import ConfigError

TINY = {"mode": "lora", "model": "builtin:tiny-llama", "dataset": "data/tiny_instruct.jsonl"}


def resolved(on="H200", procs=1, **overrides):
    return resolve(None, {**TINY, **overrides}, on=on, procs=procs)


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_lora_on_a_gpu_runs_the_ddp_engine_with_compiled_layers(mode):
    cfg = resolved(mode=mode)
    assert cfg.engine == "ddp" and "replicated weights" in cfg.decisions["engine"]
    assert cfg.compile_layers is True and "CUDA GPU" in cfg.decisions["compile_layers"]


def test_on_the_cpu_auto_keeps_deepspeed_and_eager_layers():
    cfg = resolved(on="cpu", procs=2)
    assert (cfg.engine, cfg.compile_layers) == ("deepspeed", False)
    assert "CPU" in cfg.decisions["engine"] and "CUDA GPUs only" in cfg.decisions["compile_layers"]


def test_a_full_fine_tune_on_one_process_runs_the_ddp_engine_and_on_several_deepspeed():
    one = resolved(mode="full")
    assert one.engine == "ddp" and "one process, where ZeRO-2 partitions nothing" in one.decisions["engine"]
    several = resolved(mode="full", procs=8)
    assert several.engine == "deepspeed" and "several processes needs ZeRO's partitioning" in \
        several.decisions["engine"]
    assert resolved(mode="full", procs=1, zero_stage=3).engine == "fsdp2", "sharded: FSDP2 (tests/unit/test_fsdp2.py)"


@pytest.mark.parametrize("overrides,why", [
    ({"mode": "full", "procs": 2}, "full fine-tune on several processes needs ZeRO's partitioning"),
    ({"offload": True}, "optimizer offload is DeepSpeed's"),
    ({"precision": "fp16"}, "fp16 loss scaling is DeepSpeed's"),
    ({"deepspeed_config": "ds_configs/zero2.json"}, "a DeepSpeed file was given"),
])
def test_engine_auto_keeps_deepspeed_where_it_does_something(overrides, why):
    cfg = resolved(**overrides)
    assert cfg.engine == "deepspeed" and why in cfg.decisions["engine"]


@pytest.mark.parametrize("overrides,needle", [
    ({"engine": "ddp", "mode": "full", "procs": 2},
     "key 'engine': ddp, but a full fine-tune on several processes needs ZeRO's partitioning"),
    ({"engine": "ddp", "zero_stage": 3}, "key 'engine': ddp, but zero_stage 3 shards the weights"),
    ({"compile_layers": True, "zero_stage": 3, "zero3_gather": "module", "engine": "deepspeed"},
     "key 'compile_layers': true, but ZeRO-3 with zero3_gather: module gathers parameters inside each layer's "
     "forward"),
])
def test_switches_forced_where_they_cannot_run_are_refused_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as error:
        resolved(**overrides)
    assert needle in str(error.value) and "auto" in str(error.value)


def test_compile_auto_under_zero3_follows_the_gather_and_forced_choices_are_kept():
    assert resolved(zero_stage=3).compile_layers is True, "per-layer gathers leave no hook inside a layer"
    cfg = resolved(zero_stage=3, zero3_gather="module", engine="deepspeed")
    assert cfg.compile_layers is False and "ZeRO-3" in cfg.decisions["compile_layers"]
    assert resolved(zero_stage=3, zero3_gather="module").compile_layers is True, "FSDP2 gathers outside the layers"
    assert resolved(compile_layers=False).compile_layers is False
    assert resolved(on="cpu", procs=2, compile_layers=True, engine="ddp").compile_layers is True
    assert resolved(engine="deepspeed").engine == "deepspeed"


def test_the_ddp_engine_is_part_of_what_a_checkpoint_was_trained_with():
    from finetune_launcher.checkpoint import training_identity

    assert training_identity(resolved())["engine"] == "ddp"
    assert "engine" not in training_identity(resolved(engine="deepspeed")), "older checkpoints still match"


def test_gpu_busy_time_counts_overlapping_kernels_once():
    """The profile's GPU-busy fraction: kernels on two streams that overlap are one busy stretch, gaps are idle."""
    from finetune_launcher.profiling import busy_seconds

    assert busy_seconds([(0, 10), (5, 20), (30, 40), (32, 35)]) == pytest.approx(30e-6)
    assert busy_seconds([]) == 0


def test_zero3_whole_layer_gather_makes_the_first_layers_input_require_grad_even_in_eval_mode():
    """A model straight from from_pretrained is in eval mode; its ZeRO-3 leaf layers must still keep their
    parameters until their own backward (the hook's input grad), or LoRA's gradients meet released weights."""
    import torch

    from finetune_launcher.engines import _hidden_states_require_grad

    layer = torch.nn.Linear(4, 4).eval()
    frozen_input = torch.zeros(2, 4)
    args, _ = _hidden_states_require_grad(layer, (frozen_input,), {})
    assert args[0].requires_grad
    _, kwargs = _hidden_states_require_grad(layer, (), {"hidden_states": frozen_input})
    assert kwargs["hidden_states"].requires_grad
    with torch.no_grad():
        assert _hidden_states_require_grad(layer, (frozen_input,), {}) is None


def test_compile_auto_leaves_a_mixture_of_experts_eager_on_gpus_and_true_still_compiles():
    """Inductor's grouped GEMM of the MoE experts failed on an H200 with torch 2.11 (issue 30): auto keeps an MoE's
    layers eager there and says why; a dense model still compiles; true is kept."""
    moe = resolved(model="builtin:tiny-qwen3-moe")
    assert moe.compile_layers is False and "grouped GEMM failed under inductor" in moe.decisions["compile_layers"]
    assert resolved(model="builtin:tiny-qwen3-moe", compile_layers=True).compile_layers is True
    assert resolved().compile_layers is True
