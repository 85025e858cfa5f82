"""Model preparation every recipe shares: the LoRA config, bitsandbytes' NF4 config (and NF4 for modules that
transformers does not load, such as a diffusers UNet), the ZeRO-3 init context, parameter counting, and keeping
bitsandbytes from repacking 4-bit weights for its CPU kernels."""
import torch

from finetune_launcher.dtypes import torch_dtype


def lora_config(cfg, target_modules, task_type=None, modules_to_save=None, target_parameters=None):
    """peft's LoraConfig with the run's rank, alpha and dropout for `target_modules` (peft's forms: "all-linear", a
    list of names, or a regex); `target_parameters` names parameters (such as MoE experts' fused weights) that
    take LoRA without being nn.Linear modules."""
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    extra = {"target_parameters": list(target_parameters)} if target_parameters else {}
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, modules_to_save=modules_to_save, bias="none", task_type=task_type,
                      **extra)


def nf4_config(precision, quant_storage, skip_modules=None):
    """transformers' BitsAndBytesConfig: NF4 with double quantisation, computing in `precision`, storing the 4-bit
    weights as `quant_storage` (the run's resolved bnb_4bit_quant_storage); `skip_modules` stay in the compute
    dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(precision),
                              bnb_4bit_quant_storage=torch_dtype(quant_storage),
                              llm_int8_skip_modules=list(skip_modules) if skip_modules else None)


def quantize_linears(model, cfg, device):
    """Replace every nn.Linear of `model` by bitsandbytes' Linear4bit (NF4, double quant, the run's compute and
    storage dtypes), quantized as it moves to `device`: what BitsAndBytesConfig does while transformers loads a
    model, for models it does not load (diffusers refuses to quantize without a GPU)."""
    import bitsandbytes as bnb

    compute, storage = torch_dtype(cfg.precision), torch_dtype(cfg.bnb_4bit_quant_storage)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, linear_to_4bit(bnb, child, compute, storage))
    model.to(device)  # Params4bit quantizes on its first move to a real device (CPU included)
    model.is_loaded_in_4bit = True  # what transformers' and diffusers' quantizers set; peft then uses its 4-bit LoRA
    disable_cpu_weight_repacking(model)
    return model


def linear_to_4bit(bnb, linear, compute_dtype, storage):
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=storage, device="meta")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", quant_storage=storage, module=quantized)
    if linear.bias is not None:
        quantized.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return quantized


def disable_cpu_weight_repacking(model):
    """bitsandbytes repacks 4-bit weights in place for its CPU inference kernel on the first no-grad forward (our
    evals). The repacked layout breaks saving (state_dict asserts uint8 storage) and ZeRO-3 sharding; training
    never needs it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def loads_partitioned(cfg):
    """Whether the model is partitioned as it loads: DeepSpeed's zero.Init under ZeRO-3. Otherwise each rank loads
    it whole (QLoRA: onto its device, where bitsandbytes quantizes)."""
    return cfg.zero_stage == 3 and cfg.engine == "deepspeed"


def zero3_init_context(cfg):
    """Keep the returned object alive as long as the model: while it exists, transformers builds models inside
    DeepSpeed's zero.Init (see loads_partitioned). None otherwise."""
    if not loads_partitioned(cfg):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(cfg.deepspeed_dict())


def count_parameters(model):
    """(trainable, total) parameter counts; ZeRO-3 partitioned parameters report their full size (ds_numel), 4-bit
    weights their unpacked size."""
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
