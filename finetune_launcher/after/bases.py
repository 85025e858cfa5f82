"""The models the tools after training load: the Auto class and the tokenizer or processor of the run's recipe (its
after part: finetune_launcher/after/parts.py), as stored or -- for QLoRA adapters -- the de-quantized base they were
trained against. `recipe` is a recipe's name throughout."""
from pathlib import Path

from finetune_launcher.after.parts import after_part
from finetune_launcher.after.run_files import AdapterError, read_training_info
from finetune_launcher.dtypes import torch_dtype

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


# ---------------------------------------------------------------- the model's class

def auto_model_class(recipe):
    return after_part(recipe).auto_model_class()


def meta_model(path, recipe, trust_remote_code=False):
    """An empty (meta-device) instance of the model at `path`: its module names and shapes, no weights read."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return auto_model_class(recipe).from_config(config, trust_remote_code=trust_remote_code)


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


def load_preprocessor(recipe, path, trust_remote_code=False):
    """The tokenizer or processor of the recipe's models saved at `path`."""
    return after_part(recipe).load_preprocessor(path, trust_remote_code)


def text_tokenizer(preprocessor):
    return getattr(preprocessor, "tokenizer", preprocessor)


# ---------------------------------------------------------------- weights

def load_model(path, dtype, device, recipe, trust_remote_code=False):
    model = auto_model_class(recipe).from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
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


def load_dequantized_base(path, dtype, device, recipe, trust_remote_code=False):
    """The base as a QLoRA run trained against it: loaded on the CPU with the trainer's BitsAndBytesConfig in
    `dtype` ('auto': the checkpoint's own), then de-quantized by transformers to plain Linear layers, so every
    quantized weight is dequantize(quantize_nf4(W)) in that dtype; what training did not quantize (a VL model's
    vision tower) stays as stored."""
    from transformers.utils import logging as hf_logging

    require_bitsandbytes()
    dtype = checkpoint_dtype(path, trust_remote_code) if dtype == "auto" else dtype
    part = after_part(recipe)
    model = part.auto_model_class().from_pretrained(
        str(path), dtype=dtype, quantization_config=part.training_quantization(path, dtype, trust_remote_code),
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


def load_base_for(adapter_dirs, path, dtype, device, recipe, trust_remote_code=False, qlora_base="dequantized"):
    """The base the adapters are applied to: de-quantized for QLoRA adapters (see uses_dequantized_base), else as
    stored."""
    if uses_dequantized_base(adapter_dirs, qlora_base):
        return load_dequantized_base(path, dtype, device, recipe, trust_remote_code)
    return load_model(path, dtype, device, recipe, trust_remote_code)


def is_qlora(adapter_dir):
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
