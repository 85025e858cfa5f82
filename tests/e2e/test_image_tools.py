"""`ftl generate-images` (tools/generate_images.py) through its command line on a diffusion run's best/ (a LoRA on
the tiny SD pipeline's UNet and text encoder, saved by finetune_launcher.recipes.diffusion.model as the diffusion
recipe saves it): PNGs per prompt and seed, the base beside the LoRA for the same seeds, a fused pipeline that loads
with StableDiffusionPipeline.from_pretrained and draws what base + LoRA draw, and one-line errors for wrong
directories."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from tests.e2e.test_tools import assert_clear_error, run_tool
from tests.conftest import assert_ok

pytestmark = pytest.mark.slow

PROMPT = "a red circle on a white background"
STEPS = "4"


@pytest.fixture(scope="module")
def sd_path():
    from finetune_launcher.models.references import resolve_model_path

    return resolve_model_path("builtin:tiny-sd")


def saved_run(tmp_path_factory, mode):
    """outputs/<run>/best of a LoRA (or QLoRA) run with text-encoder LoRA, as the diffusion recipe saves it, and the
    model as trained: random LoRA B matrices stand in for training (they start at zero, where the LoRA changes
    nothing)."""
    from finetune_launcher import recipe_table
    from finetune_launcher.recipes.diffusion.model import load_diffusion, save_diffusion_lora

    targets = recipe_table.get("diffusion").defaults["lora_target_modules"]  # the recipe's default
    cfg = types.SimpleNamespace(model="builtin:tiny-sd", mode=mode, precision="fp32", lora_r=4, lora_alpha=8,
                                lora_dropout=0.0, lora_target_modules=targets, gradient_checkpointing=False,
                                text_encoder_lora=True, zero_stage=2, bnb_4bit_quant_storage="uint8")
    parts = load_diffusion(cfg, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in parts.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    run = tmp_path_factory.mktemp("sd_run") / f"tiny_sd_{mode}"
    best = save_diffusion_lora(parts.model.unet, parts.model.text_encoder, run / "best")
    (best / "training_info.json").write_text(json.dumps({"recipe": "diffusion", "mode": mode, "resolution": 64,
                                                         "base_model": "builtin:tiny-sd", "step": 10}))
    return run, parts


@pytest.fixture(scope="module")
def run_dir(sd_path, recipe_runs):
    """The diffusion default's run (tests/e2e/test_diffusion.py trains it): best/ as the recipe writes it."""
    proc, path = recipe_runs["sd-lora"]
    assert_ok(proc)
    return path


def pipeline_image(pipeline, seed):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, height=64, width=64, num_inference_steps=int(STEPS), guidance_scale=7.5, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images[0]


