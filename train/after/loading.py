"""Loading what a run produced, for the tools after training: a LoRA/QLoRA adapter (best/, final/) on its base, or a
full / merged / base model. The base is read from the adapter's training_info.json (the run's `model`, e.g.
`builtin:tiny-llama`) or adapter_config.json, and an adapter that does not fit the given base is refused with a
message naming the base it was trained on, before any weight is loaded. A QLoRA adapter goes on the weights it was
trained against: the base quantized to NF4 as the trainer loads it, then de-quantized (`--qlora-base original` uses
the stored full-precision weights instead)."""
import json
from dataclasses import dataclass, field
from pathlib import Path

from train.dtypes import precision_of, torch_dtype
from train.models.tiny import resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_INFO = "training_info.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
QLORA_BASES = ("dequantized", "original")  # what a QLoRA adapter is applied to: dequantize(quantize_nf4(W)), or W
MAX_LISTED_MISMATCHES = 3


class AdapterError(ValueError):
    """A problem with a model or adapter the user named; the message says which path and what to pass instead."""


@dataclass
class LoadedModel:
    """A model ready for evaluation or generation. `name` labels it in tables; `info` is its training_info.json
    (empty for a plain base model), which carries the dataset format and max_length the run trained with."""
    name: str
    model: object
    tokenizer: object
    info: dict = field(default_factory=dict)
    source: str = ""


# ---------------------------------------------------------------- reading what a run wrote

def read_json_file(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); the file is damaged, "
                           f"re-save the weights or pass the base with --base") from None


def read_training_info(directory):
    path = Path(directory) / TRAINING_INFO
    return read_json_file(path) if path.is_file() else {}


def is_adapter_dir(path):
    return (Path(path) / ADAPTER_CONFIG).is_file()


def check_adapter_dir(adapter_dir):
    """Raise AdapterError unless `adapter_dir` holds a peft adapter (config and weights)."""
    path = Path(adapter_dir)
    if not path.exists():
        raise AdapterError(f"adapter directory not found: {path}. Pass the best/ or final/ directory of a LoRA or "
                           f"QLoRA run, e.g. outputs/tiny_lora/best")
    if not path.is_dir():
        raise AdapterError(f"{path} is a file; --adapter takes the directory that holds {ADAPTER_CONFIG}")
    if not is_adapter_dir(path):
        if (path / "config.json").is_file():
            raise AdapterError(f"{path} holds a full model (config.json), not an adapter; pass it with --model")
        raise AdapterError(f"{path} has no {ADAPTER_CONFIG}; pass the best/ or final/ directory of a LoRA or "
                           f"QLoRA run")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHTS):
        raise AdapterError(f"{path} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)}); "
                           f"the save was interrupted, use the other of best/ and final/")
    return path


def recorded_base(adapter_dir):
    """The base the adapter was trained on: the run's `model` from training_info.json (keeps `builtin:` names),
    else peft's base_model_name_or_path."""
    info = read_training_info(adapter_dir)
    config = read_json_file(Path(adapter_dir) / ADAPTER_CONFIG)
    base = info.get("base_model") or config.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter_dir}: neither {TRAINING_INFO} nor {ADAPTER_CONFIG} names the base model; "
                           f"pass it with --base")
    return base


def resolve_base(adapter_dir, base=None):
    """(reference as given or recorded, local path or hub id to load)."""
    reference = base or recorded_base(adapter_dir)
    path = resolve_model_path(reference)
    if _looks_like_local_path(path) and not Path(path).exists():
        origin = "given with --base" if base else f"recorded in {adapter_dir}"
        raise AdapterError(f"base model '{reference}' ({origin}) does not exist at {path}; pass the base the "
                           f"adapter was trained on with --base")
    return reference, path


def _looks_like_local_path(ref):
    text = str(ref)
    return text.startswith(("/", "./", "../", "~")) or Path(text).exists()


def same_base(first, second):
    try:
        return Path(resolve_model_path(first)).resolve() == Path(resolve_model_path(second)).resolve()
    except (OSError, ValueError):
        return first == second


# ---------------------------------------------------------------- does the adapter fit the base?

def adapter_layer_shapes(adapter_dir):
    """{module name in the base: (in_features, out_features)} from the adapter's lora_A/lora_B weights."""
    shapes = {}
    for key, shape in _adapter_tensor_shapes(adapter_dir).items():
        for part, axis in ((".lora_A.", 1), (".lora_B.", 0)):
            if part in key and len(shape) == 2:
                module = key.split(part)[0].removeprefix("base_model.model.")
                entry = shapes.setdefault(module, [None, None])
                entry[0 if part == ".lora_A." else 1] = shape[axis]
    return {name: tuple(dims) for name, dims in shapes.items()}


