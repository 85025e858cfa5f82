"""Stable Diffusion (1.x layout) components for fine-tuning the UNet: full, LoRA or QLoRA, the VAE and the CLIP text
encoder frozen (optionally LoRA on the text encoder), and the LoRA saved in diffusers' format and peft's.

QLoRA: diffusers' BitsAndBytesConfig refuses to load without a GPU, so the UNet is loaded in the compute dtype and
its nn.Linear layers are replaced by bitsandbytes' Linear4bit (NF4, double quant, the resolved storage dtype),
quantized when moved to the device: the same path on the CPU and on CUDA. Then peft's k-bit preparation (base
frozen, non-4-bit weights upcast to fp32) and LoRA adapters in fp32. ZeRO-3: diffusers' from_pretrained knows no
zero.Init (unlike transformers with HfDeepSpeedConfig); the UNet is loaded whole on each rank and DeepSpeed
partitions it when the engine is built. diffusers' own training scripts do the same, and keep the frozen VAE out of
zero.Init so it can run outside the engine.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune_launcher.dtypes import torch_dtype
from finetune_launcher.errors import ConfigError
from finetune_launcher.fsutil import apply_umask, fresh_tmp_dir, replace_dir
from finetune_launcher.models.prepare import lora_config, quantize_linears
from finetune_launcher.models.references import resolve_model_path

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_PREFIX = "base_model.model."  # how peft's PeftModel names the wrapped model's modules


class DiffusionModelError(ConfigError):
    """A model setting a user can fix; the message names the config key."""


class DiffusionModel(torch.nn.Module):
    """What the engine trains: the text encoder (frozen unless it has LoRA) and the UNet, so a sharding engine
    partitions and gathers every trainable weight."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def encode_prompt(self, input_ids):
        trainable = any(p.requires_grad for p in self.text_encoder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.text_encoder(input_ids, return_dict=False)[0]

    def forward(self, noisy_latents, timesteps, input_ids):
        # the objective works in fp32; DeepSpeed's bf16/fp16 casts the weights, FSDP2 has gathered them in that dtype
        dtype = self.unet.dtype
        hidden = self.encode_prompt(input_ids).to(dtype)
        return self.unet(noisy_latents.to(dtype), timesteps, hidden, return_dict=False)[0]


@dataclass
class DiffusionParts:
    model: DiffusionModel
    vae: object
    tokenizer: object
    noise_scheduler: object   # DDPMScheduler with the pipeline's training schedule (betas, prediction type)
    sample_scheduler: object  # the sampler the pipeline names in model_index.json (SD1.5: PNDM)
    path: str                 # the resolved pipeline directory or hub id


def load_diffusion(cfg, device):
    """Load the pipeline's components (a local directory, a hub id or builtin:tiny-sd) in cfg.precision's dtype and
    prepare them for cfg.mode (lora | qlora | full). Attributes read from cfg: model, mode, precision, lora_r,
    lora_alpha, lora_dropout, lora_target_modules, gradient_checkpointing, text_encoder_lora, zero_stage."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    if cfg.mode not in ("lora", "qlora", "full"):
        raise DiffusionModelError(f"mode '{cfg.mode}': a diffusion run trains the UNet with lora, qlora or full")
    path = resolve_model_path(cfg.model)
    dtype = torch_dtype(cfg.precision)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
    vae.to(device)
    text_encoder.to(device)
    if cfg.mode == "qlora":
        unet = quantize_unet_linears(unet, cfg, device)
    else:
        unet.to(device)
        unet.requires_grad_(cfg.mode == "full")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.mode in ("lora", "qlora"):
        add_lora(unet, unet_lora_config(cfg, unet))
    if cfg.text_encoder_lora:
        add_lora(text_encoder, text_encoder_lora_config(cfg))
        text_encoder.train()
        if cfg.gradient_checkpointing:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return DiffusionParts(DiffusionModel(unet, text_encoder), vae, tokenizer,
                          DDPMScheduler.from_pretrained(path, subfolder="scheduler"), load_sample_scheduler(path), path)


def load_sample_scheduler(path):
    import diffusers

    scheduler_class = diffusers.DiffusionPipeline.load_config(path)["scheduler"][1]
    return getattr(diffusers, scheduler_class).from_pretrained(path, subfolder="scheduler")


def quantize_unet_linears(unet, cfg, device):
    """Every nn.Linear of the UNet in NF4 (models/prepare.py's quantize_linears: diffusers' own quantizer needs a
    GPU), then peft's k-bit preparation."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise DiffusionModelError("mode qlora needs bitsandbytes (pip install -e '.[gpu]'); or use mode lora") from None
    from peft import prepare_model_for_kbit_training

    quantize_linears(unet, torch_dtype(cfg.precision), torch_dtype(cfg.bnb_4bit_quant_storage), device)
    unet.to(device)
    unet.is_loaded_in_4bit = True  # what diffusers' quantizer sets; peft then wraps Linear4bit with its 4-bit LoRA
    return prepare_model_for_kbit_training(unet, use_gradient_checkpointing=False)


def linear_name_endings(model):
    """The short names peft matches on ("to_k", "to_out.0", "proj"...) of a model's linear layers, for messages."""
    endings = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = name.split(".")
            endings.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(endings)


def unet_lora_targets(cfg, unet):
    """cfg.lora_target_modules as peft target names: "all-linear" -> every linear layer, a list -> as given (each
    must name a linear layer; the recipe's default is the attention projections to_k, to_q, to_v, to_out.0)."""
    targets = cfg.lora_target_modules
    linear_names = [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)]
    if targets == "all-linear":
        return linear_names
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if unknown:
        raise DiffusionModelError(f"lora_target_modules {unknown} name no linear layer of the UNet; its linear "
                                  f"layers end in: {', '.join(linear_name_endings(unet))}")
    return list(targets)


