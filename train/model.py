"""Tokenizer and model loading for full, LoRA and QLoRA fine-tunes, including the ZeRO-3 init context."""
import torch

from train.config import QUANT_STORAGE_FOR_PRECISION, ConfigError, quant_storage_problem
from train.engine import torch_dtype
from train.tiny import is_random, materialize_random_weights, resolve_model_path


def load_tokenizer(config):
    from transformers import AutoTokenizer

    path = resolve_model_path(config["tokenizer"] or config["model"])
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config["trust_remote_code"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_config(config):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(config["model"]), trust_remote_code=config["trust_remote_code"])


def hidden_size_of(model_cfg):
    text_cfg = getattr(model_cfg, "text_config", None) or model_cfg
    return int(getattr(text_cfg, "hidden_size", 1024))


def quantization_config(config, precision):
    """The bitsandbytes NF4 config for `precision` (resolved: bf16, fp16 or fp32). Under ZeRO-3 the 4-bit storage
    dtype must be the compute dtype; with precision auto that is known only here, so a mismatch is refused here."""
    compute = torch_dtype(precision)
    wanted = QUANT_STORAGE_FOR_PRECISION[precision]
    storage = config["bnb_4bit_quant_storage"]
    if storage == "auto":
        # ZeRO-3 shards parameters by dtype: the 4-bit storage must match the compute dtype to be sharded.
        storage = wanted if config["zero_stage"] == 3 else "uint8"
    elif config["zero_stage"] == 3 and storage != wanted:
        resolved = " (resolved from precision: auto)" if config["precision"] == "auto" else ""
        raise ConfigError(quant_storage_problem(storage, f"precision {precision}{resolved} computes in {wanted}"))
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=getattr(torch, storage))


def lora_config(config):
    from peft import LoraConfig

    return LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                      target_modules=config["lora_target_modules"], bias="none", task_type="CAUSAL_LM")


def load_model(config, precision, ds_config, device):
    """Return (model, keepalive). `keepalive` holds the HfDeepSpeedConfig that makes transformers build the model
    inside `zero.Init` under ZeRO-3 (partitioned as it loads); it must live as long as the model."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    keepalive = HfDeepSpeedConfig(ds_config) if config["zero_stage"] == 3 else None
    kwargs = dict(dtype=torch_dtype(precision), attn_implementation=config["attn_implementation"],
                  trust_remote_code=config["trust_remote_code"])
    path = resolve_model_path(config["model"])
    if config["mode"] == "qlora":
        kwargs["quantization_config"] = quantization_config(config, precision)
        if config["zero_stage"] == 2:
            kwargs["device_map"] = {"": device}
        if is_random(config["model"]):
            materialize_random_weights(path, torch_dtype(precision))
    if is_random(config["model"]) and config["mode"] != "qlora":
        model = random_model(path, kwargs, device, config["zero_stage"])
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    if config["mode"] == "qlora":
        disable_cpu_weight_repacking(model)
    apply_liger_kernels(model, config, device)
    checkpointing = {"use_reentrant": False}
    if config["mode"] == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config["gradient_checkpointing"],
                                                gradient_checkpointing_kwargs=checkpointing)
    elif config["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if config["mode"] in ("lora", "qlora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(config))
    return model, keepalive


def liger_kernels_wanted(config, device, model_type, announce=False):
    """Whether to apply Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy): `auto` uses them
    on a CUDA GPU when liger-kernel is installed and knows the architecture; `true` insists."""
    import importlib.util

    setting = config["liger_kernel"]
    if setting is False:
        return False
    problem = None
    if device.type != "cuda":
        problem = "Liger's kernels are Triton kernels and need a CUDA GPU"
    elif importlib.util.find_spec("liger_kernel") is None:
        problem = "liger-kernel is not installed (pip install -e '.[gpu]')"
    else:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            problem = f"liger-kernel has no kernels for model type '{model_type}'"
    if problem and setting is True:
        raise ValueError(f"liger_kernel: true but {problem}; set liger_kernel: auto (use them where they work) "
                         f"or false")
    if problem and announce:
        from train.console import say

        say(f"liger kernels: off ({problem}; liger_kernel: false silences this)")
    return problem is None


def apply_liger_kernels(model, config, device):
    if not liger_kernels_wanted(config, device, model.config.model_type, announce=True):
        return False
    import logging

    # Liger probes optional backends (CuTe DSL, Ascend) and warns on every rank when they are absent; the Triton
    # kernels we use are unaffected.
    logging.getLogger("liger_kernel.backends.registry").setLevel(logging.ERROR)
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    from train.console import say

    # The fused linear cross-entropy reads lm_head.weight directly, outside the module's forward, so under ZeRO-3
    # it would see an empty partition: there only the norm, MLP and RoPE kernels are used.
    fused_ce = config["zero_stage"] != 3
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=fused_ce)
    extra = ", fused linear cross-entropy" if fused_ce else "; no fused cross-entropy under ZeRO-3"
    say(f"liger kernels: on (RMSNorm, SwiGLU, RoPE{extra})")
    return True


def largest_adapter_tensor(config, model_cfg):
    """Elements of the largest LoRA matrix (rank x the widest projection side); 0 for a full fine-tune."""
    if config["mode"] == "full":
        return 0
    text_cfg = getattr(model_cfg, "text_config", None) or model_cfg
    widths = [getattr(text_cfg, name, 0) or 0 for name in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    return config["lora_r"] * max(widths)


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
