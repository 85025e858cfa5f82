"""Images from a diffusion run after training (`ftl generate-images`, generate_images.py): the base pipeline named in
the run's training_info.json with the run's weights on it -- a LoRA through diffusers' own
`StableDiffusionPipeline.load_lora_weights`, or a full fine-tune's unet/ -- sampled for prompts and seeds; base and
tuned side by side; and the weights fused into a complete pipeline directory, checked against base + LoRA before it
appears.

Each image's starting noise comes from a CPU generator seeded by its seed (as the training samples do), so a seed
gives the same picture on any device, for the base and the tuned pipeline alike. A QLoRA run's LoRA goes on the UNet
it was trained against, as the language-model tools do: every linear weight quantized to NF4 as training quantizes it
(finetune_launcher.recipes.diffusion.model.quantize_unet_linears), then de-quantized (`qlora_base="original"`: the
stored UNet).

This module is also the recipe's after part for the shared tools (finetune_launcher/after/parts.py: AfterPart): they
refuse a diffusion run's weights with the command that reads them."""
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune_launcher import recipe_table
from finetune_launcher.after.parts import after_part, recorded_recipe
from finetune_launcher.after.run_files import TRAINING_INFO, AdapterError, read_training_info
from finetune_launcher.fsutil import apply_umask, atomic_write_json, fresh_tmp_dir, replace_dir
from finetune_launcher.models.references import resolve_model_path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # model.LORA_WEIGHTS, without importing torch
PIPELINE_INDEX = "model_index.json"
FUSE_TOLERANCE = 2 / 255  # fused vs base + LoRA: the largest pixel difference allowed (images in [0, 1])
CHECK_PROMPT, CHECK_SEED, CHECK_STEPS = "a red circle on a white background", 0, 4
QLORA_BASES = ("dequantized", "original")
NF4_BLOCK = 64  # bitsandbytes' Params4bit default, which training's Linear4bit layers use
RECIPE = "diffusion"
LABEL = "diffusion"
COMMANDS = ("generate-images",)
WEIGHT_FILES = (LORA_WEIGHTS, "unet/config.json")


def usage(directory):
    return (f"ftl generate-images --adapter {directory} (--prompt ... to draw, --fuse OUT_DIR to merge it into a "
            f"pipeline)")


@dataclass
class DiffusionWeights:
    """What a diffusion run saved: a LoRA (diffusers' format) or a full UNet, and the base pipeline it goes on."""
    directory: Path
    kind: str            # "lora" or "unet"
    base_reference: str  # as recorded (builtin:tiny-sd) or given with --base
    base_path: str       # a local pipeline directory or a hub id
    info: dict


# ---------------------------------------------------------------- what the run wrote

def check_diffusion_dir(directory):
    """Raise AdapterError unless `directory` holds a diffusion run's LoRA or full UNet; 'lora' or 'unet'."""
    path = Path(directory)
    if not path.exists():
        raise AdapterError(f"adapter directory not found: {path}. Pass the best/ or final/ directory of a diffusion "
                           f"run, e.g. outputs/tiny_sd_lora/best")
    if not path.is_dir():
        raise AdapterError(f"{path} is a file; --adapter takes the best/ or final/ directory of a diffusion run")
    recipe = recorded_recipe(path)
    if (path / "adapter_config.json").is_file() or recipe not in (None, RECIPE):
        other = after_part(recipe) if recipe in recipe_table.names() else None
        what, use = (other.LABEL, other.usage(path)) if other else ("language-model", "ftl generate or ftl evaluate")
        raise AdapterError(f"{path} holds a {what} run's adapter, not diffusion weights; use {use}")
    if (path / LORA_WEIGHTS).is_file():
        return "lora"
    if (path / "unet" / "config.json").is_file():
        return "unet"
    if (path / PIPELINE_INDEX).is_file():
        raise AdapterError(f"{path} is a complete pipeline (model_index.json), not a run's weights; generate from it "
                           f"with --base {path} and no --adapter")
    raise AdapterError(f"{path} holds neither {LORA_WEIGHTS} (a LoRA run) nor unet/ (a full fine-tune); pass the "
                       f"best/ or final/ directory of a diffusion run")


def looks_local(reference):
    text = str(reference)
    return text.startswith(("/", "./", "../", "~")) or Path(text).exists()


