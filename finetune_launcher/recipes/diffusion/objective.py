"""The latent-diffusion training objective: VAE latents (optionally cached on disk), noise and timesteps, the
epsilon or v-prediction target from the scheduler's config, per-sample MSE with optional min-SNR weighting and
noise offset; a deterministic validation loss; and sample images for fixed prompts and seeds as one PNG grid.

`model` below is a finetune_launcher.recipes.diffusion.model.DiffusionModel, or the DeepSpeed engine wrapping one
(called as model(noisy_latents, timesteps, input_ids) -> prediction). Random numbers come from CPU generators seeded
by the caller, so a step's noise is the same on any device and after a resume.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from finetune_launcher.data.sampling import mixed_seed
from finetune_launcher.errors import ConfigError


class ObjectiveError(ConfigError):
    """A diffusion setting a user can fix; the message names the key."""


# ---------------------------------------------------------------- latents

class LatentCache:
    """VAE latent distributions (mean and log-variance) on disk, one file per distinct input: the key is a digest
    of the exact pixels fed to the VAE (so picture, resolution, crop and flip are all part of it) under a directory
    named by a fingerprint of the VAE (config and weights) and its dtype. Files are written atomically, so ranks
    sharing the directory never read half a file. With random crops each new crop is a new entry."""

    def __init__(self, directory, vae):
        self.directory = Path(directory) / vae_fingerprint(vae)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, key):
        return self.directory / key[:2] / f"{key}.pt"

    def get(self, key):
        path = self.path(key)
        return torch.load(path, weights_only=True) if path.exists() else None

    def put(self, key, parameters):
        path = self.path(key)
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="tmp-", suffix=".part", dir=path.parent)  # torch.save wants no leading dot
        os.close(fd)
        torch.save(parameters.detach().cpu().clone(), tmp)
        os.replace(tmp, path)


def vae_fingerprint(vae):
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    digest.update(str(vae.dtype).encode())
    for parameter in (next(vae.parameters()), list(vae.parameters())[-1]):
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_parameters(vae, pixel_values, cache=None):
    """The VAE's latent distribution parameters (B, 2 x latent channels, h, w) for pixels in [-1, 1], from the
    cache where present (misses are encoded together and stored)."""
    from finetune_launcher.recipes.diffusion.data import pixel_digest

    pixel_values = pixel_values.to(vae.device, vae.dtype)
    if cache is None:
        with torch.no_grad():
            return vae.encode(pixel_values).latent_dist.parameters
    keys = [pixel_digest(p.float().cpu()) for p in pixel_values]
    found = [cache.get(k) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        with torch.no_grad():
            encoded = vae.encode(pixel_values[missing]).latent_dist.parameters
        for i, parameters in zip(missing, encoded):
            cache.put(keys[i], parameters)
            found[i] = parameters
    return torch.stack([f.to(vae.device, vae.dtype) for f in found])


def scale_latents(vae, latents):
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def sampled_latents(vae, parameters, generator):
    """A draw from the latent distribution (as diffusers' training scripts use), scaled for the UNet."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return scale_latents(vae, DiagonalGaussianDistribution(parameters).sample(generator).float())


def mean_latents(vae, parameters):
    """The distribution's mean, scaled: the deterministic latents validation uses."""
    return scale_latents(vae, parameters.chunk(2, dim=1)[0].float())


# ---------------------------------------------------------------- the loss

def denoising_target(noise_scheduler, latents, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ObjectiveError(f"scheduler prediction_type '{kind}' is not supported for training; the scheduler config "
                         f"(scheduler/scheduler_config.json) must say epsilon or v_prediction")


def min_snr_weights(noise_scheduler, timesteps, snr_gamma):
    """Min-SNR-gamma loss weights (Hang et al. 2023), as diffusers' training scripts compute them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def draw_noise(latents, generator, noise_offset=0.0):
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
        noise = noise + noise_offset * offset.to(latents.device)
    return noise


def per_sample_loss(model, noise_scheduler, latents, input_ids, noise, timesteps, snr_gamma=None):
    """MSE between the UNet's prediction and the scheduler's target, averaged per sample (fp32)."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(noise_scheduler, latents, noise, timesteps)
    prediction = model(noisy, timesteps, input_ids.to(latents.device))
    loss = torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        loss = loss * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return loss


def training_loss(model, vae, noise_scheduler, batch, cache=None, noise_offset=0.0, snr_gamma=None):
    """Per-sample losses (B,) for a sampler batch (pixel_values, input_ids, noise_seed): latents drawn from the
    VAE, noise (plus `noise_offset` x per-channel noise) and timesteps uniform over the training schedule, all from
    a generator seeded by the batch's noise_seed."""
    generator = torch.Generator().manual_seed(int(batch["noise_seed"]))
    parameters = latent_parameters(vae, batch["pixel_values"], cache)
    latents = sampled_latents(vae, parameters, generator)
    noise = draw_noise(latents, generator, noise_offset)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    return per_sample_loss(model, noise_scheduler, latents, batch["input_ids"], noise, timesteps, snr_gamma)


def validation_timesteps(noise_scheduler, count):
    """`count` timesteps evenly spread over the schedule (the same for every image and every evaluation)."""
    total = noise_scheduler.config.num_train_timesteps
    return [int((k + 0.5) * total / count) for k in range(count)]


def validation_loss(model, vae, noise_scheduler, batches, seed, timesteps_per_image=4, cache=None):
    """(sum of weighted per-image losses, sum of weights) over eval batches (see image_captions.eval_batches):
    each image at fixed timesteps with noise seeded by (seed, image index, timestep), the latents the VAE's mean,
    no min-SNR weighting. Deterministic, so successive evaluations differ only by the weights being trained. The
    caller reduces the two sums over ranks; every rank must pass the same number of batches (ZeRO-3)."""
    module = getattr(model, "module", model)
    was_training = module.training
    module.eval()
    total, count = 0.0, 0.0
    try:
        with torch.no_grad():
            for batch in batches:
                latents = mean_latents(vae, latent_parameters(vae, batch["pixel_values"], cache))
                weight = batch["weight"].to(latents.device)
                for t in validation_timesteps(noise_scheduler, timesteps_per_image):
                    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                        mixed_seed(seed, "validation", int(i), t))) for i in batch["index"]]).to(latents.device)
                    timesteps = torch.full((latents.shape[0],), t, dtype=torch.long, device=latents.device)
                    loss = per_sample_loss(model, noise_scheduler, latents, batch["input_ids"], noise, timesteps)
                    total += float((loss * weight).sum()) / timesteps_per_image
                count += float(weight.sum())
    finally:
        module.train(was_training)
    return total, count
