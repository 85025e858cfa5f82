"""Tokenizer and causal-LM loading for full, LoRA and QLoRA fine-tunes, including the ZeRO-3 init context."""
import torch

from finetune_launcher.dtypes import torch_dtype
from finetune_launcher.models.compiled_layers import compile_decoder_layers
from finetune_launcher.models.references import is_random, materialize_random_weights, resolve_model_path


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.tokenizer or cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(precision, quant_storage):
    """bitsandbytes NF4 with double quantisation, computing in `precision`, storing 4-bit weights as `quant_storage`
    (the resolved bnb_4bit_quant_storage: the compute dtype under ZeRO-3, else uint8)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(precision),
                              bnb_4bit_quant_storage=torch_dtype(quant_storage))


def lora_config(cfg, task_type="CAUSAL_LM", target_modules=None):
    from peft import LoraConfig

    targets = target_modules or cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                      task_type=task_type)


def zero3_init_context(cfg):
    """Keep the returned object alive as long as the model: while it exists, transformers builds models inside
    DeepSpeed's zero.Init under ZeRO-3 (partitioned as they load). None outside DeepSpeed's ZeRO-3 (the fsdp2
    engine shards the loaded model)."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(cfg.deepspeed_dict()) if cfg.zero_stage == 3 and cfg.engine == "deepspeed" else None


def load_model(cfg, device):
    """Return (model, keepalive) for the run's mode; see zero3_init_context for `keepalive`."""
    from transformers import AutoModelForCausalLM

    keepalive = zero3_init_context(cfg)
    kwargs = dict(dtype=torch_dtype(cfg.precision), attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code)
    path = resolve_model_path(cfg.model)
    if cfg.mode == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg.precision, cfg.bnb_4bit_quant_storage)
        if cfg.zero_stage == 2:
            kwargs["device_map"] = {"": device}
        if is_random(cfg.model):
            materialize_random_weights(path, torch_dtype(cfg.precision))
    if is_random(cfg.model) and cfg.mode != "qlora":
        model = random_model(path, kwargs, device, cfg.zero_stage)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if cfg.mode == "qlora":
        disable_cpu_weight_repacking(model)
    if cfg.liger_kernel:
        apply_liger_kernels(model, cfg.zero_stage, in_layers=not cfg.compile_layers)
    model = prepare_for_training(model, cfg)
    if cfg.compile_layers:
        compile_decoder_layers(model, hooks_outside=cfg.zero_stage == 3)
    return model, keepalive


def prepare_for_training(model, cfg, task_type="CAUSAL_LM", target_modules=None):
    """Gradient checkpointing, k-bit preparation (QLoRA) and the LoRA adapters, as the mode asks."""
    checkpointing = {"use_reentrant": False}
    if cfg.mode == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if cfg.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg, task_type, target_modules))
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


def random_model(path, kwargs, device, zero_stage):
    """A random-init model of a real shape, built where it trains: under zero.Init (ZeRO-3) it is partitioned as it
    is created; otherwise it is created directly on this rank's device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_cfg = AutoConfig.from_pretrained(path)
    if zero_stage == 3:
        return AutoModelForCausalLM.from_config(model_cfg, **kwargs)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_cfg, **kwargs)


def disable_cpu_weight_repacking(model):
    """bitsandbytes repacks 4-bit weights in place for its CPU inference kernel on the first no-grad forward (our
    evals). The repacked layout breaks saving (state_dict asserts uint8 storage) and ZeRO-3 sharding; training
    never needs it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def count_parameters(model):
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters report their full size (ds_numel)."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:  # 4-bit: count the weights, not the packed storage elements
            n = int(torch.Size(quant_state.shape).numel())
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
