"""The DeepSpeed engine of a run: the trainable parameters, a torch AdamW (or DeepSpeed's CPU Adam with optimizer
offload on GPUs) and the resolved DeepSpeed config."""
import torch


def build_engine(model, cfg):
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.offload and torch.cuda.is_available():
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay,
                                     adamw_mode=True)
    else:
        # A torch optimizer: DeepSpeed's own "AdamW" would JIT-compile FusedAdam (slow first start, GPU-only).
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay,
                                      fused=torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg.deepspeed_dict())
    return engine


def engine_facts(engine):
    """What the engine really runs (recorded in the history, asserted by tests): ZeRO stage, offload, precision."""
    offload = engine.zero_offload_optimizer() if hasattr(engine, "zero_offload_optimizer") else None
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"zero_stage": int(engine.zero_optimization_stage()), "offload_optimizer": bool(offload),
            "precision": precision, "world_size": int(engine.world_size)}
