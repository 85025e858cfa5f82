"""Loading what a run produced, for the tools after training: a LoRA/QLoRA adapter (best/, final/) on its base, or a
full / merged / base model. The base is read from the adapter's training_info.json (the run's `model`, e.g.
`builtin:tiny-llama`) or adapter_config.json, and an adapter that does not fit the given base is refused with a
message naming the base it was trained on, before any weight is loaded. A QLoRA adapter goes on the weights it was
trained against: the base quantized to NF4 as the trainer loads it, then de-quantized (`--qlora-base original` uses
the stored full-precision weights instead).

Every language-model recipe is handled alike, each through its after part (finetune_launcher/after/parts.py: the
Auto class, the tokenizer or processor). The recipe is the run's, from training_info.json, else the one the recipe
table detects from the base's config. Runs of other recipes are refused with the command that reads them."""
from dataclasses import dataclass, field
from pathlib import Path

from finetune_launcher import recipe_table
from finetune_launcher.after.bases import (has_tokenizer, load_base_for, load_model, load_preprocessor, meta_model,
                                           pick_device, text_tokenizer, torch_dtype_for)
from finetune_launcher.after.parts import after_part, language_model_part, model_recipe, recorded_recipe
from finetune_launcher.after.run_files import TRAINING_INFO, AdapterError, read_json_file, read_training_info
from finetune_launcher.models.references import resolve_model_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MAX_LISTED_MISMATCHES = 3


@dataclass
class LoadedModel:
    """A model ready for evaluation or generation. `name` labels it in tables; `info` is its training_info.json
    (empty for a plain base model), which carries the dataset format and max_length the run trained with. `recipe`
    names the recipe whose after part serves it; a model with a processor (vision-language) also has its
    `processor` (`tokenizer` is the processor's tokenizer)."""
    name: str
    model: object
    tokenizer: object
    info: dict = field(default_factory=dict)
    source: str = ""
    recipe: str = recipe_table.DEFAULT
    processor: object = None


# ---------------------------------------------------------------- reading what a run wrote

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
        recipe = recorded_recipe(path)
        if recipe in recipe_table.names():
            language_model_part(recipe, path)  # another recipe's weights: the command that reads them
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


def base_layer_shapes(base_path, module_names, recipe, trust_remote_code=False):
    """{module name: (in_features, out_features) or None if absent} for an un-materialised (meta) base model."""
    model = meta_model(base_path, recipe, trust_remote_code)
    shapes = {}
    for name in module_names:
        try:
            module = model.get_submodule(name.replace(".base_layer", ""))  # peft nests LoRA on parameters
        except AttributeError:
            shapes[name] = None
            continue
        weight = getattr(module, "weight", None)
        shapes[name] = (weight.shape[1], weight.shape[0]) if weight is not None and weight.dim() == 2 else \
            expert_shapes(module)
    return shapes


def expert_shapes(module):
    """{(in_features, out_features)} of the experts' fused 3D weights [experts, out, in] an adapter may hold LoRA
    on (peft target_parameters), or None when the module has none."""
    return {(p.shape[2], p.shape[1]) for p in module.parameters(recurse=False) if p.dim() == 3} or None


def layer_fits(want, got):
    return want in got if isinstance(got, set) else want == got


def check_adapter_fits_base(adapter_dir, base_reference, base_path, recipe, trust_remote_code=False):
    """Raise AdapterError, naming the adapter's own base, when a LoRA layer's shape differs from the base's."""
    expected = adapter_layer_shapes(adapter_dir)
    actual = base_layer_shapes(base_path, expected, recipe, trust_remote_code)
    problems = [_describe_mismatch(name, want, actual[name]) for name, want in sorted(expected.items())
                if not layer_fits(want, actual[name])]
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
    if isinstance(got, set):
        return (f"experts {name} hold {' and '.join(f'{i}->{o}' for i, o in sorted(got))} weights in the base, the "
                f"adapter expects {want[0]}->{want[1]}")
    return f"layer {name} is {got[0]}->{got[1]} in the base, the adapter expects {want[0]}->{want[1]}"


# ---------------------------------------------------------------- which recipe

def adapter_recipe(adapter_dir, base_path, trust_remote_code=False):
    """The recipe of the adapter's run (training_info.json), else the one the table detects from the base; a
    language-model recipe (language_model_part refuses others)."""
    recipe = read_training_info(adapter_dir).get("recipe")
    if recipe not in recipe_table.names():
        recipe = model_recipe(base_path, trust_remote_code)
    language_model_part(recipe, adapter_dir)
    return recipe


def full_model_recipe(reference, path, trust_remote_code=False):
    """The recipe of a base, full or merged model (detected from its config); a language-model recipe."""
    recipe = model_recipe(path, trust_remote_code)
    language_model_part(recipe, reference)
    return recipe


def same_recipe(sources, recipes):
    """The one recipe of all adapters / models; AdapterError when they are of different kinds."""
    if len(set(recipes)) > 1:
        listed = ", ".join(f"{d} ({after_part(r).LABEL})" for d, r in zip(sources, recipes))
        raise AdapterError(f"models of different kinds: {listed}; evaluate them in separate runs")
    return recipes[0]


# ---------------------------------------------------------------- loading

