"""Tokenizer and causal-LM loading for full, LoRA and QLoRA fine-tunes."""

from finetune_launcher.models.compiled_layers import compile_decoder_layers
from finetune_launcher.models.expert_lora import add_expert_lora, prepare_kbit_keeping_experts
from finetune_launcher.models.experts import is_moe
from finetune_launcher.models.prepare import load_base_model, lora_config, nf4_config
from finetune_launcher.models.references import resolve_model_path


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg, device):
    """Return (model, keepalive) for the run's mode; see models.prepare.load_base_model for `keepalive`."""
    from transformers import AutoModelForCausalLM

    quantization = nf4_config(cfg.precision, cfg.bnb_4bit_quant_storage) if cfg.mode == "qlora" else None
    model, keepalive = load_base_model(cfg, resolve_model_path(cfg.model), AutoModelForCausalLM, device, quantization)
    model.config.use_cache = False
    if cfg.liger_kernel:
        apply_liger_kernels(model, cfg.zero_stage, in_layers=not cfg.compile_layers)
    model = prepare_for_training(model, cfg)
    if cfg.compile_layers:
        compile_decoder_layers(model, hooks_outside=cfg.zero_stage == 3)
    return model, keepalive


def prepare_for_training(model, cfg, task_type="CAUSAL_LM", target_modules=None):
    """Gradient checkpointing, k-bit preparation (QLoRA) and the LoRA adapters, as the mode asks; a mixture of
    experts gets LoRA on its experts' fused weights too (models/expert_lora.py)."""
    checkpointing = {"use_reentrant": False}
    moe = is_moe(model)
    if cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        prepare = prepare_kbit_keeping_experts if moe else prepare_model_for_kbit_training
        model = prepare(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                        gradient_checkpointing_kwargs=checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if cfg.lora and moe:
        return add_expert_lora(model, cfg, target_modules or cfg.lora_target_modules, task_type)
    if cfg.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, target_modules or cfg.lora_target_modules, task_type))
    return model


def apply_liger_kernels(model, zero_stage, in_layers=True):
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, and outside ZeRO-3 the fused linear cross-entropy); the run
    config decided before launch that they run here (config.resolve.resolve_liger). `in_layers=False` (compiled
    decoder layers): only the fused cross-entropy, outside the layers; inductor fuses the norm, MLP and RoPE itself
    (Liger's in-layer kernels under torch.compile: Liger-Kernel issue #174, open)."""
    import logging

    # Liger probes optional backends (CuTe DSL, Ascend) and warns on every rank when they are absent; the Triton
    # kernels we use are unaffected.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    from finetune_launcher.console import say

    # The fused linear cross-entropy reads lm_head.weight directly, outside the module's forward, so under ZeRO-3
    # it would see an empty partition: there only the norm, MLP and RoPE kernels are used.
    fused_ce = zero_stage != 3
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=fused_ce, rms_norm=in_layers,
                                    swiglu=in_layers, rope=in_layers)
    kernels = ["RMSNorm", "SwiGLU", "RoPE"] if in_layers else []
    kernels += ["fused linear cross-entropy"] if fused_ce else []
    note = "" if fused_ce else "; no fused cross-entropy under ZeRO-3"
    note += "" if in_layers else "; the compiled layers fuse norm, MLP and RoPE"
    say(f"liger kernels: on ({', '.join(kernels)}{note})")
