"""Run under torchrun (2 CPU processes): the tiny SD pipeline in a plain DeepSpeed engine for one (mode, ZeRO stage,
precision) combination, a few optimizer steps on the tiny dataset, the validation loss before and after, a sample
image on every rank, and the LoRA gathered and saved by rank 0. Prints one JSON line per rank:
RESULT {"rank", "partitioned", "val_before", "val_after", "sample_size"}.

usage: torchrun --nproc_per_node 2 tests/e2e/sd_zero_worker.py MODE STAGE PRECISION TEXT_ENCODER_LORA OUT_DIR
"""
import contextlib
import json
import sys
import types

import deepspeed
import torch

from train.distributed import all_reduce_sum, init_distributed, shutdown_distributed
from train.data.image_captions import ImageCaptionSampler, eval_batches, load_image_captions
from train.models.diffusion import load_diffusion, save_diffusion_lora
from train.models.diffusion_objective import training_loss, validation_loss
from train.models.diffusion_sampling import sample_images

STEPS = 6


def main(mode, stage, precision, text_encoder_lora, out_dir):
    ctx = init_distributed()
    rank, world = ctx.rank, ctx.world
    cfg = types.SimpleNamespace(model="builtin:tiny-sd", mode=mode, precision=precision, lora_r=4, lora_alpha=8,
                                lora_dropout=0.0, lora_target_modules=None, gradient_checkpointing=True,
                                text_encoder_lora=text_encoder_lora, zero_stage=stage)
    parts = load_diffusion(cfg, torch.device("cpu"))
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"}}
    optimizer = torch.optim.AdamW([p for p in parts.model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=parts.model, optimizer=optimizer, config=ds_config)
    partitioned = any(p.numel() == 0 for p in engine.module.unet.parameters())
    sampler = ImageCaptionSampler(load_image_captions("data/tiny_sd"), parts.tokenizer, rank, world, 2, 1, 0, 64)
    held_out = eval_batches(load_image_captions("data/tiny_sd", split="validation"), parts.tokenizer, rank, world,
                            4, 64)

    def mean_validation_loss():
        total, count = all_reduce_sum(validation_loss(engine, parts.vae, parts.noise_scheduler, held_out, 0),
                                      torch.device("cpu"))
        return total / count

    before = mean_validation_loss()
    for step in range(STEPS):
        batch = sampler.micro_batches(0, step)[0]
        engine.backward(training_loss(engine, parts.vae, parts.noise_scheduler, batch).mean())
        engine.step()
    after = mean_validation_loss()
    image, = sample_images(engine, parts.vae, parts.tokenizer, parts.sample_scheduler, ["a red circle"], [0], 64,
                           steps=3)
    save_gathered_lora(engine, stage, rank, out_dir)
    print("RESULT " + json.dumps({"rank": rank, "partitioned": partitioned, "val_before": before,
                                  "val_after": after, "sample_size": list(image.size)}), flush=True)
    shutdown_distributed()


def save_gathered_lora(engine, stage, rank, out_dir):
    lora = [p for p in engine.module.parameters() if p.requires_grad]
    if stage == 3:
        engine.empty_partition_cache()
    gathered = deepspeed.zero.GatheredParameters(lora, modifier_rank=None) if stage == 3 else contextlib.nullcontext()
    with gathered:
        if rank == 0:
            save_diffusion_lora(engine.module.unet, engine.module.text_encoder, out_dir)
    torch.distributed.barrier()


if __name__ == "__main__":
    mode, stage, precision, text_encoder_lora, out_dir = sys.argv[1:6]
    main(mode, int(stage), precision, text_encoder_lora == "1", out_dir)