@dataclass
class LoadedAdapters:
    """The base with every adapter loaded (peft names in `names`, by label): switch with model.set_adapter(name),
    or `with model.disable_adapter():` for the base. `processor` is None where the recipe's models have none."""
    model: object
    tokenizer: object
    processor: object
    recipe: str
    reference: str
    names: dict


def load_full_model(reference, dtype="auto", device=None, trust_remote_code=False, name=None):
    """A base, full or merged model (a `builtin:` name, hub id or directory) and its tokenizer (and processor, for a
    vision-language model)."""
    if is_adapter_dir(reference):
        raise AdapterError(f"{reference} is a LoRA adapter, not a model; pass it with --adapter")
    path = resolve_model_path(str(reference))
    if _looks_like_local_path(path) and not (Path(path) / "config.json").is_file():
        raise AdapterError(f"model not found: {reference} (no config.json at {path}); pass a base model, a "
                           f"merged model directory (ftl merge --out) or a hub id")
    device = device or pick_device()
    recipe = full_model_recipe(reference, path, trust_remote_code)
    model = load_model(path, torch_dtype_for(dtype, device), device, recipe, trust_remote_code)
    preprocessor = load_preprocessor(recipe, path, trust_remote_code)
    info = read_training_info(path) if Path(path).is_dir() else {}
    return LoadedModel(name or str(reference), model, text_tokenizer(preprocessor), info, str(reference), recipe,
                       processor_of(preprocessor))


def processor_of(preprocessor):
    """The processor, when the model has one (it holds the tokenizer); None for a plain tokenizer."""
    return preprocessor if text_tokenizer(preprocessor) is not preprocessor else None


def prepare_adapters(adapter_dirs, base=None, trust_remote_code=False):
    """Check every adapter directory and that they share one base, of one recipe, that fits them. Returns (base
    reference, base path, recipe). Cheap: nothing but configs is loaded."""
    adapter_dirs = [check_adapter_dir(d) for d in adapter_dirs]
    reference, path = resolve_base(adapter_dirs[0], base)
    for adapter_dir in adapter_dirs[1:]:
        other = recorded_base(adapter_dir)
        if base is None and not same_base(other, reference):
            raise AdapterError(f"adapters have different bases: {adapter_dirs[0]} was trained on '{reference}', "
                               f"{adapter_dir} on '{other}'; evaluate them in separate runs")
    recipe = same_recipe(adapter_dirs, [adapter_recipe(d, path, trust_remote_code) for d in adapter_dirs])
    for adapter_dir in adapter_dirs:
        check_adapter_fits_base(adapter_dir, reference, path, recipe, trust_remote_code)
        warn_if_another_base(adapter_dir, base)
    return reference, path, recipe


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
        from finetune_launcher.console import warn

        warn(f"adapter {adapter_dir} was trained on base '{trained_on}'; using --base '{base}' as asked (its layer "
             f"shapes fit, but the results are not those of the trained model)")


def load_adapters(adapter_dirs, base=None, dtype="auto", device=None, trust_remote_code=False,
                  qlora_base="dequantized"):
    """Load the base once and every adapter onto it, as LoadedAdapters. QLoRA adapters are applied to the
    de-quantized base (load_base_for), so the base row is that base too. The tokenizer or processor is the one
    saved with the first adapter (the one training used), else the base's."""
    from peft import PeftModel

    reference, path, recipe = prepare_adapters(adapter_dirs, base, trust_remote_code)
    device = device or pick_device()
    # peft uses adapter names as module keys, so labels such as "run/best" cannot be used directly
    peft_names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    model = load_base_for(adapter_dirs, path, torch_dtype_for(dtype, device), device, recipe, trust_remote_code,
                          qlora_base)
    model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name=peft_names[0])
    for name, adapter_dir in zip(peft_names[1:], adapter_dirs[1:]):
        model.load_adapter(str(adapter_dir), adapter_name=name)
    model.to(device).eval()
    first = Path(adapter_dirs[0])
    preprocessor = load_preprocessor(recipe, first if has_tokenizer(first) else path, trust_remote_code)
    return LoadedAdapters(model, text_tokenizer(preprocessor), processor_of(preprocessor), recipe, reference,
                          dict(zip(adapter_labels(adapter_dirs), peft_names)))


def load_adapter(adapter_dir, base=None, dtype="auto", device=None, trust_remote_code=False,
                 qlora_base="dequantized"):
    """One adapter on its base (de-quantized for a QLoRA adapter, see load_base_for), as a LoadedModel."""
    loaded = load_adapters([adapter_dir], base, dtype, device, trust_remote_code, qlora_base)
    return LoadedModel(Path(adapter_dir).name, loaded.model, loaded.tokenizer, read_training_info(adapter_dir),
                       str(adapter_dir), loaded.recipe, loaded.processor)


def adapter_labels(adapter_dirs):
    """Short unique labels: `best`, `final`; `run/best` when two runs' best/ are compared."""
    paths = [Path(d).resolve() for d in adapter_dirs]
    short = [p.name for p in paths]
    if len(set(short)) == len(short):
        return short
    long = [f"{p.parent.name}/{p.name}" for p in paths]
    return long if len(set(long)) == len(long) else [str(p) for p in paths]
