"""The fsdp2 engine (torch FSDP2, 2 CPU processes over gloo) through the real launchers: LoRA, QLoRA and full
fine-tunes of the tiny causal LM take the same steps as DeepSpeed ZeRO-3 (losses and grad norms, step by step), the
vision-language and diffusion defaults train and save what their loaders read, a SIGKILLed run resumes on another
number of processes with the same losses (DCP reshards, both ways), and a run that changes only the engine is
refused. Each case runs the first steps of the DeepSpeed ZeRO-3 run it is compared with: inside the 10 warm-up steps
the learning rate does not depend on the run's length."""
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (MODE_CASES_ARGS, RECIPE_CASES, TrainedRuns, assert_ok, assert_refused_before_launch,
                            launch_here, read_history, run_launcher, shared_dir, train_then_sigkill)

pytestmark = pytest.mark.slow

FSDP2 = ["--engine", "fsdp2"]
# one process x micro-batch 1 x accumulation 4 takes the same 4 rows a step as 2 x 1 x 2 and as ZeRO-3's 2 x 2 x 1
ACCUMULATED = ["--micro_batch_size", "1", "--gradient_accumulation_steps", "2"]
CASES = {  # name: (launcher, arguments, the DeepSpeed ZeRO-3 run it follows)
    # compiled layers and LoRA dropout 0.1 as lora-z3 runs them (the per-rank dropout masks must match too)
    "lora": ("train_lora.sh", [*MODE_CASES_ARGS["lora-z3"][1], *FSDP2, "--max_steps", "4"], "lora-z3"),
    # NF4 weights in the compute dtype, gradient checkpointing (the embedded QLoRA default), accumulation
    "qlora": ("train_qlora.sh", [*MODE_CASES_ARGS["qlora-z3"][1], *FSDP2, *ACCUMULATED, "--max_steps", "4"],
              "qlora-z3"),
    # also the reference of the resume tests: a checkpoint at step 3
    "full": ("train_full.sh", [*MODE_CASES_ARGS["full-z3"][1], *FSDP2, *ACCUMULATED, "--max_steps", "6",
                               "--save_steps", "3"], "full-z3"),
    "vl": ("train_lora.sh", [*RECIPE_CASES["vl-lora-z3"][1], *FSDP2, "--max_steps", "8"], "vl-lora-z3"),
}
PROBE = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])


@pytest.fixture(scope="session")
def fsdp2_runs(tmp_path_factory):
    return TrainedRuns({name: case[:2] for name, case in CASES.items()}, shared_dir(tmp_path_factory, "fsdp2"))


def reference_of(name, mode_runs, recipe_runs):
    deepspeed = CASES[name][2]
    return (recipe_runs if deepspeed.startswith("vl-") else mode_runs)[deepspeed]


def records(run_dir):
    return {r["step"]: r for r in read_history(run_dir)["records"]}


@pytest.mark.parametrize("name", ["lora", "qlora", "full", "vl"])
def test_fsdp2_takes_the_same_steps_as_deepspeed_zero3(fsdp2_runs, mode_runs, recipe_runs, name):
    (proc, run_dir), (ds_proc, ds_dir) = fsdp2_runs[name], reference_of(name, mode_runs, recipe_runs)
    assert_ok(proc)
    assert_ok(ds_proc)
    assert "engine: fsdp2 (set in the run config)" in proc.stdout
    # 16-bit weights: rank 1 built the model on the meta device and took every value from rank 0 (a node's host
    # memory holds the model once); the losses below show nothing was lost on the way
    from_rank0 = "fsdp2: the weights were loaded by rank 0 only; the other ranks built the model on the meta device"
    assert (from_rank0 in proc.stdout) == (name != "qlora"), proc.stdout
    facts = read_history(run_dir)["metadata"]["engine"]
    assert (facts["engine"], facts["zero_stage"], facts["world_size"]) == ("fsdp2", 3, 2)
    got, expected = records(run_dir), records(ds_dir)
    assert sorted(got) == list(range(1, max(got) + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step


def test_each_block_and_the_embeddings_and_head_are_units_of_their_own(fsdp2_runs):
    """The memory of a sharded run depends on it: one decoder layer or vision block gathered at a time."""
    assert_ok(fsdp2_runs["lora"][0])
    assert "fsdp2: 6 units and the root sharded over 2 processes (4 LlamaDecoderLayer, 1 Embedding, 1 Linear)" \
        in fsdp2_runs["lora"][0].stdout
    assert "(2 Qwen3VLVisionBlock, 4 Qwen3VLTextDecoderLayer, 1 Embedding, 1 Linear)" in fsdp2_runs["vl"][0].stdout


@pytest.mark.parametrize("name", ["lora", "qlora", "full"])
def test_best_and_final_are_whole_and_load_with_transformers_and_peft(fsdp2_runs, mode_runs, name,
                                                                      tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir = fsdp2_runs[name]
    _, ds_dir = mode_runs[CASES[name][2]]
    file = "model.safetensors" if name == "full" else "adapter_model.safetensors"
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_path)(PROBE).logits
    for which in ("best", "final"):
        tensors, deepspeed_tensors = load_file(run_dir / which / file), load_file(ds_dir / which / file)
        assert {k: v.shape for k, v in tensors.items()} == {k: v.shape for k, v in deepspeed_tensors.items()}
        if name == "full":
            model = AutoModelForCausalLM.from_pretrained(run_dir / which)
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), run_dir / which)
        with torch.no_grad():
            assert not torch.allclose(model(PROBE).logits, base_logits, atol=1e-3)