def check_pipeline(reference, origin):
    """The path of a base pipeline (a `builtin:` name, directory or hub id); AdapterError when a directory is not
    a diffusers pipeline."""
    path = resolve_model_path(str(reference))
    if looks_local(path) and not (Path(path) / PIPELINE_INDEX).is_file():
        what = "does not exist" if not Path(path).exists() else f"is not a diffusers pipeline (no {PIPELINE_INDEX})"
        raise AdapterError(f"base pipeline '{reference}' ({origin}) {what}; pass the pipeline the run trained on "
                           f"with --base (a directory with {PIPELINE_INDEX}, a hub id or builtin:tiny-sd)")
    return str(path)


def diffusion_weights(directory, base=None):
    """DiffusionWeights for a run's best/ or final/; the base is the run's (training_info.json) unless `base`."""
    kind = check_diffusion_dir(directory)
    info = read_training_info(directory)
    reference = base or info.get("base_model")
    if not reference:
        raise AdapterError(f"{directory}: {TRAINING_INFO} names no base pipeline; pass it with --base")
    origin = "given with --base" if base else f"recorded in {Path(directory) / TRAINING_INFO}"
    return DiffusionWeights(Path(directory), kind, str(reference), check_pipeline(reference, origin), info)


def default_resolution(info, pipeline):
    """The run's resolution, else the pipeline's own (UNet sample size x the VAE's scale factor)."""
    return int(info.get("resolution") or pipeline.unet.config.sample_size * pipeline.vae_scale_factor)


# ---------------------------------------------------------------- pipelines

def pipeline_dtype(name, device):
    """'auto': float32 on the CPU; on a GPU bfloat16 where supported, else float16."""
    import torch

    from finetune_launcher.dtypes import torch_dtype

    if name != "auto":
        return torch_dtype(name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pipeline(path, dtype, device):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def uses_dequantized_unet(weights, qlora_base):
    if qlora_base not in QLORA_BASES:
        raise AdapterError(f"unknown QLoRA base '{qlora_base}'; use one of {', '.join(QLORA_BASES)}")
    return weights is not None and weights.info.get("mode") == "qlora" and qlora_base == "dequantized"


def dequantize_unet(pipeline):
    """The UNet as a QLoRA run trained against it, in place: each nn.Linear weight becomes
    dequantize(quantize_nf4(W)) (double quant, blocks of 64, on the pipeline's device) in its own dtype."""
    import torch

    try:
        from bitsandbytes import functional as nf4
    except ImportError:
        raise AdapterError("a QLoRA run's LoRA goes on the de-quantized UNet it was trained against, which needs "
                           "bitsandbytes: pip install bitsandbytes. Or pass --qlora-base original to use the stored "
                           "UNet (pictures then differ slightly from the model as trained)") from None
    for module in pipeline.unet.modules():
        if type(module) is torch.nn.Linear:  # exactly the layers training quantized
            weight = module.weight.data
            packed, state = nf4.quantize_4bit(weight.contiguous(), blocksize=NF4_BLOCK, compress_statistics=True,
                                              quant_type="nf4")
            module.weight.data = nf4.dequantize_4bit(packed, state).to(weight.dtype)
    return pipeline


def apply_weights(pipeline, weights):
    """Put the run's weights on the (base) pipeline in place: the LoRA with diffusers' loader, or the full UNet."""
    if weights.kind == "lora":
        pipeline.load_lora_weights(str(weights.directory))
        return pipeline
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(weights.directory), subfolder="unet",
                                                torch_dtype=pipeline.unet.dtype)
    pipeline.unet = unet.to(pipeline.device)
    return pipeline


def generate(pipeline, prompt, seed, resolution, steps, guidance_scale):
    """One PIL image; the starting noise from a CPU generator seeded by `seed`."""
    import torch

    return pipeline(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                    guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(int(seed))).images[0]


def side_by_side(left, right):
    from PIL import Image

    pair = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    pair.paste(left, (0, 0))
    pair.paste(right, (left.width, 0))
    return pair


def image_name(index, prompt, seed, suffix=""):
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "prompt"
    return f"{index:02d}-{slug}-seed{seed}{suffix}.png"


# ---------------------------------------------------------------- fusing

