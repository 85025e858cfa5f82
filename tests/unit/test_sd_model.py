"""The diffusion model parts on the embedded tiny SD pipeline: loading, LoRA / QLoRA / full, the objective, saving in
diffusers' and peft's formats, fusing, sampling."""
import types

import numpy as np
import pytest
import torch

from finetune_launcher import recipe_table
from finetune_launcher.recipes.diffusion.data import eval_batches, load_image_captions, training_batch
from finetune_launcher.recipes.diffusion.model import (DiffusionModelError, fuse_lora_into_pipeline, load_diffusion,
                                    save_diffusion_lora)
from finetune_launcher.recipes.diffusion.objective import (LatentCache, ObjectiveError, latent_parameters,
                                                           per_sample_loss, training_loss, validation_loss)
from finetune_launcher.recipes.diffusion.sampling import sample_images, save_grid
from finetune_launcher.models.references import resolve_model_path
from finetune_launcher.recipes.diffusion.tiny import build_tiny_sd

from tests.conftest import REPO

DATA = REPO / "data" / "tiny_sd"
PROMPT = "a large red circle on a white background"
CPU = torch.device("cpu")
VIEW_64 = types.SimpleNamespace(seed=0, resolution=64, center_crop=True, random_flip=False)  # the default view


@pytest.fixture(scope="module")
def sd_path():
    return resolve_model_path("builtin:tiny-sd")


def cfg(sd_path, **overrides):
    values = dict(model=sd_path, mode="lora", precision="fp32", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                  lora_target_modules=recipe_table.get("diffusion").defaults["lora_target_modules"],
                  gradient_checkpointing=False, text_encoder_lora=False, zero_stage=2, bnb_4bit_quant_storage="uint8")
    return types.SimpleNamespace(**{**values, **overrides})


def prompt_ids(parts, n=2, text=PROMPT):
    return parts.tokenizer([text] * n, max_length=77, padding="max_length", return_tensors="pt").input_ids


def backward_once(parts):
    torch.manual_seed(0)
    parts.model.train()
    out = parts.model(torch.randn(2, 4, 16, 16), torch.tensor([100, 700]), prompt_ids(parts))
    out.float().pow(2).mean().backward()


