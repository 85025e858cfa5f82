"""The tiny mixture of experts through the real launchers on 2 processes: LoRA and full fine-tunes under ZeRO-2 and
ZeRO-3 (and FSDP2) with routing that sends each rank's tokens to different experts (tests/e2e/disjoint_routing.py),
the loss falling, the router's balance in the history and tensorboard; the ZeRO-3 runs are killed with SIGKILL
midway and resumed, and must end with ZeRO-2's losses, all under timeouts so that a hang fails; the LoRA adapter
loads with peft, merges with the merge tool and changes the outputs."""
import json

import pytest
import torch

from tests.conftest import (assert_ok, launcher_env, losses_by_step, read_history, run_launcher, shared_dir,
                            train_once, train_then_sigkill)

pytestmark = pytest.mark.slow

ROUTING = launcher_env(FTL_RECIPES="tests.e2e.disjoint_routing")
STEPS = ["--max_steps", "12", "--eval_steps", "6", "--save_steps", "4", "--logging_steps", "1"]
RUNS = {  # name: (launcher, arguments); each rank routes to its own experts (6 and 7 get none)
    "lora-z2": ("train_lora.sh", ["configs/tiny_moe_lora.yaml", "--zero", "2", "--lora_dropout", "0.1"]),
    # the experts' LoRA through the grouped kernel here: ZeRO-2's peft path must give the same losses
    "lora-z3": ("train_lora.sh", ["configs/tiny_moe_lora.yaml", "--zero", "3", "--lora_dropout", "0.1",
                                  "--moe_lora_kernel", "grouped"]),
    "full-z2": ("train_full.sh", ["configs/tiny_moe_full.yaml", "--zero", "2"]),
    "full-z3": ("train_full.sh", ["configs/tiny_moe_full.yaml", "--zero", "3"]),
}
# The first 5 steps, inside the 5 warm-up steps where the learning rate does not depend on the run's length, against
# ZeRO-2's: FSDP2 (each decoder layer, MoE block included, one unit), and the plain ddp engine with compiled layers
# whose experts stay eager (graph breaks around the grouped kernel; aot_eager: the graphs without inductor's codegen)
FIRST_STEPS = ["--max_steps", "5", "--eval_steps", "5", "--save_steps", "5", "--logging_steps", "1"]
FSDP2 = ["--engine", "fsdp2", "--zero", "3", *FIRST_STEPS]
COMPILED = ["--engine", "ddp", "--zero", "2", "--compile_layers", "true", *FIRST_STEPS]
SHORT_RUNS = {"lora-fsdp2": ("train_lora.sh", [*RUNS["lora-z3"][1], *FSDP2]),
              "full-fsdp2": ("train_full.sh", [*RUNS["full-z3"][1], *FSDP2]),
              "lora-compiled": ("train_lora.sh", [*RUNS["lora-z3"][1], *COMPILED])}
KILL_AT_STEP = 6
TIMEOUT = 240  # a run that hangs fails here instead of blocking CI


def launch(name, out):
    script, args = RUNS[name] if name in RUNS else SHORT_RUNS[name]
    steps = STEPS if name in RUNS else []  # the short runs' own steps
    env = dict(ROUTING, FTL_COMPILE_BACKEND="aot_eager") if "--compile_layers" in args else ROUTING
    return run_launcher(script, *args, *steps, "--output_dir", out, "--run_name", name, env=env, timeout=TIMEOUT)


def killed_then_resumed(name, out):
    """The run SIGKILLed with its launcher once its history has step KILL_AT_STEP (a node failure), then the same
    command again; the second launch's CompletedProcess."""
    script, args = RUNS[name]
    train_then_sigkill(script, [*args, *STEPS, "--output_dir", out, "--run_name", name], out / name, KILL_AT_STEP,
                       timeout=TIMEOUT, env=ROUTING)
    killed_at = max(losses_by_step(out / name))
    assert KILL_AT_STEP <= killed_at < 12, f"{name}: killed after step {killed_at} (a hang before step " \
                                           f"{KILL_AT_STEP}, or the run ended first)"
    return launch(name, out)


@pytest.fixture(scope="module")
def moe_runs(tmp_path_factory):
    """name -> (CompletedProcess, run dir), each trained once per session on first use; a ZeRO-3 run is killed
    midway and its CompletedProcess is the resumed launch's."""
    out = shared_dir(tmp_path_factory, "moe")
    done = {}

    def get(name):
        if name not in done:
            if name.endswith("z3"):
                proc = train_once(out, name, lambda: killed_then_resumed(name, out))
            else:
                proc = train_once(out, name, lambda: launch(name, out))
            done[name] = (proc, out / name)
        return done[name]

    return get


@pytest.mark.parametrize("name", sorted(RUNS))
def test_moe_trains_with_falling_loss_and_records_the_routers_balance(moe_runs, name):
    proc, run_dir = moe_runs(name)
    assert_ok(proc)
    assert "experts: mixture of experts (8 experts per block)" in proc.stdout
    history = read_history(run_dir)
    losses = [r["loss"] for r in history["records"]]
    assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    for record in history["records"]:
        load = record["expert_load"]
        assert len(load["busiest"]) == len(load["idlest"]) == 4, "one share per MoE layer"
        assert all(1 / 8 < busiest <= 1 for busiest in load["busiest"])
        assert load["idlest"] == [0.0] * 4, "experts 6 and 7 get no token"
        assert record["aux_loss"] > 2.0, "top-2 of 8 routing, unbalanced on purpose: above the balanced 2.0"
    assert "layer 0: experts 6, 7" in proc.stderr and "got no token" in proc.stderr


