"""Tokenizer and causal-LM loading for full, LoRA and QLoRA fine-tunes, including the ZeRO-3 init context."""
import copy
from contextlib import contextmanager

import torch

from train.dtypes import torch_dtype
from train.models.compiled_layers import compile_decoder_layers
from train.models.tiny import is_random, resolve_model_path


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
    DeepSpeed's zero.Init under ZeRO-3 (partitioned as they load). None outside ZeRO-3."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(cfg.deepspeed_dict()) if cfg.zero_stage == 3 else None


def load_model(cfg, device):
    """Return (model, keepalive) for the run's mode; see zero3_init_context for `keepalive`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.model)
    if is_random(cfg.model) and cfg.mode == "qlora":  # built before the ZeRO-3 context: a 4-bit model has no zero.Init
        model = random_4bit_model(path, AutoModelForCausalLM, quantization_config(cfg.precision,
                                                                                 cfg.bnb_4bit_quant_storage),
                                  device, cfg.attn_implementation)
    keepalive = zero3_init_context(cfg)
    kwargs = dict(dtype=torch_dtype(cfg.precision), attn_implementation=cfg.attn_implementation,
                  trust_remote_code=cfg.trust_remote_code)
    if cfg.mode == "qlora":
        kwargs["quantization_config"] = quantization_config(cfg.precision, cfg.bnb_4bit_quant_storage)
        if cfg.zero_stage == 2:
            kwargs["device_map"] = {"": device}
    if is_random(cfg.model) and cfg.mode != "qlora":
        model = random_model(path, kwargs, device, cfg.zero_stage)
    elif not is_random(cfg.model):
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

    from train.console import say

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


def random_4bit_model(path, auto_class, quant_config, device, attn_implementation):
    """A random-init model of the shape at `path` (config.json only) with its decoder layers' linear layers in
    bitsandbytes NF4 (double quant, `quant_config`'s compute and storage dtypes), built on `device` one decoder layer
    at a time: everything outside the decoder layers (embeddings, norm, lm_head, a vision tower) is built whole in the
    compute dtype, then each layer is made in the compute dtype, initialised, its linears quantised and the 16-bit
    weights freed before the next. At most one layer's 16-bit weights exist beside the 4-bit model, so no checkpoint
    on disk is needed (a 32B shape's 65 GB would not fit the disk) and the 16-bit model never exists whole. The
    linears quantised are those transformers' bitsandbytes loader quantises with this project's skip lists (every
    linear of the language model's layers, not lm_head nor a vision tower). Marked as transformers marks a 4-bit
    load, so peft and the HF Trainer treat it as one."""
    import bitsandbytes as bnb
    from transformers import AutoConfig

    dtype, storage = quant_config.bnb_4bit_compute_dtype, quant_config.bnb_4bit_quant_storage
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config()
    layers = text.num_hidden_layers
    shell_config = copy.deepcopy(config)
    shell_text = shell_config.get_text_config()
    with torch.device("meta"):  # the decoder layer class, from a one-layer model that allocates nothing
        shell_text.num_hidden_layers = 1
        layer_class = type(auto_class.from_config(shell_config).get_decoder().layers[0])
    shell_text.num_hidden_layers = 0
    with torch.device(device):
        model = auto_class.from_config(shell_config, dtype=dtype, attn_implementation=attn_implementation)
    shell_text.num_hidden_layers = layers  # the config object the model's modules hold
    decoder = model.get_decoder()
    for index in range(layers):
        with torch.device(device), default_dtype(dtype):
            layer = layer_class(decoder.config, index)
        for module in layer.modules():
            model._init_weights(module)
        quantize_linears(layer, dtype, storage, device, bnb)
        decoder.layers.append(layer)
    model.config.quantization_config = quant_config
    model.is_quantized, model.is_loaded_in_4bit, model.quantization_method = True, True, "bitsandbytes"
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module.config, "to_dict"):
            module.config._is_quantized = True
    try:
        from transformers.quantizers import AutoHfQuantizer

        model.hf_quantizer = AutoHfQuantizer.from_config(quant_config, pre_quantized=False)
    except Exception:  # noqa: BLE001 - only the HF Trainer's "is it trainable" check reads it
        pass
    return model


def quantize_linears(module, dtype, storage, device, bnb):
    """Replace every nn.Linear under `module` by a bitsandbytes Linear4bit holding its weight in NF4 (double quant,
    `storage` dtype), as transformers' loader builds them; the 16-bit weight is released."""
    for parent in list(module.modules()):
        for name, linear in list(parent.named_children()):
            if type(linear) is not torch.nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None, dtype,
                                          compress_statistics=True, quant_type="nf4", quant_storage=storage,
                                          device="meta")
            quantized.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4", quant_storage=storage,
                                                 module=quantized)._quantize(device)
            if linear.bias is not None:
                quantized.bias = torch.nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, quantized)


@contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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
