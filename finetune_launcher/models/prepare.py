"""Model preparation every recipe shares: loading a transformers model as the run needs it (whole or partitioned as
it loads, 16-bit or NF4, a `random:` shape built where it trains), the LoRA config, bitsandbytes' NF4 config (and
NF4 for modules that transformers does not load, such as a diffusers UNet), the ZeRO-3 init context, parameter
counting, and keeping bitsandbytes from repacking 4-bit weights for its CPU kernels."""
import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.distributed import dist_env
from finetune_launcher.dtypes import torch_dtype
from finetune_launcher.models.references import is_random, loads_on_rank0

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from transformers.integrations import HfDeepSpeedConfig

    from finetune_launcher.config.settings import RunConfig


def lora_config(cfg: "RunConfig", target_modules: str | Sequence[str], task_type: str | None = None,
                modules_to_save: list[str] | None = None, target_parameters: Sequence[str] | None = None,
                **extra: Any) -> "LoraConfig":
    """peft's LoraConfig with the run's rank, alpha and dropout for `target_modules` (peft's forms: "all-linear", a
    list of names, or a regex); `target_parameters` names parameters (such as MoE experts' fused weights) that
    take LoRA without being nn.Linear modules; `extra`: more LoraConfig fields (rank_pattern, lora_dropout, ...)."""
    from peft import LoraConfig

    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if target_parameters:
        extra["target_parameters"] = list(target_parameters)
    extra.setdefault("lora_dropout", cfg.lora_dropout)
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=targets,
                      modules_to_save=modules_to_save, bias="none", task_type=task_type, **extra)


def nf4_config(precision: str, quant_storage: str, skip_modules: Sequence[str] | None = None) -> "BitsAndBytesConfig":
    """transformers' BitsAndBytesConfig: NF4 with double quantisation, computing in `precision`, storing the 4-bit
    weights as `quant_storage` (the run's resolved bnb_4bit_quant_storage); `skip_modules` stay in the compute
    dtype."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(precision),
                              bnb_4bit_quant_storage=torch_dtype(quant_storage),
                              llm_int8_skip_modules=list(skip_modules) if skip_modules else None)


def quantize_linears(module: torch.nn.Module, compute_dtype: torch.dtype, storage_dtype: torch.dtype,
                     device: torch.device) -> torch.nn.Module:
    """Replace every nn.Linear under `module` by bitsandbytes' Linear4bit holding its weight in NF4 (double quant,
    `storage_dtype`), quantized on `device` now, as transformers' loader builds them; the 16-bit weight is released.
    For models transformers does not load (diffusers refuses to quantize without a GPU) and random: shapes."""
    import bitsandbytes as bnb

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, linear_to_4bit(bnb, child, compute_dtype, storage_dtype, device))
    disable_cpu_weight_repacking(module)
    return module


def linear_to_4bit(bnb: Any, linear: torch.nn.Linear, compute_dtype: torch.dtype, storage: torch.dtype,
                   device: torch.device) -> torch.nn.Module:
    quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  quant_storage=storage, device="meta")
    quantized.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4", quant_storage=storage,
                                         module=quantized).to(device)  # Params4bit quantizes on its first move
    if linear.bias is not None:
        quantized.bias = torch.nn.Parameter(linear.bias.data.to(device, compute_dtype), requires_grad=False)
    return quantized


def disable_cpu_weight_repacking(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights in place for its CPU inference kernel on the first no-grad forward (our
    evals). The repacked layout breaks saving (state_dict asserts uint8 storage) and ZeRO-3 sharding; training
    never needs it."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def loads_partitioned(cfg: "RunConfig") -> bool:
    """Whether the model is partitioned as it loads: DeepSpeed's zero.Init under ZeRO-3. Otherwise each rank loads
    it whole (QLoRA: onto its device, where bitsandbytes quantizes), unless loads_on_rank0(cfg)."""
    return cfg.zero_stage == 3 and cfg.engine == "deepspeed"


def zero3_init_context(cfg: "RunConfig") -> "HfDeepSpeedConfig | None":
    """Keep the returned object alive as long as the model: while it exists, transformers builds models inside
    DeepSpeed's zero.Init (see loads_partitioned). None otherwise."""
    if not loads_partitioned(cfg):
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(cfg.deepspeed_dict())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
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


