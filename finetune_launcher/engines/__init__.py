"""The engine of a run: DeepSpeed (ZeRO-2/3, offload, fp16 loss scaling), with `engine: ddp` the plain PyTorch one
(finetune_launcher/engines/plain.py), or with `engine: fsdp2` torch's FSDP2 (finetune_launcher/engines/fsdp2.py);
each with a torch AdamW (or DeepSpeed's CPU Adam with optimizer offload on GPUs). `full_state_dict` gives the savers
whole weights whichever engine holds them."""
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig
    from finetune_launcher.task import Engine


def build_engine(model: torch.nn.Module, cfg: "RunConfig", device: torch.device | None = None,
                 world_size: int = 1) -> "Engine":
    """`device` and `world_size` (the rank's) are needed by the ddp and fsdp2 engines only."""
    if cfg.engine == "ddp":
        from finetune_launcher.engines.plain import PlainEngine

        return PlainEngine(model, cfg, partial(torch_adamw, cfg=cfg), device, world_size)
    if cfg.engine == "fsdp2":
        from finetune_launcher.engines.fsdp2 import FSDP2Engine
        from finetune_launcher.models.references import is_random, loads_on_rank0

        return FSDP2Engine(model, cfg, partial(torch_adamw, cfg=cfg), device, world_size,
                           same_start_everything=is_random(cfg.model) or loads_on_rank0(cfg))
    import deepspeed

    if cfg.zero_stage == 3 and cfg.zero3_gather == "layer":
        gather_whole_layers(model)
    if cfg.zero_stage == 3:
        gather_whole_moe_blocks(model)
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


def engine_name(cfg: "RunConfig") -> str:
    if cfg.engine == "ddp":
        return "ddp engine"
    if cfg.engine == "fsdp2":
        return "FSDP2 (sharded per layer)"
    return f"ZeRO-{cfg.zero_stage}{' + offload' if cfg.offload else ''}"


def full_state_dict(engine: "Engine", trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The model's weights as whole CPU tensors on rank 0 (None on the other ranks), by the model's own parameter
    names: the trainable ones only (adapters), or the whole state dict. Every rank calls it (sharded engines gather)."""
    if hasattr(engine, "full_state_dict"):
        return engine.full_state_dict(trainable_only)
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    model, zero3 = engine.module, engine.zero_optimization_stage() == 3
    if zero3:
        engine.empty_partition_cache()  # parameters still prefetched by the last forward cannot be gathered
    if not trainable_only:
        if zero3:
            return engine._zero3_consolidated_16bit_state_dict()
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if main else None
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not zero3:
        return {name: p.detach().cpu().clone() for name, p in trainable.items()} if main else None
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=None):
        return {name: p.detach().cpu().clone() for name, p in trainable.items()} if main else None


def gather_whole_layers(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers each decoder layer's parameters in one hook before the layer runs (DeepSpeed's leaf modules,
    as FSDP wraps per layer) instead of one hook and gather per linear: about 15 times fewer on every pass, and no
    hook inside a layer, so the layer can be compiled. Models without decoder layers (a UNet) keep per-module
    gathers."""
    from deepspeed.utils import set_z3_leaf_module

    from finetune_launcher.models.compiled_layers import decoder_layers

    for layer in decoder_layers(model):
        set_z3_leaf_module(layer, True)
        layer.register_forward_pre_hook(_hidden_states_require_grad, with_kwargs=True)


def gather_whole_moe_blocks(model: torch.nn.Module) -> None:
    """ZeRO-3 gathers each sparse MoE block (router + experts) as one unit, also with zero3_gather: module. Ranks
    route their tokens to different experts; gathered expert by expert, each rank would ask for other parameters
    and the collectives would not match (DeepSpeed #5066, #7461: a hang). Inside a leaf decoder layer this changes
    nothing."""
    from deepspeed.utils import set_z3_leaf_module

    from finetune_launcher.models.experts import moe_blocks

    for block in moe_blocks(model):
        set_z3_leaf_module(block, True)
        block.register_forward_pre_hook(_hidden_states_require_grad, with_kwargs=True)


def _hidden_states_require_grad(module: torch.nn.Module, args: tuple[Any, ...],
                                kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """DeepSpeed reduces a leaf layer's gradients and releases its parameters from a full backward hook, which fires
    once the gradient of the layer's input is computed, or, for an input without grad (the first layer after frozen
    embeddings), as soon as the output's gradient arrives: before the layer's own backward, whose LoRA gradients then
    meet released parameters. An input that requires grad keeps the hook after the layer's backward; the price is
    the first layer's input gradient (about 1/layers of the backward's input-gradient matmuls). Keyed on grad
    mode, not `module.training`: a model left in eval mode (no dropout) still trains."""
    if not torch.is_grad_enabled():
        return None
    if args and torch.is_tensor(args[0]) and not args[0].requires_grad and args[0].is_floating_point():
        return (args[0].detach().requires_grad_(), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if torch.is_tensor(hidden) and not hidden.requires_grad and hidden.is_floating_point():
        return args, {**kwargs, "hidden_states": hidden.detach().requires_grad_()}
    return None


def torch_adamw(params: Iterable[torch.Tensor], cfg: "RunConfig") -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             weight_decay=cfg.weight_decay, fused=torch.cuda.is_available())


def engine_facts(engine: "Engine") -> dict[str, Any]:
    """What the engine really runs (recorded in the history, asserted by tests): ZeRO stage, offload, precision."""
    offload = engine.zero_offload_optimizer() if hasattr(engine, "zero_offload_optimizer") else None
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    from finetune_launcher.engines.fsdp2 import FSDP2Engine
    from finetune_launcher.engines.plain import PlainEngine

    kind = engine.kind if isinstance(engine, (PlainEngine, FSDP2Engine)) else "deepspeed"
    return {"engine": kind, "zero_stage": int(engine.zero_optimization_stage()), "offload_optimizer": bool(offload),
            "precision": precision, "world_size": int(engine.world_size)}