def perturb_lora(model, seed=0):
    """Stand-in for training: random LoRA B matrices (zero at init, so the adapter starts as a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def pipeline_image(pipeline, seed=0):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(PROMPT, height=64, width=64, num_inference_steps=4, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images[0]


def test_tiny_pipeline_is_written_atomically_and_loads_offline(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    target = build_tiny_sd(tmp_path / "tiny")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary directory left beside it
    pipeline = StableDiffusionPipeline.from_pretrained(target)
    assert pipeline.safety_checker is None and pipeline.feature_extractor is None
    assert pipeline.scheduler.config.prediction_type == "epsilon"
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert UNet2DConditionModel.from_pretrained(target, subfolder="unet").config.sample_size == 16
    image = pipeline_image(pipeline)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert pipeline.tokenizer.decode(pipeline.tokenizer("a Zebra!").input_ids, skip_special_tokens=True) == "a zebra !"


def test_lora_trains_only_the_lora_parameters(sd_path):
    parts = load_diffusion(cfg(sd_path), CPU)
    backward_once(parts)
    with_grad = {n for n, p in parts.model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    assert with_grad == trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"to_k", "to_q", "to_v", "0"}
    assert all(p.dtype == torch.float32 for p in parts.model.parameters() if p.requires_grad)


def test_full_mode_trains_the_whole_unet_and_nothing_else(sd_path):
    parts = load_diffusion(cfg(sd_path, mode="full"), CPU)
    trainable = {n for n, p in parts.model.named_parameters() if p.requires_grad}
    assert trainable == {"unet." + n for n, _ in parts.model.unet.named_parameters()}
    assert not any(p.requires_grad for p in parts.vae.parameters())


def test_qlora_quantizes_every_unet_linear_to_nf4_and_lora_gets_gradients(sd_path):
    import bitsandbytes as bnb

    parts = load_diffusion(cfg(sd_path, mode="qlora", precision="bf16", gradient_checkpointing=True), CPU)
    unet = parts.model.unet
    linears = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".lora_" not in n
               and not hasattr(m, "lora_A")]  # the base layers, not peft's wrappers or its LoRA matrices
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.nested for m in linears)
    backward_once(parts)
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    assert all(p.dtype == torch.float32 for p in unet.parameters() if p.requires_grad)
    assert not any(p.requires_grad for m in linears for p in m.parameters())


def test_unknown_lora_target_names_the_config_key(sd_path):
    with pytest.raises(DiffusionModelError, match=r"lora_target_modules \['to_x'\].*to_k"):
        load_diffusion(cfg(sd_path, lora_target_modules=["to_k", "to_x"]), CPU)


@pytest.mark.parametrize("text_encoder_lora", [False, True])
def test_saved_lora_loads_with_diffusers_and_peft_and_changes_the_image(sd_path, tmp_path, text_encoder_lora):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import PeftModel

    parts = load_diffusion(cfg(sd_path, text_encoder_lora=text_encoder_lora), CPU)
    perturb_lora(parts.model)
    out = save_diffusion_lora(parts.model.unet, parts.model.text_encoder, tmp_path / "final")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    assert (out / "text_encoder" / "adapter_model.safetensors").exists() == text_encoder_lora

    ours = np.asarray(sample_images(parts.model, parts.vae, parts.tokenizer, parts.sample_scheduler, [PROMPT], [0], 64,
                                    steps=4), dtype=np.float32)[0] / 255
    pipeline = StableDiffusionPipeline.from_pretrained(sd_path)
    base = pipeline_image(pipeline)
    pipeline.load_lora_weights(out)
    with_lora = pipeline_image(pipeline)
    assert np.abs(with_lora - base).mean() > 0.02  # the adapter changes the picture for the same seed
    assert np.abs(with_lora - ours).max() < 2 / 255  # and diffusers applies it as trained (rank, alpha included)

    peft_unet = PeftModel.from_pretrained(UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet"),
                                          out / "unet").eval()
    parts.model.eval()
    x, t, hidden = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(peft_unet(x, t, hidden).sample, parts.model.unet(x, t, hidden).sample, atol=1e-5)


def test_qlora_adapter_loads_into_the_full_precision_pipeline(sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    parts = load_diffusion(cfg(sd_path, mode="qlora"), CPU)
    perturb_lora(parts.model)
    out = save_diffusion_lora(parts.model.unet, parts.model.text_encoder, tmp_path / "best")
    pipeline = StableDiffusionPipeline.from_pretrained(sd_path)
    base = pipeline_image(pipeline)
    pipeline.load_lora_weights(out)
    assert np.abs(pipeline_image(pipeline) - base).mean() > 0.02


def test_fused_pipeline_equals_base_plus_lora(sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    parts = load_diffusion(cfg(sd_path), CPU)
    perturb_lora(parts.model, seed=1)
    lora_dir = save_diffusion_lora(parts.model.unet, parts.model.text_encoder, tmp_path / "lora")
    fused_dir = fuse_lora_into_pipeline(sd_path, lora_dir, tmp_path / "fused")
    pipeline = StableDiffusionPipeline.from_pretrained(sd_path)
    base = pipeline_image(pipeline)
    pipeline.load_lora_weights(lora_dir)
    with_lora = pipeline_image(pipeline)
    fused = pipeline_image(StableDiffusionPipeline.from_pretrained(fused_dir))
    assert np.abs(fused - with_lora).max() < 2 / 255 and np.abs(fused - base).mean() > 0.02


def test_a_few_lora_steps_lower_the_loss_on_a_fixed_batch(sd_path):
    parts = load_diffusion(cfg(sd_path, lora_r=8, lora_alpha=8), CPU)
    data = load_image_captions(DATA)
    batch = training_batch(data, parts.tokenizer, list(range(8)), VIEW_64, 0, 0, 0, 0)
    optimizer = torch.optim.AdamW([p for p in parts.model.parameters() if p.requires_grad], lr=1e-2)
    parts.model.train()
    losses = []
    for _ in range(12):
        loss = training_loss(parts.model, parts.vae, parts.noise_scheduler, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.93 * losses[0], losses  # a frozen or gradient-less adapter would repeat losses[0]


def test_validation_loss_is_deterministic_and_independent_of_batching_and_ranks(sd_path):
    parts = load_diffusion(cfg(sd_path), CPU)
    held_out = load_image_captions(DATA, split="validation")

    def mean_loss(world, batch_size):
        sums = [validation_loss(parts.model, parts.vae, parts.noise_scheduler,
                                eval_batches(held_out, parts.tokenizer, rank, world, batch_size, 64), seed=3,
                                timesteps_per_image=2)
                for rank in range(world)]
        return sum(s for s, _ in sums) / sum(c for _, c in sums)

    first = mean_loss(1, 8)
    assert mean_loss(1, 8) == first
    assert mean_loss(1, 4) == pytest.approx(first, rel=1e-5) and mean_loss(3, 4) == pytest.approx(first, rel=1e-5)
    assert parts.model.training  # restored after evaluating
    perturb_lora(parts.model)
    assert mean_loss(1, 8) != pytest.approx(first, rel=1e-3)  # it measures the weights being trained


def test_min_snr_off_is_plain_mse_and_the_target_follows_the_prediction_type(sd_path):
    from diffusers import DDPMScheduler

    parts = load_diffusion(cfg(sd_path), CPU)
    torch.manual_seed(0)
    latents, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    timesteps, ids = torch.tensor([10, 400, 900]), prompt_ids(parts, 3)
    scheduler = parts.noise_scheduler
    plain = per_sample_loss(parts.model, scheduler, latents, ids, noise, timesteps)
    with torch.no_grad():
        prediction = parts.model(scheduler.add_noise(latents, noise, timesteps), timesteps, ids)
    assert torch.allclose(plain, ((prediction - noise) ** 2).mean(dim=(1, 2, 3)), atol=1e-6)
    huge_gamma = per_sample_loss(parts.model, scheduler, latents, ids, noise, timesteps, snr_gamma=1e12)
    assert torch.allclose(huge_gamma, plain, rtol=1e-5)
    weighted = per_sample_loss(parts.model, scheduler, latents, ids, noise, timesteps, snr_gamma=1.0)
    assert weighted[0] < plain[0] and torch.allclose(weighted[2], plain[2])  # low noise (high SNR) down-weighted

    def predicts_noise(noisy, t, input_ids):
        return noise

    assert per_sample_loss(predicts_noise, scheduler, latents, ids, noise, timesteps).max() == 0
    v_scheduler = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    assert per_sample_loss(predicts_noise, v_scheduler, latents, ids, noise, timesteps).min() > 0.01
    with pytest.raises(ObjectiveError, match="prediction_type 'sample'.*scheduler_config.json"):
        per_sample_loss(predicts_noise, DDPMScheduler.from_config(scheduler.config, prediction_type="sample"),
                        latents, ids, noise, timesteps)


def test_training_noise_is_fixed_by_the_batch_seed_and_offset_changes_it(sd_path):
    parts = load_diffusion(cfg(sd_path), CPU)
    batch = training_batch(load_image_captions(DATA), parts.tokenizer, [0, 1], VIEW_64, 0, 0, 0, 0)
    with torch.no_grad():
        first = training_loss(parts.model, parts.vae, parts.noise_scheduler, batch)
        assert torch.equal(first, training_loss(parts.model, parts.vae, parts.noise_scheduler, batch))
        offset = training_loss(parts.model, parts.vae, parts.noise_scheduler, batch, noise_offset=0.1)
        reseeded = training_loss(parts.model, parts.vae, parts.noise_scheduler, dict(batch, noise_seed=torch.tensor(1)))
    assert not torch.equal(first, offset) and not torch.equal(first, reseeded)


def test_latent_cache_returns_the_vae_latents_and_keys_on_the_exact_pixels(sd_path, tmp_path):
    parts = load_diffusion(cfg(sd_path), CPU)
    data = load_image_captions(DATA)
    pixels = eval_batches(data, parts.tokenizer, 0, 1, 4, 64)[0]["pixel_values"]
    cache = LatentCache(tmp_path / "latents", parts.vae)
    direct = latent_parameters(parts.vae, pixels)
    assert torch.allclose(latent_parameters(parts.vae, pixels, cache), direct, atol=1e-6)
    assert len(list((tmp_path / "latents").rglob("*.pt"))) == 4
    assert torch.allclose(latent_parameters(parts.vae, pixels, cache), direct, atol=1e-6)  # read back
    latent_parameters(parts.vae, pixels.flip(-1), cache)  # flipped pictures are other inputs
    assert len(list((tmp_path / "latents").rglob("*.pt"))) == 8


def test_sample_grid_is_one_png_of_prompts_by_seeds_and_seeds_fix_the_images(sd_path, tmp_path):
    from PIL import Image

    parts = load_diffusion(cfg(sd_path), CPU)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1, 0]
    images = sample_images(parts.model, parts.vae, parts.tokenizer, parts.sample_scheduler, prompts, seeds, 64, steps=3)
    grid = save_grid(images, len(seeds), tmp_path / "samples" / "step-10.png")
    assert grid.shape == (2 * 64, 3 * 64, 3) and Image.open(tmp_path / "samples" / "step-10.png").size == (192, 128)
    arrays = [np.asarray(i) for i in images]
    assert np.array_equal(arrays[0], arrays[2]) and not np.array_equal(arrays[0], arrays[1])
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["step-10.png"]


def test_full_fine_tune_saves_a_unet_the_base_pipeline_loads(sd_path, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from finetune_launcher.recipes.diffusion.model import save_full_unet

    parts = load_diffusion(cfg(sd_path, mode="full"), CPU)
    with torch.no_grad():
        parts.model.unet.conv_out.weight.mul_(3.0)  # stand-in for training
    out = save_full_unet(parts.model, tmp_path / "final")
    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert torch.equal(unet.conv_out.weight, parts.model.unet.conv_out.weight)
    base = pipeline_image(StableDiffusionPipeline.from_pretrained(sd_path))
    assert np.abs(pipeline_image(StableDiffusionPipeline.from_pretrained(sd_path, unet=unet)) - base).mean() > 0.02