def unet_lora_config(cfg, unet):
    return lora_config(cfg, unet_lora_targets(cfg, unet))


def text_encoder_lora_config(cfg):
    return lora_config(cfg, TEXT_ENCODER_TARGETS)


def add_lora(model, lora_config):
    """peft adapters injected in place (diffusers' and transformers' add_adapter), kept in fp32 whatever the base
    dtype, as diffusers' training scripts do (cast_training_params)."""
    from diffusers.training_utils import cast_training_params

    model.add_adapter(lora_config)
    cast_training_params(model, dtype=torch.float32)


# ---------------------------------------------------------------- saving and fusing

def has_lora(model):
    return bool(getattr(model, "peft_config", None))


def lora_state(model, trainable=None):
    """The adapter weights by peft's names (adapter name removed), from `trainable` ({name in `model`: whole
    tensor}; default: the model's own trainable parameters) only: a full state_dict would also serialise every 4-bit
    base weight."""
    from peft import get_peft_model_state_dict

    if trainable is None:
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state = get_peft_model_state_dict(model, state_dict=trainable, save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def save_diffusion_lora(unet, text_encoder, out_dir, trainable=None):
    """Write `out_dir` atomically: pytorch_lora_weights.safetensors in diffusers' format (with the LoRA configs as
    metadata, so rank and alpha load right; `StableDiffusionPipeline.load_lora_weights(out_dir)` reads it) and
    peft's adapter files under unet/ (and text_encoder/ when it has LoRA) for `PeftModel.from_pretrained`.
    `trainable`: the DiffusionModel's trainable weights whole ({"unet.<name>": tensor, ...}, as the engine gathers
    them); default: the parts' own parameters."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    out_dir = Path(out_dir)
    parts = {"unet": unet, "text_encoder": text_encoder if has_lora(text_encoder) else None}
    states = {name: lora_state(model, None if trainable is None else
                               {k[len(name) + 1:]: v for k, v in trainable.items() if k.startswith(name + ".")})
              for name, model in parts.items() if model is not None}
    tmp = fresh_tmp_dir(out_dir)
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=convert_state_dict_to_diffusers(states["unet"]),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(states["text_encoder"]) if parts["text_encoder"]
        else None, unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict() if parts["text_encoder"]
        else None)
    for name, state in states.items():
        save_peft_adapter(parts[name], state, tmp / name)
    apply_umask(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def save_peft_adapter(model, state, directory):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(directory)
    save_file({PEFT_PREFIX + k: v for k, v in state.items()}, directory / "adapter_model.safetensors",
              metadata={"format": "pt"})


def save_full_unet(model, out_dir, state=None):
    """A full fine-tune's weights: `out_dir`/unet/ (config.json + diffusion_pytorch_model.safetensors), written
    atomically, loadable with UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet") and so into the base
    pipeline (from_pretrained(base, unet=...)). `state` is the DiffusionModel's state dict (by default its own;
    under ZeRO-3 the engine's consolidated 16-bit one); its "unet." entries are written."""
    from safetensors.torch import save_file

    state = model.state_dict() if state is None else state
    unet_state = {k[len("unet."):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith("unet.")}
    out_dir = Path(out_dir)
    tmp = fresh_tmp_dir(out_dir)
    (tmp / "unet").mkdir(parents=True)
    model.unet.save_config(tmp / "unet")
    save_file(unet_state, tmp / "unet" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    apply_umask(tmp)
    replace_dir(tmp, out_dir)
    return out_dir


def fuse_lora_into_pipeline(pipeline_dir, lora_dir, out_dir):
    """Load the base pipeline, merge the LoRA of `lora_dir` into its weights and save a complete pipeline directory
    (loadable with StableDiffusionPipeline.from_pretrained, no adapter needed) atomically."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(resolve_model_path(str(pipeline_dir)))
    pipeline.load_lora_weights(str(lora_dir))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    out_dir = Path(out_dir)
    tmp = fresh_tmp_dir(out_dir)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    apply_umask(tmp)
    replace_dir(tmp, out_dir)
    return out_dir