def test_the_vl_default_learns_and_its_adapter_loads(fsdp2_runs):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from finetune_launcher.models.references import resolve_model_path

    _, run_dir = fsdp2_runs["vl"]
    evals = read_history(run_dir)["evals"]
    assert evals[-1]["step"] == 8 and evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"], evals
    keys = load_file(run_dir / "best" / "adapter_model.safetensors")
    assert keys and all(".language_model." in k for k in keys)
    PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(
        resolve_model_path("builtin:tiny-qwen3-vl")), run_dir / "best")


def test_the_diffusion_default_learns_and_diffusers_loads_its_lora(tmp_path):
    """Every UNet down, mid and up block and every CLIP layer is a unit; best/ holds the whole LoRA in the format
    diffusers' load_lora_weights takes. No samples, to keep it short."""
    from tests.e2e.test_diffusion import tiny_sd_pipeline

    proc = run_launcher("train_diffusion.sh", *FSDP2, "--zero", "3", "--max_steps", "4", "--eval_steps", "4",
                        "--warmup_steps", "1", "--validation_prompts", "[]", "--output_dir", tmp_path,
                        "--run_name", "sd")
    assert_ok(proc)
    assert "CrossAttnDownBlock2D" in proc.stdout and "UNetMidBlock2DCrossAttn" in proc.stdout
    assert "CLIPEncoderLayer" in proc.stdout
    history = read_history(tmp_path / "sd")
    assert history["metadata"]["engine"]["engine"] == "fsdp2"
    assert history["evals"][-1]["eval_loss"] < history["evals"][0]["eval_loss"], history["evals"]
    tiny_sd_pipeline().load_lora_weights(str(tmp_path / "sd" / "best"))


def assert_continues(run_dir, reference_dir, after):
    got, expected = records(run_dir), records(reference_dir)
    assert sorted(got) == sorted(expected), "every step once in the history"
    for step in range(after + 1, max(expected) + 1):
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-5), step


def test_a_run_killed_on_one_process_resumes_on_two(fsdp2_runs, tmp_path):
    """The full fine-tune on one process (micro-batch 1 x accumulation 4), SIGKILLed after step 3 with checkpoints
    every 2 steps, continued on 2 processes (1 x 2): the steps after the checkpoint repeat the 2-process run's."""
    script, args, _ = CASES["full"]
    _, reference = fsdp2_runs["full"]
    args = [*args, "--save_steps", "2", "--output_dir", tmp_path, "--run_name", "killed"]
    train_then_sigkill(script, [*args, "--nproc-per-node", "1", "--gradient_accumulation_steps", "4"],
                       tmp_path / "killed", 3)
    resumed = run_launcher(script, *args)
    assert_ok(resumed)
    resumed_at = read_history(tmp_path / "killed")["metadata"]["resumed_at_steps"]
    assert resumed_at in ([2], [4]) and f"resumed from {tmp_path / 'killed' / 'checkpoints'}" in resumed.stdout
    assert read_history(tmp_path / "killed")["metadata"]["world_size"] == 2
    assert_continues(tmp_path / "killed", reference, resumed_at[0])


def test_a_checkpoint_of_two_processes_resumes_on_one(fsdp2_runs, tmp_path):
    """The 2-process run's step-3 checkpoint continued on one process (1 x 4) repeats its steps 4-6."""
    script, args, _ = CASES["full"]
    _, reference = fsdp2_runs["full"]
    checkpoints = tmp_path / "moved" / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "step-3", checkpoints / "step-3")
    (checkpoints / "latest").write_text("step-3\n")
    proc = run_launcher(script, *args, "--nproc-per-node", "1", "--gradient_accumulation_steps", "4",
                        "--output_dir", tmp_path, "--run_name", "moved")
    assert_ok(proc)
    assert read_history(tmp_path / "moved")["metadata"]["world_size"] == 1
    got, expected = records(tmp_path / "moved"), records(reference)
    assert sorted(got) == [4, 5, 6]
    for step in got:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step


def test_a_run_that_changes_only_the_engine_is_refused(fsdp2_runs, capsys):
    script, args, _ = CASES["lora"]
    proc, run_dir = fsdp2_runs["lora"]
    assert_ok(proc)
    refused = launch_here(capsys, *args, "--engine", "deepspeed", "--output_dir", run_dir.parent,
                          "--run_name", run_dir.name)
    assert_refused_before_launch(refused, "engine: 'fsdp2' in the checkpoint, 'deepspeed' now")
    assert "world_size" not in refused.stderr, "the batch layout is not compared across engines"