def test_tensorboard_has_each_layers_expert_load(moe_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = moe_runs("lora-z2")
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/expert_load/{end}/{layer}" for end in ("busiest", "idlest") for layer in range(4)} <= tags
    assert "train/aux_loss" in tags


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_zero3_with_each_rank_on_other_experts_resumes_after_sigkill_with_zero2s_losses(moe_runs, mode):
    """Every MoE block gathered as one unit: under ZeRO-3 the ranks, routing to different experts, run to the end
    (within the timeout) and lose exactly what ZeRO-2 loses, across a SIGKILL and the resume from the last
    checkpoint (every step once in the history)."""
    proc, run_dir = moe_runs(f"{mode}-z3")
    assert_ok(proc)
    _, reference = moe_runs(f"{mode}-z2")
    history = read_history(run_dir)
    resumed_at = history["metadata"]["resumed_at_steps"]
    assert len(resumed_at) == 1 and resumed_at[0] % 4 == 0 and resumed_at[0] >= 4, resumed_at
    assert "resumed from" in proc.stdout and history["status"] == "completed"
    expected, got = losses_by_step(reference), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, 13)), "every step exactly once"
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got[step], expected[step])
    assert history["metadata"]["zero_stage"] == 3


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp2_with_each_rank_on_other_experts_takes_zero2s_steps(moe_runs, mode):
    """engine: fsdp2 (zero_stage 3 on GPUs by default): each decoder layer, its MoE block whole, is one unit; the
    ranks routing to different experts run to the end within the timeout with ZeRO-2's losses."""
    proc, run_dir = moe_runs(f"{mode}-fsdp2")
    assert_ok(proc)
    assert "(4 Qwen3MoeDecoderLayer, 1 Embedding, 1 Linear)" in proc.stdout
    assert read_history(run_dir)["metadata"]["engine"]["engine"] == "fsdp2"
    _, reference = moe_runs(f"{mode}-z2")
    expected, got = losses_by_step(reference), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, 6))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got[step], expected[step])


def test_compiled_layers_leave_the_experts_eager_and_take_zero2s_steps(moe_runs):
    """compile_layers: true on an MoE (the plain ddp engine, the grouped LoRA kernel): each decoder layer is compiled
    with its experts module left out of the graph (inductor failed on their grouped GEMM on an H200), and the run
    takes ZeRO-2's eager steps."""
    proc, run_dir = moe_runs("lora-compiled")
    assert_ok(proc)
    assert "compile_layers: 4 Qwen3MoeDecoderLayer modules compiled (torch.compile, aot_eager; 4 experts modules " \
           "left eager" in proc.stdout, proc.stdout
    _, reference = moe_runs("lora-z2")
    expected, got = losses_by_step(reference), losses_by_step(run_dir)
    assert sorted(got) == list(range(1, 6))
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def adapter(moe_runs):
    proc, run_dir = moe_runs("lora-z2")
    assert_ok(proc)
    return run_dir / "best"


def tiny_inputs():
    return {"input_ids": torch.randint(5, 1000, (1, 40), generator=torch.Generator().manual_seed(3))}


def test_adapter_loads_with_peft_and_changes_the_outputs(adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_launcher.models.references import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-qwen3-moe"))
    with torch.no_grad():
        before = base(**tiny_inputs()).logits
        model = PeftModel.from_pretrained(base, str(adapter))
        after = model(**tiny_inputs()).logits
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    assert (after - before).abs().max() > 1e-2


def test_zero3_adapter_holds_the_same_tensors_as_zero2s(moe_runs, adapter):
    from safetensors.torch import load_file

    _, run_dir = moe_runs("lora-z3")
    z2, z3 = (load_file(str(d / "adapter_model.safetensors")) for d in (adapter, run_dir / "best"))
    assert z2.keys() == z3.keys() and any("experts" in k for k in z2)
    for key in z2:
        assert z3[key].shape == z2[key].shape and z3[key].numel() > 0, key


def test_merge_tool_writes_a_model_transformers_loads_with_the_adapters_outputs(adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_launcher.after.merge import merge_adapter
    from finetune_launcher.models.references import resolve_model_path

    result = merge_adapter(adapter, tmp_path / "merged", log=lambda _: None)
    assert result.max_abs_diff <= result.tolerance
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__ == "Qwen3MoeForCausalLM"
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-qwen3-moe"))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, str(adapter))(**tiny_inputs()).logits
        torch.testing.assert_close(merged(**tiny_inputs()).logits, expected, rtol=1e-4, atol=1e-4)


def test_full_zero3_final_loads_with_from_pretrained_as_zero2s(moe_runs):
    from transformers import AutoModelForCausalLM

    _, z3 = moe_runs("full-z3")
    _, z2 = moe_runs("full-z2")
    with torch.no_grad():
        a, b = (AutoModelForCausalLM.from_pretrained(d / "final")(**tiny_inputs()).logits for d in (z2, z3))
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)
