"""The speed switches of issue 20 change how fast a step runs, never what it computes: with `engine: ddp` (plain
PyTorch instead of DeepSpeed ZeRO-2) and with `compile_layers: true` (torch.compile of the decoder layers) the
losses, the grad norms and the trained adapters equal those of the DeepSpeed eager run, 2 processes x gradient
accumulation 2. torch.compile runs with the aot_eager backend here (FTL_COMPILE_BACKEND): the same dynamo graphs and
AOT autograd as inductor, without inductor's CPU code generation (about a minute per run on 2 cores)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import assert_ok, launcher_env, read_history, run_launcher

pytestmark = pytest.mark.slow

STEPS = ["--logging_steps", "1", "--eval_steps", "100", "--save_steps", "100", "--gradient_accumulation_steps", "2",
         "--micro_batch_size", "2", "--lr_scheduler", "constant", "--warmup_steps", "0"]
COMPILED = launcher_env(FTL_COMPILE_BACKEND="aot_eager")
# The reference: DeepSpeed ZeRO-2, eager layers; against it both switches at once (with checkpointing, which runs
# inside the compiled layers): 3 launches in all, CI's budget being tight.
RUNS = {  # name: (max steps, arguments, environment)
    "reference": (6, ["--engine", "deepspeed", "--compile_layers", "false", "--gradient_checkpointing", "true"], None),
    "switched": (4, ["--engine", "ddp", "--compile_layers", "true", "--gradient_checkpointing", "true"], COMPILED),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed")
    done = {}

    def get(name):
        if name not in done:
            steps, args, env = RUNS[name]
            if name == "switched":  # also profiled, as bench/bench.py --profile does (steps 2-3)
                env = launcher_env(FTL_COMPILE_BACKEND="aot_eager", FTL_PROFILE_JSON=str(out / "profile.json"),
                                   FTL_PROFILE_STEPS="2-3")
            proc = run_launcher("train_lora.sh", *STEPS, "--max_steps", steps, *args, "--output_dir", out,
                                "--run_name", name, env=env)
            done[name] = (proc, out / name)
        return done[name]

    get.out = out
    return get


def records(run_dir):
    return {r["step"]: r for r in read_history(run_dir)["records"]}


def assert_same_training(run_dir, reference_dir, steps):
    got, expected = records(run_dir), records(reference_dir)
    for step in steps:
        assert got[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=1e-4), step


def assert_same_adapters(run_dir, reference_dir):
    got = load_file(run_dir / "final" / "adapter_model.safetensors")
    expected = load_file(reference_dir / "final" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and len(got) > 0
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_ddp_engine_with_compiled_layers_trains_like_eager_deepspeed(runs):
    (proc, run_dir), (ref_proc, ref_dir) = runs("switched"), runs("reference")
    assert_ok(proc)
    assert_ok(ref_proc)
    assert "engine: ddp (set in the run config)" in proc.stdout and "ddp engine" in proc.stdout
    assert "compile_layers: 4 LlamaDecoderLayer modules compiled (torch.compile, aot_eager" in proc.stdout
    facts = read_history(run_dir)["metadata"]["engine"]
    assert facts["engine"] == "ddp" and facts["world_size"] == 2 and facts["zero_stage"] == 0
    assert read_history(ref_dir)["metadata"]["engine"]["engine"] == "deepspeed"
    assert_same_training(run_dir, ref_dir, range(1, 5))
    assert records(run_dir)[4]["loss"] < records(run_dir)[1]["loss"], "the adapters learn"


def test_a_ddp_checkpoint_resumes_where_deepspeed_would_be(runs):
    """The switched run's final state (step 4) continued to step 6 gives the reference's steps 5 and 6 and its
    adapters."""
    (_, run_dir), (_, ref_dir) = runs("switched"), runs("reference")
    steps, args, _ = RUNS["switched"]
    proc = run_launcher("train_lora.sh", *STEPS, "--max_steps", 6, *args, "--output_dir", run_dir.parent,
                        "--run_name", "switched", env=COMPILED)
    assert_ok(proc)
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout
    assert_same_training(run_dir, ref_dir, range(5, 7))
    assert_same_adapters(run_dir, ref_dir)


def test_profile_summary_names_where_the_step_time_goes(runs):
    """FTL_PROFILE_JSON (what bench/bench.py --profile sets): a summary of the profiled steps from rank 0."""
    runs("switched")
    summary = json.loads((runs.out / "profile.json").read_text())
    assert summary["steps"] == 2 and summary["wall_s"] > 0
    names = [op["name"] for op in summary["top_cpu_ops"]]
    assert "aten::mm" in names or "aten::addmm" in names or any("Compiled" in n for n in names), names
    assert summary["kernel_s"] == 0 and summary["gpu_busy_fraction"] == 0, "no GPU here: no kernel time"
