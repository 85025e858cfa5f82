"""Stable Diffusion UNet fine-tuning (LoRA, QLoRA with the UNet in NF4, full), top to bottom: setup (pipeline parts,
captioned pictures, engine), the shared loop, finish. The VAE and the CLIP text encoder stay frozen (an option puts
LoRA on the text encoder); the loss is the MSE of the UNet's noise (or v) prediction, averaged over the pictures of
the whole optimizer step. A fixed-noise validation loss drives best/, plateau LR and early stop, and every eval
samples the validation prompts with fixed seeds into outputs/<run>/samples/.

    bash launch/train_diffusion.sh configs/tiny_sd_lora.yaml     (--mode qlora | full, --zero 3, ...)
"""
import torch

from finetune_launcher.checkpoint import save_training_info
from finetune_launcher.console import say
from finetune_launcher.data.prepared import rank_rows
from finetune_launcher.data.sampling import ShardedSampler
from finetune_launcher.recipes.diffusion.data import eval_batches, prepare_rows, training_batch
from finetune_launcher.distributed import all_reduce_sum, barrier
from finetune_launcher.engines import build_engine, engine_name, full_state_dict
from finetune_launcher.loop import train
from finetune_launcher.models.prepare import count_parameters
from finetune_launcher.task import StepTask
from finetune_launcher.recipes.diffusion.model import load_diffusion, save_diffusion_lora, save_full_unet
from finetune_launcher.recipes.diffusion.objective import LatentCache, training_loss, validation_loss
from finetune_launcher.recipes.diffusion.sampling import sample_images, save_grid

EVAL_BATCH = 4


def run(cfg, ctx, watch):
    # ---- setup
    parts = load_diffusion(cfg, ctx.device)
    data = rank_rows(cfg, prepare_rows)
    train_data, held_out = data.train_rows, data.eval_rows
    params = count_parameters(parts.model)
    say(f"model {cfg.model}: UNet + text encoder {params[1] / 1e6:.2f}M parameters, {params[0] / 1e6:.3f}M "
        f"trainable ({cfg.mode}{', text-encoder LoRA' if cfg.text_encoder_lora else ''}; {engine_name(cfg)}, "
        f"{cfg.precision}, {ctx.world} process{'es' if ctx.world > 1 else ''})")
    say(f"data {cfg.dataset}: {len(train_data)} train / {len(held_out) if held_out else 0} held-out pictures at "
        f"{cfg.resolution}x{cfg.resolution}")
    engine = build_engine(parts.model, cfg, ctx.device, ctx.world)
    task = DiffusionTask(cfg, ctx, parts, train_data, held_out, data.stats)
    # ---- the loop, then best/ and final/
    return train(cfg, ctx, task, engine, watch, params)


class DiffusionTask(StepTask):
    """The loop's task for a diffusion UNet (see finetune_launcher/task.py): units are pictures. Each micro-batch
    carries a noise seed from (seed, epoch, step, rank, micro-batch), so a resumed run draws the same noise and
    timesteps."""
    unit = "sample"
    throughput = "images"

    def __init__(self, cfg, ctx, parts, train_data, held_out, stats):
        sampler = ShardedSampler(len(train_data), ctx.rank, ctx.world, cfg.micro_batch_size,
                                 cfg.gradient_accumulation_steps, cfg.seed)
        super().__init__(cfg, ctx, sampler, stats)
        self.parts, self.train_data = parts, train_data
        self.held_out = eval_batches(held_out, parts.tokenizer, ctx.rank, ctx.world, EVAL_BATCH, cfg.resolution) \
            if held_out else []
        self.cache = LatentCache(cfg.run_dir / "latent_cache", parts.vae) if cfg.cache_latents else None

    def collate(self, group, epoch, step_in_epoch, micro):
        return training_batch(self.train_data, self.parts.tokenizer, group, self.c, epoch, step_in_epoch,
                              self.ctx.rank, micro)

    def count(self, group, batch):
        return len(group), len(group), len(group)

    def to_device(self, batch):
        return {k: v.to(self.ctx.device) if torch.is_tensor(v) and k != "noise_seed" else v
                for k, v in batch.items()}

    def loss(self, engine, batch, normaliser):
        losses = training_loss(engine, self.parts.vae, self.parts.noise_scheduler, batch, self.cache,
                               self.c.noise_offset, self.c.snr_gamma)
        return losses.sum() / normaliser

    def evaluate(self, engine):
        if not self.held_out:
            return None
        total, count = validation_loss(engine, self.parts.vae, self.parts.noise_scheduler,
                                       [self.to_device(b) for b in self.held_out], self.c.seed, cache=self.cache)
        total, count = all_reduce_sum([total, count], self.ctx.device)
        return total / max(count, 1.0)

    def after_eval(self, engine, step):
        """The validation prompts with fixed seeds, as one PNG grid (rows: prompts, columns: seeds); every rank
        samples (ZeRO-3 gathers), rank 0 saves."""
        if not self.c.validation_prompts:
            return {}
        images = sample_images(engine, self.parts.vae, self.parts.tokenizer, self.parts.sample_scheduler,
                               list(self.c.validation_prompts), list(self.c.sample_seeds), self.c.resolution,
                               self.c.sample_steps, self.c.guidance_scale)
        path = self.c.run_dir / "samples" / f"step-{step:06d}.png"
        grid = save_grid(images, len(self.c.sample_seeds), path) if self.ctx.is_main else None
        barrier()
        return {"samples": str(path), "images": {"samples": grid} if grid is not None else {}}

    def save_weights(self, engine, out_dir, info):
        """best/ and final/: the LoRA in diffusers' format + peft's adapters, or the full UNet; all ranks call (the
        engine gathers the weights it shards), rank 0 writes."""
        state = full_state_dict(engine, trainable_only=self.c.lora)
        if self.ctx.is_main:
            model = self.parts.model
            if self.c.lora:
                save_diffusion_lora(model.unet, model.text_encoder, out_dir, state)
            else:
                save_full_unet(model, out_dir, state)
            save_training_info(out_dir, {**info, "resolution": self.c.resolution, "pipeline": self.parts.path})
        barrier()
