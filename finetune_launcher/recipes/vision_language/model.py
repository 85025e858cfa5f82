"""Vision-language models (Qwen3-VL, Qwen2.5-VL: transformers' image-text-to-text classes, chosen from the model's
config by AutoModelForImageTextToText / AutoProcessor): processor and model loading for full, LoRA and QLoRA
fine-tunes, including the ZeRO-3 init context.

What trains: the language model. The vision tower and its merger (the projector into the language model; Qwen3-VL
also has DeepStack mergers) are frozen by default; `train_merger` trains the mergers fully (in LoRA modes they are
saved with the adapter through peft's modules_to_save), `lora_vision` also puts LoRA on the vision tower's linear
layers. LoRA targets are resolved to exact module paths, so names like q_proj or gate_proj (which Qwen2.5-VL's
vision tower also has) match the language model only. QLoRA quantizes the language model's linear layers only: the
vision tower, the mergers and lm_head stay in the compute dtype.
"""
import json
import re
import shutil
from pathlib import Path

import torch

from finetune_launcher.errors import ConfigError
from finetune_launcher.models.prepare import load_base_model, lora_config, nf4_config
from finetune_launcher.models.compiled_layers import compile_decoder_layers
from finetune_launcher.models.references import resolve_model_path

PROJECTOR_WORDS = ("merger", "projector")
VIDEO_CONFIG = "video_preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"


# ---------------------------------------------------------------- processor

def load_processor(cfg):
    """AutoProcessor for cfg.model with cfg.max_pixels / cfg.min_pixels (None: the model's own) applied. Without
    torchvision (this CPU stack), transformers cannot build the Qwen-VL processors at all, because their video
    processor needs it; then the same processor class is built without its video processor (images only)."""
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    path = resolve_model_path(cfg.model)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except ImportError:
        if is_torchvision_available():
            raise
        processor = image_only_processor(path, cfg.trust_remote_code)
    if not hasattr(processor, "image_processor"):
        raise ConfigError(f"model: {cfg.model} has no image processor (AutoProcessor gave "
                          f"{type(processor).__name__}); a vision-language run needs an image-text-to-text model")
    set_pixel_bounds(processor, cfg.min_pixels, cfg.max_pixels)
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def image_only_processor(path, trust_remote_code):
    """The model's processor class (from processor_config.json or the model type) without a video processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING, processor_class_from_name

    from finetune_launcher.recipes.vision_language.processing_image_only import without_video

    recorded = Path(path) / PROCESSOR_CONFIG
    if recorded.exists():
        base = processor_class_from_name(json.loads(recorded.read_text())["processor_class"])
    else:
        base = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))]

    class ImageOnlyProcessor(without_video(base)):
        def save_pretrained(self, save_directory, **kwargs):
            """Also copy the model's video processor config, so the saved processor is complete."""
            saved = super().save_pretrained(save_directory, **kwargs)
            video = Path(path) / VIDEO_CONFIG
            if video.exists() and not (Path(save_directory) / VIDEO_CONFIG).exists():
                shutil.copy(video, Path(save_directory) / VIDEO_CONFIG)
            return saved

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = base.__name__  # as without_video says
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return ImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)


class SavedProcessor:
    """What best/ and final/ hold beside the weights: the processor, with the entry that lets AutoProcessor build it
    where torchvision is missing (processing_image_only.py says how)."""

    def __init__(self, processor):
        self.processor = processor

    def save_pretrained(self, directory):
        self.processor.save_pretrained(directory)
        add_image_only_entry(directory)


def add_image_only_entry(directory):
    """processing_image_only.py beside the saved processor, named in its auto_map; a processor of the model's own
    code (one with an auto_map already) is left as it is."""
    from finetune_launcher.recipes.vision_language import processing_image_only

    config_path = Path(directory) / PROCESSOR_CONFIG
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    if "auto_map" in config:
        return
    module = Path(processing_image_only.__file__)
    shutil.copy(module, Path(directory) / module.name)
    config["auto_map"] = {"AutoProcessor": f"{module.stem}.{processing_image_only.ImageOnlyProcessor.__name__}"}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def set_pixel_bounds(processor, min_pixels, max_pixels):
    """Bound each image's resized area (pixels), hence its image tokens: area / (patch x merge)^2."""
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    size = {"shortest_edge": image_processor.size["shortest_edge"],
            "longest_edge": image_processor.size["longest_edge"]}
    for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)):
        if value is None:
            continue
        if not isinstance(value, int) or value < factor * factor:
            name = "min_pixels" if key == "shortest_edge" else "max_pixels"
            raise ConfigError(f"{name}: {value!r} must be an integer of at least {factor * factor} "
                              f"({factor}x{factor}, one image token for this model)")
        size[key] = value
    if size["shortest_edge"] > size["longest_edge"]:
        raise ConfigError(f"min_pixels {size['shortest_edge']} is larger than max_pixels {size['longest_edge']}")
    image_processor.size = size


