"""The diffusion recipe through launch/train_diffusion.sh with 2 CPU processes: the embedded default (UNet LoRA,
ZeRO-2) lowers its validation loss, samples at every eval, and its best/ loads with diffusers' own
load_lora_weights and changes the pictures; ZeRO-3 saves the whole LoRA; QLoRA puts the UNet in NF4; a killed run
resumes with the same losses; a NaN stops the run; a bad picture is named before launch."""
import json

import numpy as np
import pytest

from tests.conftest import assert_ok, losses_by_step, read_history, run_launcher, train_then_sigkill

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["sd-lora", "sd-qlora"])
def test_validation_loss_falls_and_samples_are_written(recipe_runs, name):
    proc, run_dir = recipe_runs[name]
    assert_ok(proc)
    history = read_history(run_dir)
    assert history["metadata"]["recipe"] == "diffusion" and history["metadata"]["engine"]["world_size"] == 2
    evals = history["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < 0.9 * evals[0]["eval_loss"], evals
    for entry in evals:
        assert (run_dir / "samples" / f"step-{entry['step']:06d}.png").is_file() and entry["samples"]
    record = history["records"][-1]
    assert record["images_per_s"] > 0 and record["supervised_samples"] == 2 * 4  # 2 ranks x micro-batch 4
    for which in ("best", "final"):
        assert (run_dir / which / "pytorch_lora_weights.safetensors").is_file()
        assert (run_dir / which / "unet" / "adapter_config.json").is_file()
    assert json.loads((run_dir / "best" / "training_info.json").read_text())["mode"] == name.split("-")[1]


def tiny_sd_pipeline():
    from diffusers import StableDiffusionPipeline

    from finetune_launcher.models.references import resolve_model_path

    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_path("builtin:tiny-sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_image(pipeline, prompt="a red circle on a white background", seed=0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return np.asarray(pipeline(prompt, num_inference_steps=5, guidance_scale=3.0, height=64, width=64,
                               generator=generator, output_type="np").images[0])


def test_the_curves_plot_the_throughput_a_diffusion_history_records(recipe_runs, tmp_path, monkeypatch):
    """training_curves.png's third panel draws the run's images/s (a diffusion history has no tokens/s): the data
    handed to the panel, read back from its axes."""
    import matplotlib.pyplot as plt

    from finetune_launcher.history import plot_history

    _, run_dir = recipe_runs["sd-lora"]
    history = read_history(run_dir)
    figures, subplots = [], plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *args, **kwargs: figures.append(subplots(*args, **kwargs)) or
                        figures[-1])
    plot_history(history, tmp_path / "curves.png")
    _, axes = figures[0]
    (line,) = axes[2].get_lines()
    assert axes[2].get_title() == "images/s"
    assert list(line.get_ydata()) == [r["images_per_s"] for r in history["records"]] and len(line.get_ydata()) > 1


@pytest.mark.parametrize("which", ["best", "final"])
def test_load_lora_weights_of_best_and_final_changes_the_pictures(recipe_runs, which):
    _, run_dir = recipe_runs["sd-lora"]
    pipeline = tiny_sd_pipeline()
    base = pipeline_image(pipeline)
    pipeline.load_lora_weights(str(run_dir / which))
    tuned = pipeline_image(pipeline)
    assert np.abs(tuned - base).mean() > 1e-3, "the LoRA did not change the sampled picture"


def test_a_killed_qlora_diffusion_run_resumes_with_the_same_losses(recipe_runs, tmp_path):
    """sd-qlora killed after step 10 (checkpoint at 8) and rerun: steps 9-16 repeat the uninterrupted run's (the
    noise and timesteps of a step are a function of the seed and the step)."""
    from tests.conftest import RECIPE_CASES

    _, reference = recipe_runs["sd-qlora"]
    args = [*RECIPE_CASES["sd-qlora"][1], "--save_steps", "8", "--output_dir", tmp_path, "--run_name", "killed"]
    train_then_sigkill("train_diffusion.sh", args, tmp_path / "killed", 10)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-8"
    resumed = run_launcher("train_diffusion.sh", *args)
    assert_ok(resumed)
    expected, got = losses_by_step(reference), losses_by_step(tmp_path / "killed")
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step in range(9, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step


def test_zero3_trains_and_saves_the_whole_lora_not_a_ranks_shard(recipe_runs, tmp_path):
    """ZeRO-3 partitions the UNet over the 2 ranks: the run lowers its validation loss, and best/ holds every LoRA
    tensor whole (gathered at the save), with the keys and shapes of the ZeRO-2 default's, in the format diffusers'
    load_lora_weights takes. No samples, to keep it short."""
    from safetensors.torch import load_file

    proc = run_launcher("train_diffusion.sh", "--zero", "3", "--max_steps", "4", "--eval_steps", "4",
                        "--warmup_steps", "1", "--validation_prompts", "[]", "--output_dir", tmp_path,
                        "--run_name", "z3")
    assert_ok(proc)
    history = read_history(tmp_path / "z3")
    assert history["metadata"]["engine"]["zero_stage"] == 3, history["metadata"]["engine"]
    evals = history["evals"]
    assert evals[-1]["step"] == 4 and evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    _, zero2 = recipe_runs["sd-lora"]
    got, reference = (load_file(run / "best" / "pytorch_lora_weights.safetensors") for run in (tmp_path / "z3", zero2))
    assert got.keys() == reference.keys()
    assert all(got[key].shape == reference[key].shape and got[key].numel() > 0 for key in got)
    tiny_sd_pipeline().load_lora_weights(str(tmp_path / "z3" / "best"))


def test_a_nan_loss_stops_the_diffusion_run(tmp_path):
    proc = run_launcher("train_diffusion.sh", "--max_steps", "6", "--save_steps", "2", "--eval_steps", "100",
                        "--debug_nan_at_step", "3", "--output_dir", tmp_path, "--run_name", "nan")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "step 3: loss is nan (not finite)" in proc.stderr and "ChildFailedError" not in proc.stderr
    assert (tmp_path / "nan" / "checkpoints" / "latest").read_text().strip() == "step-2"


def test_a_bad_picture_is_named_with_its_line_before_launch(tmp_path, capsys):
    from tests.conftest import assert_refused_before_launch, launch_here

    folder = tmp_path / "pictures"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "a red circle"}) + "\n")
    proc = launch_here(capsys, "--dataset", folder, "--output_dir", tmp_path, launcher=("--recipe", "diffusion"))
    assert_refused_before_launch(proc, f"{folder / 'metadata.jsonl'}:1", "missing.png")
