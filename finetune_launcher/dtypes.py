"""Precision names, torch dtypes and their spellings, in one place."""

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PRECISION_OF_DTYPE_NAME = {name: precision for precision, name in DTYPE_NAMES.items()}


def bytes_per_element(precision):
    return 4 if precision == "fp32" else 2


def torch_dtype(name):
    """A torch dtype from a precision (bf16), a dtype name (bfloat16, torch.bfloat16) or a dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    text = str(name).removeprefix("torch.")
    return getattr(torch, DTYPE_NAMES.get(text, text))


def dtype_name(dtype):
    """'float32' for torch.float32 (or 'float32')."""
    return str(dtype).removeprefix("torch.")


def precision_of(dtype):
    """'bf16' for torch.bfloat16 (or 'bfloat16')."""
    return PRECISION_OF_DTYPE_NAME[dtype_name(dtype)]