def check_fuse_target(out_dir, protected, overwrite):
    """Never write over the inputs; replace only an earlier pipeline (or an empty directory), with overwrite."""
    out = Path(out_dir).resolve()
    for path in protected:
        path = Path(path).resolve()
        if path.exists() and (out == path or out in path.parents):
            raise AdapterError(f"--fuse {out_dir} would overwrite {path}; choose another directory")
    if not out.exists():
        return
    if not overwrite:
        raise AdapterError(f"{out_dir} already exists; pass --overwrite to replace it, or choose another directory")
    if any(out.iterdir()) and not (out / PIPELINE_INDEX).is_file():
        raise AdapterError(f"{out_dir} exists and is not a pipeline directory (no {PIPELINE_INDEX}); refusing to "
                           f"delete it even with --overwrite. Choose another directory")


def tuned_base(weights, dtype, device, qlora_base):
    """The base pipeline the run's weights go on: for a QLoRA run's LoRA the de-quantized UNet (see
    uses_dequantized_unet)."""
    pipeline = load_pipeline(weights.base_path, dtype, device)
    return dequantize_unet(pipeline) if uses_dequantized_unet(weights, qlora_base) else pipeline


def fuse_weights(weights, out_dir, overwrite=False, log=print, qlora_base="dequantized"):
    """Write a complete pipeline with the run's weights in it (the LoRA fused into the UNet, and the text encoder if it
    has one, by finetune_launcher.recipes.diffusion.model.fuse_lora_into_pipeline; a full fine-tune's UNet in place of
    the base's). It is reloaded with StableDiffusionPipeline.from_pretrained and must draw the picture base + weights
    draw for a fixed prompt and seed before `out_dir` appears. Returns the largest pixel difference."""
    import numpy as np
    import torch

    out_dir = Path(out_dir)
    check_fuse_target(out_dir, [weights.directory, weights.base_path], overwrite)
    cpu = torch.device("cpu")
    expected = apply_weights(tuned_base(weights, torch.float32, cpu, qlora_base), weights)
    resolution = default_resolution(weights.info, expected)
    reference = np.asarray(generate(expected, CHECK_PROMPT, CHECK_SEED, resolution, CHECK_STEPS, 7.5), np.float32)
    del expected
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_tmp_dir(out_dir)
    try:
        write_fused(weights, tmp / "pipeline", qlora_base)
        fused = load_pipeline(str(tmp / "pipeline"), torch.float32, cpu)
        image = np.asarray(generate(fused, CHECK_PROMPT, CHECK_SEED, resolution, CHECK_STEPS, 7.5), np.float32)
        diff = float(np.abs(image - reference).max()) / 255
        if diff > FUSE_TOLERANCE:
            raise AdapterError(f"the fused pipeline draws a different picture than base + weights (max pixel "
                               f"difference {diff:.3g} > {FUSE_TOLERANCE:.3g}); nothing was written to {out_dir}")
        fused_info = {"weights": str(weights.directory.resolve()), "base_model": weights.base_reference,
                      "max_pixel_diff": diff}
        if weights.info.get("mode") == "qlora":
            fused_info["qlora_base"] = qlora_base
        atomic_write_json(tmp / "pipeline" / TRAINING_INFO, {**weights.info, "fused": fused_info})
        apply_umask(tmp / "pipeline")
        replace_dir(tmp / "pipeline", out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"check: fused pipeline vs base + weights, max pixel difference {diff:.3g} (tolerance "
        f"{FUSE_TOLERANCE:.3g}) OK")
    return diff


def write_fused(weights, directory, qlora_base="dequantized"):
    """A LoRA on the stored base: finetune_launcher.recipes.diffusion.model.fuse_lora_into_pipeline; on a de-quantized
    UNet or a full UNet: the same steps on the pipeline built here."""
    if weights.kind == "lora" and not uses_dequantized_unet(weights, qlora_base):
        from finetune_launcher.recipes.diffusion.model import fuse_lora_into_pipeline

        return fuse_lora_into_pipeline(weights.base_path, weights.directory, directory)
    import torch

    pipeline = apply_weights(tuned_base(weights, torch.float32, torch.device("cpu"), qlora_base), weights)
    if weights.kind == "lora":
        pipeline.fuse_lora()
        pipeline.unload_lora_weights()
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory
