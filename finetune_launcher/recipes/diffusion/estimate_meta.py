"""A diffusers pipeline's UNet, VAE and CLIP text encoder built from their config.json files on the meta device (no
memory, no weights): exact parameter counts, and one training step of the UNet run on meta tensors, which
autograd's saved-tensor hooks and torch's FlopCounterMode observe as they would on real ones. Imports torch,
diffusers, transformers and peft.

Attention: on meta tensors torch's SDPA dispatches to its math kernel, which keeps the attention probabilities;
the kernels that run for real (CUDA flash / memory-efficient, CPU flash) keep q, k, v, the output and the
log-sum-exp. The profile routes SDPA to the CPU flash kernel, whose meta implementation keeps what those keep (the
tiny pipeline's real CPU step keeps byte for byte what the profile counts: tests/unit/test_estimate_diffusion.py),
and counts its FLOPs (4 x queries x keys x head width per head forward, twice that backward), which
FlopCounterMode does not see.
"""
import contextlib
import functools
from dataclasses import dataclass

from finetune_launcher import recipe_table

GC_BLOCKS = ("ResnetBlock2D", "Transformer2DModel")  # what diffusers' UNet checkpoints (and recomputes) one by one


@dataclass(frozen=True)
class UNetStep:
    """One image through the UNet at a resolution: bytes kept for backward (as configured, and without
    checkpointing), the most one checkpointed block keeps (recomputed in backward), the largest kept tensor, FLOPs
    by pass, and the blocks run."""
    saved: int
    saved_plain: int
    largest_block: int
    largest_tensor: int
    flops: tuple  # (forward, backward, recompute)
    blocks: int


@contextlib.contextmanager
def flash_attention_on_meta(counter):
    """SDPA without a mask on meta tensors -> the CPU flash kernel (see the module doc); FLOPs added to counter."""
    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def routed(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if q.device.type != "meta" or attn_mask is not None or kwargs:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            **kwargs)
        counter.append(4 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3] * (0.5 if is_causal else 1))
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                           scale=scale)[0]

    F.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def meta_unet(unet_config):
    import torch
    from diffusers import UNet2DConditionModel

    with quiet_diffusers(), torch.device("meta"):
        return UNet2DConditionModel.from_config(as_config(unet_config))


def meta_vae(vae_config):
    import torch
    from diffusers import AutoencoderKL

    with quiet_diffusers(), torch.device("meta"):
        return AutoencoderKL.from_config(as_config(vae_config))


def as_config(items):
    """A config dict from its hashable items (lists back from tuples: transformers 5.17's configs validate types)."""
    pairs = items.items() if isinstance(items, dict) else items
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pairs}


def meta_text_encoder(text_config):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig.from_dict(as_config(text_config)))


def numel(module):
    return sum(p.numel() for p in module.parameters())


def unet_lora_targets(unet, targets):
    """peft target names as finetune_launcher/recipes/diffusion/model.py resolves lora_target_modules."""
    from torch import nn

    if targets is None:  # the recipe's default (its recipe-table entry)
        return list(recipe_table.get("diffusion").defaults["lora_target_modules"])
    if targets == "all-linear":
        return [name for name, module in unet.named_modules() if isinstance(module, nn.Linear)]
    return list(targets)


@functools.lru_cache(maxsize=16)
def pipeline_counts(unet_config, vae_config, text_config):
    """Parameters of the UNet (and of its nn.Linear weights, what NF4 holds under QLoRA), the VAE (its encoder
    half, what training runs) and the text encoder; the configs are tuples of their items (hashable)."""
    from torch import nn

    unet, vae, text = meta_unet(dict(unet_config)), meta_vae(dict(vae_config)), meta_text_encoder(dict(text_config))
    linears = tuple(m.weight.numel() for m in unet.modules() if type(m) is nn.Linear)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in [*unet.modules(), *text.modules()])
    return {"unet": numel(unet), "unet_linear_sizes": linears, "vae": numel(vae), "text_encoder": numel(text),
            "largest_module": largest}


@functools.lru_cache(maxsize=32)
def lora_counts(unet_config, text_config, rank, targets, text_encoder_lora):
    """(UNet LoRA parameters, text-encoder LoRA parameters) as peft adds them."""
    from peft import LoraConfig

    from finetune_launcher.recipes.diffusion.model import TEXT_ENCODER_TARGETS

    unet = meta_unet(dict(unet_config))
    unet.add_adapter(LoraConfig(r=rank, target_modules=unet_lora_targets(unet, targets)))
    text = 0
    if text_encoder_lora:
        encoder = meta_text_encoder(dict(text_config))
        encoder.add_adapter(LoraConfig(r=rank, target_modules=list(TEXT_ENCODER_TARGETS)))
        text = sum(p.numel() for n, p in encoder.named_parameters() if "lora_" in n)
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n), text