def _adapter_tensor_shapes(adapter_dir):
    path = Path(adapter_dir)
    safetensors_file = path / ADAPTER_WEIGHTS[0]
    if safetensors_file.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_file), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    import torch

    state = torch.load(path / ADAPTER_WEIGHTS[1], map_location="meta", weights_only=True)
    return {key: tuple(value.shape) for key, value in state.items()}


def base_layer_shapes(base_path, module_names, trust_remote_code=False):
    """{module name: (in_features, out_features) or None if absent} for an un-materialised (meta) base model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    shapes = {}
    for name in module_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            shapes[name] = None
            continue
        weight = getattr(module, "weight", None)
        shapes[name] = (weight.shape[1], weight.shape[0]) if weight is not None and weight.dim() == 2 else None
    return shapes


def check_adapter_fits_base(adapter_dir, base_reference, base_path, trust_remote_code=False):
    """Raise AdapterError, naming the adapter's own base, when a LoRA layer's shape differs from the base's."""
    expected = adapter_layer_shapes(adapter_dir)
    actual = base_layer_shapes(base_path, expected, trust_remote_code)
    problems = [_describe_mismatch(name, want, actual[name]) for name, want in sorted(expected.items())
                if actual[name] != want]
    if not problems:
        return
    trained_on = recorded_base(adapter_dir)
    listed = "; ".join(problems[:MAX_LISTED_MISMATCHES])
    more = f" (and {len(problems) - MAX_LISTED_MISMATCHES} more)" if len(problems) > MAX_LISTED_MISMATCHES else ""
    raise AdapterError(
        f"adapter {adapter_dir} was trained on base '{trained_on}' and does not fit base '{base_reference}': "
        f"{listed}{more}. Drop --base to use '{trained_on}', or pass the base the adapter was trained on")


def _describe_mismatch(name, want, got):
    if got is None:
        return f"layer {name} does not exist in the base"
    return f"layer {name} is {got[0]}->{got[1]} in the base, the adapter expects {want[0]}->{want[1]}"


# ---------------------------------------------------------------- loading

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


def load_tokenizer_from(path, trust_remote_code=False):
    """The tokenizer saved next to the weights (the one training used), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def has_tokenizer(directory):
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer.model",
                                                                "tokenizer_config.json"))


def load_causal_lm(path, dtype, device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    return model.to(device).eval()


def checkpoint_dtype(path, trust_remote_code=False):
    """The dtype a checkpoint is stored in (config.json's dtype); float32 when it names none."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise AdapterError("a QLoRA adapter is applied to the de-quantized base (the 4-bit NF4 weights it was "
                           "trained against), which needs bitsandbytes: pip install bitsandbytes. Or pass "
                           "--qlora-base original to use the full-precision base instead (results then differ "
                           "slightly from the model as trained)") from None