@pytest.fixture(scope="module")
def expected(sd_path, run_dir):
    """In-process images of the base and of base + LoRA (diffusers' loader) for seeds 0 and 1."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(sd_path)
    base = {seed: pipeline_image(pipeline, seed) for seed in (0, 1)}
    pipeline.load_lora_weights(run_dir / "best")
    return base, {seed: pipeline_image(pipeline, seed) for seed in (0, 1)}


def png(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def test_compare_writes_the_base_beside_the_lora_for_each_seed(run_dir, expected):
    proc = run_tool("generate_images.py", "--adapter", run_dir / "best", "--prompt", PROMPT, "--seed", 0, "--seed", 1,
                    "--steps", STEPS, "--compare")
    assert_ok(proc)
    base, tuned = expected
    files = sorted((run_dir / "generated").glob("*.png"))
    assert [f.name for f in files] == [f"00-a-red-circle-on-a-white-background-seed{s}-compare.png" for s in (0, 1)]
    for seed, path in zip((0, 1), files):
        pair = png(path)
        assert pair.shape == (64, 128, 3)
        assert np.abs(pair[:, :64] - base[seed]).max() <= 1 / 255
        assert np.abs(pair[:, 64:] - tuned[seed]).max() <= 1 / 255
        assert np.abs(pair[:, 64:] - pair[:, :64]).mean() > 0.02, "the LoRA changed nothing"
    assert np.abs(png(files[0]) - png(files[1])).mean() > 0.02, "the seed changed nothing"
    assert str(files[0]) in proc.stdout


def test_fused_pipeline_loads_with_diffusers_and_draws_base_plus_lora(run_dir, expected, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "fused"
    proc = run_tool("generate_images.py", "--adapter", run_dir / "best", "--fuse", out)
    assert_ok(proc)
    assert "max pixel difference" in proc.stdout, proc.stdout
    base, tuned = expected
    fused = pipeline_image(StableDiffusionPipeline.from_pretrained(out), 0)
    assert np.abs(fused - tuned[0]).max() < 2 / 255 and np.abs(fused - base[0]).mean() > 0.02
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert json.loads((out / "training_info.json").read_text())["fused"]["base_model"] == "builtin:tiny-sd"

    again = run_tool("generate_images.py", "--adapter", run_dir / "best", "--fuse", out)
    assert_clear_error(again, "already exists", "--overwrite")
    from_fused = run_tool("generate_images.py", "--base", out, "--prompt", PROMPT, "--steps", STEPS,
                          "--out", tmp_path / "images")
    assert_ok(from_fused)
    assert np.abs(png(tmp_path / "images" / "00-a-red-circle-on-a-white-background-seed0.png") - fused).max() \
        <= 1 / 255


def test_wrong_directories_are_one_line_errors(run_dir, tmp_path, tiny_model_path):
    missing = run_tool("generate_images.py", "--adapter", tmp_path / "no_run" / "best", "--prompt", PROMPT)
    assert_clear_error(missing, "adapter directory not found", "no_run")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clear_error(run_tool("generate_images.py", "--adapter", empty, "--prompt", PROMPT),
                       "neither pytorch_lora_weights.safetensors", "unet/")
    lm_adapter = tmp_path / "lm_best"
    lm_adapter.mkdir()
    (lm_adapter / "adapter_config.json").write_text("{}")
    (lm_adapter / "training_info.json").write_text(json.dumps({"recipe": "causal_lm"}))
    assert_clear_error(run_tool("generate_images.py", "--adapter", lm_adapter, "--prompt", PROMPT),
                       "causal-LM run's adapter, not diffusion weights", "ftl generate text --adapter")
    not_a_pipeline = run_tool("generate_images.py", "--adapter", run_dir / "best", "--base", tiny_model_path,
                              "--prompt", PROMPT)
    assert_clear_error(not_a_pipeline, "is not a diffusers pipeline (no model_index.json)", "--base")
    text_tool = run_tool("generate.py", "text", "--adapter", run_dir / "best", "--prompt", PROMPT)
    assert_clear_error(text_tool, "diffusion run's weights", "ftl generate-images --adapter")


def test_a_qlora_lora_draws_on_the_dequantized_unet_what_the_4bit_model_draws(tmp_path_factory, tmp_path):
    """The QLoRA run's LoRA on the de-quantized UNet (the default) draws what the 4-bit model + LoRA drew in
    training; on the stored UNet (--qlora-base original) it does not; fused, the de-quantized one stays so."""
    from diffusers import StableDiffusionPipeline

    from finetune_launcher.recipes.diffusion.sampling import sample_images

    run, parts = saved_run(tmp_path_factory, "qlora")
    trained = np.asarray(sample_images(parts.model, parts.vae, parts.tokenizer, parts.sample_scheduler, [PROMPT],
                                       [0], 64, steps=int(STEPS), guidance_scale=7.5)[0], dtype=np.float32) / 255
    drawn, notes = {}, {}
    for qlora_base in ("dequantized", "original"):
        proc = run_tool("generate_images.py", "--adapter", run / "best", "--prompt", PROMPT, "--steps", STEPS,
                        "--qlora-base", qlora_base, "--out", tmp_path / qlora_base)
        assert_ok(proc)
        drawn[qlora_base] = png(tmp_path / qlora_base / "00-a-red-circle-on-a-white-background-seed0.png")
        notes[qlora_base] = "goes on the de-quantized UNet" in proc.stdout
    assert notes == {"dequantized": True, "original": False}
    assert np.abs(drawn["dequantized"] - trained).max() <= 2 / 255
    assert np.abs(drawn["original"] - trained).max() > 4 / 255, "NF4 changed nothing: the test shows nothing"
    fused = run_tool("generate_images.py", "--adapter", run / "best", "--fuse", tmp_path / "fused")
    assert_ok(fused)
    assert json.loads((tmp_path / "fused" / "training_info.json").read_text())["fused"]["qlora_base"] == "dequantized"
    image = pipeline_image(StableDiffusionPipeline.from_pretrained(tmp_path / "fused"), 0)
    assert np.abs(image - trained).max() <= 2 / 255
