"""Sample images for fixed prompts and seeds through diffusers' StableDiffusionPipeline with the UNet (and text
encoder) being trained, and save them as one PNG grid (rows: prompts, columns: seeds).

Under ZeRO-3 every rank must call `sample_images` with the same prompts and seeds (each UNet forward gathers the
partitioned weights collectively); only one rank should save the grid.
"""
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from finetune_launcher.fsutil import current_umask


def sampling_pipeline(model, vae, tokenizer, scheduler):
    """A StableDiffusionPipeline around the live modules (nothing copied or reloaded)."""
    from diffusers import StableDiffusionPipeline

    module = getattr(model, "module", model)  # the DeepSpeed engine's wrapped DiffusionModel
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=module.text_encoder, tokenizer=tokenizer,
                                       unet=module.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_images(model, vae, tokenizer, scheduler, prompts, seeds, resolution, steps=20, guidance_scale=7.5):
    """One PIL image per (prompt, seed), prompts outer, sampled with `scheduler` (the pipeline's own sampler:
    DiffusionParts.sample_scheduler). Each image's starting noise comes from a CPU generator seeded by its seed,
    so the same seed gives the same image on any device, for the base and the trained UNet. The modules are put in
    eval mode (no LoRA dropout) and restored afterwards."""
    module = getattr(model, "module", model)
    pipeline = sampling_pipeline(model, vae, tokenizer, scheduler)
    was_training = module.training
    module.eval()
    images = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                for seed in seeds:
                    images.append(sample_one(pipeline, module, vae, prompt, seed, resolution, steps, guidance_scale))
    finally:
        module.train(was_training)
    return images


def sample_one(pipeline, module, vae, prompt, seed, resolution, steps, guidance_scale):
    """Prompt embeddings and latents in the UNet's dtype, decoded in the VAE's: after QLoRA's k-bit preparation the
    UNet computes in fp32 while the frozen VAE and text encoder stay in bf16, which the pipeline's own decode
    does not convert between."""
    unet_dtype = module.unet.dtype
    embeds = [module.encode_prompt(ids).to(unet_dtype) for ids in prompt_ids(pipeline.tokenizer, [prompt, ""],
                                                                             vae.device)]
    latents = pipeline(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=resolution,
                       width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=torch.Generator().manual_seed(int(seed)), output_type="latent").images
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return pipeline.image_processor.postprocess(decoded.float(), output_type="pil")[0]


def prompt_ids(tokenizer, texts, device):
    ids = tokenizer(texts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                    return_tensors="pt").input_ids.to(device)
    return [ids[i: i + 1] for i in range(len(texts))]


def image_grid(images, columns):
    """Paste equally sized PIL images into rows of `columns`."""
    from PIL import Image

    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_grid(images, columns, path):
    """Write the grid PNG atomically; return it as an HWC uint8 array (for tensorboard's add_image with
    dataformats="HWC")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, columns)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    grid.save(tmp, format="PNG")
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 is for secrets; a grid is to share
    os.replace(tmp, path)
    return np.asarray(grid)