def saved_tensor_counter(parameters):
    """(pack hook, sizes by storage): each saved storage counted once, parameters left out."""
    skip = {p.untyped_storage()._cdata for p in parameters}
    sizes = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in skip:
            sizes[storage._cdata] = storage.nbytes()
        return tensor

    return pack, sizes


def track_blocks(unet, sizes):
    """Forward hooks recording the bytes each checkpointable block adds to `sizes`; returns (deltas, handles)."""
    deltas, handles, start = [], [], {}
    for module in unet.modules():
        if type(module).__name__ in GC_BLOCKS:
            handles.append(module.register_forward_pre_hook(
                lambda m, args: start.__setitem__(id(m), sum(sizes.values()))))
            handles.append(module.register_forward_hook(
                lambda m, args, out: deltas.append(sum(sizes.values()) - start[id(m)])))
    return deltas, handles


@functools.lru_cache(maxsize=32)
def unet_step(unet_config, mode, rank, dropout, targets, checkpointing, dtype_name, latent_side, tokens, width):
    """A training step of the UNet for one image (latent_side x latent_side latents, `tokens` x `width` prompt
    states) on the meta device, as UNetStep. The recompute is what the checkpointed step multiplies beyond the
    plain one."""
    plain = unet_pass(unet_config, mode, rank, dropout, targets, False, dtype_name, latent_side, tokens, width)
    kept = unet_pass(unet_config, mode, rank, dropout, targets, True, dtype_name, latent_side, tokens, width) \
        if checkpointing else plain
    forward = plain["forward"] + plain["attention_forward"]
    backward = plain["total"] - plain["forward"] + 2 * plain["attention_forward"]
    recompute = kept["total"] - plain["total"] + kept["attention_total"] - plain["attention_total"]
    return UNetStep(saved=kept["saved"], saved_plain=plain["saved"], largest_block=plain["largest_block"],
                    largest_tensor=plain["largest_tensor"], flops=(forward, backward, recompute),
                    blocks=plain["blocks"])


@functools.lru_cache(maxsize=32)
def unet_pass(unet_config, mode, rank, dropout, targets, checkpointing, dtype_name, latent_side, tokens, width):
    """Forward and backward of one image on the meta device: saved bytes, the largest block's and tensor's, FLOPs
    (FlopCounterMode's, and the routed attention's apart)."""
    import torch
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    dtype = getattr(torch, dtype_name)
    unet = meta_unet(dict(unet_config))
    unet.requires_grad_(mode == "full")
    if mode != "full":
        unet.add_adapter(LoraConfig(r=rank, lora_dropout=dropout, target_modules=unet_lora_targets(unet, targets)))
    with quiet_diffusers():
        unet.to(dtype)  # DeepSpeed's bf16/fp16 engine casts every floating parameter, adapters included
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    pack, sizes = saved_tensor_counter(list(unet.parameters()))
    deltas, handles = track_blocks(unet, sizes)
    attention, flops = [], FlopCounterMode(display=False)
    sample = torch.empty(1, unet.config.in_channels, latent_side, latent_side, device="meta", dtype=dtype)
    states = torch.empty(1, tokens, width, device="meta", dtype=dtype)
    with flash_attention_on_meta(attention), flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(sample, torch.tensor([500], device="meta"), states, return_dict=False)[0]
        forward, attention_forward, blocks = flops.get_total_flops(), sum(attention), len(deltas)
        out.float().square().mean().backward()
    for handle in handles:
        handle.remove()
    return {"saved": sum(sizes.values()), "largest_block": max(deltas, default=0),
            "largest_tensor": max(sizes.values(), default=0), "forward": forward, "total": flops.get_total_flops(),
            "attention_forward": attention_forward, "attention_total": sum(attention), "blocks": blocks}


@functools.lru_cache(maxsize=16)
def encoder_flops(vae_config, text_config, resolution, tokens):
    """(VAE encode FLOPs of one resolution x resolution picture, text-encoder forward FLOPs of one prompt)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    vae, text = meta_vae(dict(vae_config)), meta_text_encoder(dict(text_config))
    attention = []
    with flash_attention_on_meta(attention), torch.no_grad():
        with FlopCounterMode(display=False) as counted:
            vae.encode(torch.empty(1, vae.config.in_channels, resolution, resolution, device="meta"))
        image = counted.get_total_flops() + sum(attention)
        with FlopCounterMode(display=False) as counted:
            text(torch.zeros(1, tokens, dtype=torch.long, device="meta"))
    return image, counted.get_total_flops()