# ---------------------------------------------------------------- loading

def load_base_model(cfg: "RunConfig", path: str | Path, auto_class: type[Any], device: torch.device,
                    quantization: "BitsAndBytesConfig | None" = None
                    ) -> tuple[torch.nn.Module, "HfDeepSpeedConfig | None"]:
    """(model, keepalive): the run's model from `path` through transformers' `auto_class`, in the run's precision,
    partitioned as it loads where loads_partitioned says so (keep `keepalive` as long as the model), NF4 with
    `quantization` (a BitsAndBytesConfig) for QLoRA; a `random:` shape is built where it trains, its QLoRA layers
    quantised one at a time (random_4bit_model: no checkpoint on disk)."""
    if is_random(cfg.model) and quantization is not None:  # before the ZeRO-3 context: a 4-bit model has no zero.Init
        model = random_4bit_model(path, auto_class, quantization, device, cfg.attn_implementation)
        return model, zero3_init_context(cfg)
    keepalive = zero3_init_context(cfg)
    kwargs = dict(dtype=torch_dtype(cfg.precision), attn_implementation=cfg.attn_implementation)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        if not loads_partitioned(cfg):
            kwargs["device_map"] = {"": device}
    if loads_on_rank0(cfg) and dist_env()[0] != 0:
        model = model_from_config(path, auto_class, dict(kwargs, trust_remote_code=cfg.trust_remote_code),
                                  torch.device("meta"))
    elif is_random(cfg.model):
        model = random_model(path, auto_class, kwargs, device, loads_partitioned(cfg))
    else:
        model = auto_class.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if quantization is not None:
        disable_cpu_weight_repacking(model)
    return model, keepalive


def random_model(path: str | Path, auto_class: type[Any], kwargs: dict[str, Any], device: torch.device,
                 partitioned: bool) -> torch.nn.Module:
    """A random-init model of a real shape, built where it trains: under zero.Init (`partitioned`) it is partitioned
    as it is created; otherwise it is created directly on this rank's device."""
    from transformers import AutoConfig

    if partitioned:
        return auto_class.from_config(AutoConfig.from_pretrained(path), **kwargs)
    return model_from_config(path, auto_class, kwargs, device)


def model_from_config(path: str | Path, auto_class: type[Any], kwargs: dict[str, Any],
                      device: torch.device) -> torch.nn.Module:
    """The model of the config.json at `path`, created on `device`: random weights, or none on the meta device."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    with torch.device(device):
        return auto_class.from_config(config, **kwargs)


def random_4bit_model(path: str | Path, auto_class: type[Any], quant_config: "BitsAndBytesConfig",
                      device: torch.device, attn_implementation: str) -> torch.nn.Module:
    """A random-init model of the shape at `path` (config.json only) with its decoder layers' linear layers in NF4
    (`quant_config`'s compute and storage dtypes), built on `device` one decoder layer at a time: everything outside
    the decoder layers (embeddings, norm, lm_head, a vision tower) is built whole in the compute dtype, then each
    layer is made, initialised, its linears quantised and its 16-bit weights freed before the next. At most one
    layer's 16-bit weights exist beside the 4-bit model, so no checkpoint on disk is needed (a 32B shape's 65 GB would
    not fit the device's disk). Marked as transformers marks a 4-bit load, so peft and the HF Trainer treat it as
    one."""
    from transformers import AutoConfig

    dtype, storage = quant_config.bnb_4bit_compute_dtype, quant_config.bnb_4bit_quant_storage
    config = AutoConfig.from_pretrained(path)
    layers = config.get_text_config().num_hidden_layers
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
        decoder.layers.append(quantize_linears(layer, dtype, storage, device))
    mark_4bit(model, quant_config)
    return model


def mark_4bit(model: torch.nn.Module, quant_config: "BitsAndBytesConfig") -> None:
    """What transformers sets on a model it loads in 4 bits (peft and the HF Trainer read it)."""
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


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
