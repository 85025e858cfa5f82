"""The models the tools after training load, by kind: a causal LM (AutoModelForCausalLM + its tokenizer) or a
vision-language model (AutoModelForImageTextToText + its processor), as stored or -- for QLoRA adapters -- the
de-quantized base they were trained against."""
from pathlib import Path
from types import SimpleNamespace

from finetune_launcher.after.run_files import AdapterError
from finetune_launcher.dtypes import precision_of, torch_dtype

CAUSAL_LM, VISION_LANGUAGE = "causal_lm", "vision_language"
KIND_NAMES = {CAUSAL_LM: "causal-LM", VISION_LANGUAGE: "vision-language"}  # for messages
QLORA_BASES = ("dequantized", "original")  # what a QLoRA adapter is applied to: dequantize(quantize_nf4(W)), or W
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def pick_device(requested="auto"):
    import torch

    if requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_dtype_for(name, device):
    """'auto': float32 on the CPU (bf16 matmuls are slow there), the checkpoint's own dtype on a GPU."""
    import torch

    if name == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return torch_dtype(name)


# ---------------------------------------------------------------- which kind of model

def model_kind(path, trust_remote_code=False):
    """VISION_LANGUAGE when the model's config has a vision tower (`vision_config`), else CAUSAL_LM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return VISION_LANGUAGE if getattr(config, "vision_config", None) is not None else CAUSAL_LM


def auto_model_class(kind):
    import transformers

    return transformers.AutoModelForImageTextToText if kind == VISION_LANGUAGE else transformers.AutoModelForCausalLM


def meta_model(path, kind, trust_remote_code=False):
    """An empty (meta-device) instance of the model at `path`: its module names and shapes, no weights read."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return auto_model_class(kind).from_config(config, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- tokenizer / processor

def has_tokenizer(directory):
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer_from(path, trust_remote_code=False):
    """The tokenizer saved next to the weights (the one training used), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_vl_processor(path, trust_remote_code=False):
    """The processor saved next to the weights, loaded as training loads it (finetune_launcher.recipes.vision_language.model: without
    torchvision, the same class without its video processor), with the run's saved pixel bounds."""
    from finetune_launcher.recipes.vision_language.model import load_processor

    settings = SimpleNamespace(model=str(path), trust_remote_code=trust_remote_code, min_pixels=None,
                               max_pixels=None)
    return load_processor(settings)


def load_preprocessor(kind, path, trust_remote_code=False):
    """The tokenizer (causal LM) or processor (vision-language) saved at `path`."""
    if kind == VISION_LANGUAGE:
        return load_vl_processor(path, trust_remote_code)
    return load_tokenizer_from(path, trust_remote_code)


def text_tokenizer(preprocessor):
    return getattr(preprocessor, "tokenizer", preprocessor)


# ---------------------------------------------------------------- weights

def load_model(path, dtype, device, trust_remote_code=False, kind=CAUSAL_LM):
    model = auto_model_class(kind).from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def checkpoint_dtype(path, trust_remote_code=False):
    """The dtype a checkpoint is stored in (config.json's dtype, for a VL model its text model's); float32 when it
    names none."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401 -- only whether it is installed
    except ImportError:
        raise AdapterError("a QLoRA adapter is applied to the de-quantized base (the 4-bit NF4 weights it was "
                           "trained against), which needs bitsandbytes: pip install bitsandbytes. Or pass "
                           "--qlora-base original to use the full-precision base instead (results then differ "
                           "slightly from the model as trained)") from None


def training_quantization(path, dtype, kind, trust_remote_code=False):
    """The BitsAndBytesConfig the trainer loads the base with (NF4, double quant, uint8 storage): for a
    vision-language model the language model's linear layers only, the vision tower and lm_head skipped."""
    if kind == VISION_LANGUAGE:
        from finetune_launcher.recipes.vision_language.model import meta_layout, quantization_config

        settings = SimpleNamespace(precision=precision_of(dtype), bnb_4bit_quant_storage="uint8")
        return quantization_config(settings, meta_layout(str(path), trust_remote_code))
    from finetune_launcher.models.prepare import nf4_config

    return nf4_config(precision_of(dtype), "uint8")


def load_dequantized_base(path, dtype, device, trust_remote_code=False, kind=CAUSAL_LM):
    """The base as a QLoRA run trained against it: loaded on the CPU with the trainer's BitsAndBytesConfig in
    `dtype` ('auto': the checkpoint's own), then de-quantized by transformers to plain Linear layers, so every
    quantized weight is dequantize(quantize_nf4(W)) in that dtype. A VL model's vision tower was never quantized and
    stays as stored."""
    from transformers.utils import logging as hf_logging

    require_bitsandbytes()
    dtype = checkpoint_dtype(path, trust_remote_code) if dtype == "auto" else dtype
    model = auto_model_class(kind).from_pretrained(
        str(path), dtype=dtype, quantization_config=training_quantization(path, dtype, kind, trust_remote_code),
        device_map={"": "cpu"}, trust_remote_code=trust_remote_code)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "the modules are dequantized in ...": we asked for that dtype
    try:
        model = model.dequantize(dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.to(device).eval()


def uses_dequantized_base(adapter_dirs, qlora_base="dequantized"):
    """Whether the adapters go on the de-quantized base: they are QLoRA adapters and qlora_base asks for it. LoRA
    and QLoRA adapters need different bases, so they cannot share one load."""
    if qlora_base not in QLORA_BASES:
        raise AdapterError(f"unknown QLoRA base '{qlora_base}'; use one of {', '.join(QLORA_BASES)}")
    qlora = [is_qlora(d) for d in adapter_dirs]
    if qlora_base == "dequantized" and any(qlora) and not all(qlora):
        names = lambda want: ", ".join(str(d) for d, q in zip(adapter_dirs, qlora) if q == want)  # noqa: E731
        raise AdapterError(f"QLoRA adapter(s) {names(True)} go on the de-quantized base, LoRA adapter(s) "
                           f"{names(False)} on the full-precision one; evaluate them in separate runs, or pass "
                           f"--qlora-base original to put all of them on the full-precision base")
    return qlora_base == "dequantized" and all(qlora)


def load_base_for(adapter_dirs, path, dtype, device, trust_remote_code=False, qlora_base="dequantized",
                  kind=CAUSAL_LM):
    """The base the adapters are applied to: de-quantized for QLoRA adapters (see uses_dequantized_base), else as
    stored."""
    if uses_dequantized_base(adapter_dirs, qlora_base):
        return load_dequantized_base(path, dtype, device, trust_remote_code, kind)
    return load_model(path, dtype, device, trust_remote_code, kind)


def is_qlora(adapter_dir):
    from finetune_launcher.after.run_files import read_training_info

    return read_training_info(adapter_dir).get("mode") == "qlora"


def qlora_note(adapter_dirs, qlora_base="dequantized"):
    """A line telling which base QLoRA adapters run on here, or None when there is none."""
    qlora = [str(d) for d in adapter_dirs if is_qlora(d)]
    if not qlora:
        return None
    if qlora_base == "dequantized":
        return (f"note: QLoRA adapter(s) {', '.join(qlora)} run on the de-quantized base: the base quantized to NF4 "
                f"as in training, then de-quantized, i.e. the weights they were trained against (--qlora-base "
                f"original: the full-precision base)")
    return (f"note: QLoRA adapter(s) {', '.join(qlora)} run on the original full-precision base (--qlora-base "
            f"original), not on the 4-bit weights they were trained against, so losses and outputs differ "
            f"slightly from the model as trained")