def load_dequantized_base(path, dtype, device, trust_remote_code=False):
    """The base as a QLoRA run trained against it: loaded on the CPU with the trainer's BitsAndBytesConfig
    (train/model.py: NF4, double quant) in `dtype` ('auto': the checkpoint's own), then de-quantized by transformers
    to plain Linear layers, so every weight is dequantize(quantize_nf4(W)) in that dtype."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from train.models.causal_lm import quantization_config

    require_bitsandbytes()
    dtype = checkpoint_dtype(path, trust_remote_code) if dtype == "auto" else dtype
    bnb_config = quantization_config(precision_of(dtype), "uint8")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, quantization_config=bnb_config,
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


def load_base_for(adapter_dirs, path, dtype, device, trust_remote_code=False, qlora_base="dequantized"):
    """The base the adapters are applied to: de-quantized for QLoRA adapters (see uses_dequantized_base), else as
    stored."""
    if uses_dequantized_base(adapter_dirs, qlora_base):
        return load_dequantized_base(path, dtype, device, trust_remote_code)
    return load_causal_lm(path, dtype, device, trust_remote_code)


def load_full_model(reference, dtype="auto", device=None, trust_remote_code=False, name=None):
    """A base, full or merged model (a `builtin:` name, hub id or directory) and its tokenizer."""
    if is_adapter_dir(reference):
        raise AdapterError(f"{reference} is a LoRA adapter, not a model; pass it with --adapter")
    path = resolve_model_path(str(reference))
    if _looks_like_local_path(path) and not (Path(path) / "config.json").is_file():
        raise AdapterError(f"model not found: {reference} (no config.json at {path}); pass a base model, a "
                           f"merged model directory (tools/merge_lora.py --out) or a hub id")
    device = device or pick_device()
    model = load_causal_lm(path, torch_dtype_for(dtype, device), device, trust_remote_code)
    tokenizer = load_tokenizer_from(path, trust_remote_code)
    info = read_training_info(path) if Path(path).is_dir() else {}
    return LoadedModel(name or str(reference), model, tokenizer, info, str(reference))


def prepare_adapters(adapter_dirs, base=None, trust_remote_code=False):
    """Check every adapter directory and that they share one base that fits them. Returns (base reference,
    base path). Cheap: nothing but configs is loaded."""
    adapter_dirs = [check_adapter_dir(d) for d in adapter_dirs]
    reference, path = resolve_base(adapter_dirs[0], base)
    for adapter_dir in adapter_dirs[1:]:
        other = recorded_base(adapter_dir)
        if base is None and not same_base(other, reference):
            raise AdapterError(f"adapters have different bases: {adapter_dirs[0]} was trained on '{reference}', "
                               f"{adapter_dir} on '{other}'; evaluate them in separate runs")
    for adapter_dir in adapter_dirs:
        check_adapter_fits_base(adapter_dir, reference, path, trust_remote_code)
        warn_if_another_base(adapter_dir, base)
    return reference, path


def warn_if_another_base(adapter_dir, base):
    """--base that is not the adapter's recorded base, with the same layer shapes (else check_adapter_fits_base has
    refused it): used as asked, but said, since the results then are not the trained model's."""
    if base is None:
        return
    try:
        trained_on = recorded_base(adapter_dir)
    except AdapterError:
        return  # nothing recorded: --base is the only source
    if not same_base(trained_on, base):
        from train.console import warn

        warn(f"adapter {adapter_dir} was trained on base '{trained_on}'; using --base '{base}' as asked (its layer "
             f"shapes fit, but the results are not those of the trained model)")


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


def load_adapters(adapter_dirs, base=None, dtype="auto", device=None, trust_remote_code=False,
                  qlora_base="dequantized"):
    """Load the base once and every adapter onto it. Returns (peft model, tokenizer, base reference,
    {label: peft adapter name}); switch with model.set_adapter(name), or `with model.disable_adapter():` for the
    base. QLoRA adapters are applied to the de-quantized base (load_base_for), so the base row is that base too."""
    from peft import PeftModel

    reference, path = prepare_adapters(adapter_dirs, base, trust_remote_code)
    device = device or pick_device()
    # peft uses adapter names as module keys, so labels such as "run/best" cannot be used directly
    peft_names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    model = load_base_for(adapter_dirs, path, torch_dtype_for(dtype, device), device, trust_remote_code, qlora_base)
    model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=peft_names[0])
    for name, adapter_dir in zip(peft_names[1:], adapter_dirs[1:]):
        model.load_adapter(str(adapter_dir), adapter_name=name)
    model.to(device).eval()
    first = Path(adapter_dirs[0])
    tokenizer = load_tokenizer_from(first if has_tokenizer(first) else path, trust_remote_code)
    return model, tokenizer, reference, dict(zip(adapter_labels(adapter_dirs), peft_names))


def load_adapter(adapter_dir, base=None, dtype="auto", device=None, trust_remote_code=False,
                 qlora_base="dequantized"):
    """One adapter on its base (de-quantized for a QLoRA adapter, see load_base_for), as a LoadedModel."""
    model, tokenizer, reference, _ = load_adapters([adapter_dir], base, dtype, device, trust_remote_code,
                                                   qlora_base)
    return LoadedModel(Path(adapter_dir).name, model, tokenizer, read_training_info(adapter_dir), str(adapter_dir))


def adapter_labels(adapter_dirs):
    """Short unique labels: `best`, `final`; `run/best` when two runs' best/ are compared."""
    paths = [Path(d).resolve() for d in adapter_dirs]
    short = [p.name for p in paths]
    if len(set(short)) == len(short):
        return short
    long = [f"{p.parent.name}/{p.name}" for p in paths]
    return long if len(set(long)) == len(long) else [str(p) for p in paths]
