"""The engine of a run: DeepSpeed (ZeRO-2/3, offload, fp16 loss scaling) or, with `engine: ddp`, the plain PyTorch
one (train/plain_engine.py); either with a torch AdamW (or DeepSpeed's CPU Adam with optimizer offload on GPUs)."""
from functools import partial

import torch


def build_engine(model, cfg, device=None, world_size=1):
    """`device` and `world_size` (the rank's) are needed by the ddp engine only."""
    if cfg.engine == "ddp":
        from train.plain_engine import PlainEngine

        return PlainEngine(model, cfg, partial(torch_adamw, cfg=cfg), device, world_size)
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                     weight_decay=cfg.weight_decay, adamw_mode=True)
    else:
        # A torch optimizer: DeepSpeed's own "AdamW" would JIT-compile FusedAdam (slow first start, GPU-only).
        optimizer = torch_adamw(params, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg.deepspeed_dict())
    return engine


def torch_adamw(params, cfg):
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, fused=torch.cuda.is_available())


def engine_facts(engine):
    """What the engine really runs (recorded in the history, asserted by tests): ZeRO stage, offload, precision."""
    offload = engine.zero_offload_optimizer() if hasattr(engine, "zero_offload_optimizer") else None
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    from train.plain_engine import PlainEngine

    kind = "ddp" if isinstance(engine, PlainEngine) else "deepspeed"
    return {"engine": kind, "zero_stage": int(engine.zero_optimization_stage()), "offload_optimizer": bool(offload),
            "precision": precision, "world_size": int(engine.world_size)}