# ---------------------------------------------------------------- which modules are which

def module_layout(model):
    """Names in `model` (a transformers VL model, not yet wrapped by peft): the language model (decoder), the
    vision side (everything else under the base model), the mergers/projectors within it, lm_head, and the
    linear layers of each part."""
    decoder = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    decoder_name = names[id(decoder)]
    base_name = decoder_name.rpartition(".")[0]
    base = model.get_submodule(base_name) if base_name else model
    vision = [f"{base_name}.{n}".lstrip(".") for n, m in base.named_children()
              if m is not decoder and next(m.parameters(), None) is not None]
    mergers = []  # outermost modules named like a merger / projector (a ModuleList's elements, not the list)
    for name, module in model.named_modules():
        if _under(name, vision) and not _under(name, mergers) and \
                any(w in name.rpartition(".")[2] for w in PROJECTOR_WORDS):
            is_list = isinstance(module, torch.nn.ModuleList)
            mergers += [f"{name}.{child}" for child, _ in module.named_children()] if is_list else [name]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return {
        "decoder": decoder_name, "vision": vision, "mergers": mergers,
        "lm_head": names[id(model.get_output_embeddings())],
        "decoder_linears": [n for n in linears if _under(n, [decoder_name])],
        "vision_linears": [n for n in linears if _under(n, vision) and not _under(n, mergers)],
    }


def _under(name, prefixes):
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def meta_layout(path, trust_remote_code):
    """module_layout of the model at `path`, from an empty (meta-device) instance: known before loading, as the
    QLoRA skip list needs."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    return module_layout(model)


def _escape_with_indices(name):
    """A module path as a regex in which every layer index matches any index (one alternative per kind)."""
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def lora_target_pattern(layout, target_modules, lora_vision, model_ref):
    """peft target_modules (a regex, full match) for the language model's linear layers named in target_modules
    ("all-linear" or leaf names such as q_proj), plus the vision tower's when lora_vision."""
    def pick(linears, part):
        if target_modules == "all-linear":
            return linears
        wanted = set(target_modules)
        chosen = [n for n in linears if n.rpartition(".")[2] in wanted]
        if not chosen:
            available = sorted({n.rpartition(".")[2] for n in linears})
            raise ConfigError(f"lora_target_modules: none of {sorted(wanted)} is a linear layer of the {part} of "
                              f"{model_ref}; its linear layers are named {', '.join(available)}"
                              + (" (or set lora_vision: false)" if part == "vision tower" else ""))
        return chosen

    chosen = pick(layout["decoder_linears"], "language model")
    if lora_vision:
        chosen += pick(layout["vision_linears"], "vision tower")
    return f"^(?:{'|'.join(sorted({_escape_with_indices(n) for n in chosen}))})$"


def vl_lora_config(cfg, layout):
    return lora_config(cfg, lora_target_pattern(layout, cfg.lora_target_modules, cfg.lora_vision, cfg.model),
                       task_type="CAUSAL_LM", modules_to_save=list(layout["mergers"]) if cfg.train_merger else None)


def quantization_config(cfg, layout):
    """NF4 for the language model's linear layers only: the vision tower, its mergers and lm_head stay 16-bit."""
    return nf4_config(cfg.precision, cfg.bnb_4bit_quant_storage, skip_modules=[*layout["vision"], layout["lm_head"]])


# ---------------------------------------------------------------- loading

def load_vl_model(cfg, device):
    """Return (model, keepalive); see models.prepare.load_base_model for `keepalive`."""
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(cfg.model)
    layout = meta_layout(path, cfg.trust_remote_code)  # before the ZeRO-3 context exists: no zero.Init for this one
    quantization = quantization_config(cfg, layout) if cfg.mode == "qlora" else None
    model, keepalive = load_base_model(cfg, path, AutoModelForImageTextToText, device, quantization)
    model.config.use_cache = model.config.get_text_config().use_cache = False
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-grad hook, so frozen embeddings stay as they are.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    decoder = model.get_decoder()  # the same module once peft has wrapped the model
    if cfg.mode == "full":
        freeze_vision(model, layout, cfg.train_merger)
    else:
        from peft import get_peft_model

        # No prepare_model_for_kbit_training: it would cast the vision tower (and all else not 4-bit) to fp32.
        model = get_peft_model(model, vl_lora_config(cfg, layout))
    if cfg.compile_layers:  # the language model's layers; the vision blocks see varying image sizes
        compile_decoder_layers(decoder, hooks_outside=cfg.zero_stage == 3)
    return model, keepalive


def freeze_vision(model, layout, train_merger):
    """Full fine-tune: the language model trains; the vision tower is frozen, its mergers too unless train_merger."""
    for name, param in model.named_parameters():
        param.requires_grad = not _under(name, layout["vision"]) or (train_merger and _under(name, layout["mergers"]))
