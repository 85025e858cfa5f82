"""The diffusion recipe's part of the estimator (estimate/estimator.py lists what a part gives): estimates for
diffusion fine-tunes (Stable Diffusion 1.x layout: UNet + VAE + CLIP text encoder, as model.py trains them), the same
Estimate the language-model path gives; and which models are diffusers pipelines it knows (facts.py asks).

Memory per rank: the engine's part (UNet and text encoder: DiffusionModel) in the compute dtype, 1/N of it under
ZeRO-3; QLoRA stores the UNet's nn.Linear weights in NF4 with double quantisation, every other UNet weight in the
compute dtype (peft's k-bit preparation upcasts them to fp32, and DeepSpeed's bf16/fp16 engine casts them back:
measured); the frozen VAE whole on every rank, outside the engine; LoRA adapters in the compute dtype (diffusers
has no zero.Init, so DeepSpeed casts them); gradients and AdamW states of what trains (model_states.py); the
activations one micro-batch keeps, counted on the meta device (estimate_meta.py); in backward the block being
recomputed under checkpointing, or the largest gradient buffer; the VAE's encode as a phase of its own (before the
UNet runs); runtime and margin as for language models.

Time per optimizer step: UNet FLOPs per image at the latent size (forward, backward: input gradients through
every layer and the adapters' weight gradients, and the recompute under checkpointing), the VAE encode (none with
cache_latents, once the cache is warm) and the text encoder's forward (and backward with text_encoder_lora), at
the device's peak x MFU; element-wise work over the activations at memory bandwidth; NF4 de-quantisation; the
optimizer; per-block framework overhead; ZeRO communication (step_time.comm_seconds).
"""
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from finetune_launcher.estimate.activations import zero3_live_bytes
from finetune_launcher.estimate.calibration import calibration_factor, calibration_key, calibration_path
from finetune_launcher.estimate.dataset_size import count_lines
from finetune_launcher.estimate.devices import default_interconnect, resolve_device
from finetune_launcher.estimate.inputs import GIB, EstimateError
from finetune_launcher.estimate.model_states import (NF4_BYTES_PER_PARAM, dtype_bytes, gradient_bytes,
                                                     host_bytes_per_node, optimizer_bytes, quantized_bytes)
from finetune_launcher.estimate.parameters import ParamCounts
from finetune_launcher.estimate.report import Estimate
from finetune_launcher.estimate.step_time import (LAYER_OVERHEAD_S, OPTIMIZER_BYTES_PER_PARAM, STEP_OVERHEAD_S,
                                                  comm_seconds)
from finetune_launcher.estimate.totals import peak_memory, runtime_bytes, total_optimizer_steps
from finetune_launcher.models.references import is_builtin, resolve_model_path
from finetune_launcher.recipes.diffusion import estimate_meta
from finetune_launcher.recipes.diffusion.estimate_table import PIPELINES

CALIBRATION_GROUP = "diffusion"  # a UNet's convolutions reach another fraction of the peak than a transformer
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Pipeline:
    """A pipeline's component configs (tuples of their items: hashable, for the meta-device caches)."""
    name: str
    source: str
    unet: tuple
    vae: tuple
    text_encoder: tuple
    max_tokens: int = 77
    vision = None
    vision_params = 0
    is_moe = False
    counts = True  # exact counts: the meta-device models

    @property
    def hidden_size(self):
        """The UNet's widest block: what our DeepSpeed files size the reduce bucket by (its square)."""
        return max(dict(self.unet)["block_out_channels"])

    @property
    def vae_scale(self):
        return 2 ** (len(dict(self.vae)["block_out_channels"]) - 1)


def frozen(config):
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()
                        if not k.startswith("_")))


def pipeline_from_dir(path, name):
    def read(part):
        file = path / part / "config.json"
        if not file.is_file():
            raise EstimateError(f"{path}: no {part}/config.json; a diffusion pipeline directory holds "
                                f"model_index.json with unet/, vae/, text_encoder/ and tokenizer/")
        return json.loads(file.read_text())

    tokenizer = path / "tokenizer" / "tokenizer_config.json"
    tokens = json.loads(tokenizer.read_text()).get("model_max_length", 77) if tokenizer.is_file() else 77
    return Pipeline(name=name, source=str(path), unet=frozen(read("unet")), vae=frozen(read("vae")),
                    text_encoder=frozen(read("text_encoder")), max_tokens=min(int(tokens), 77))


def table_key(model_ref):
    wanted = model_ref.strip().lower().rstrip("/")
    for key, entry in PIPELINES.items():
        if wanted == key or wanted in (n.lower() for n in entry["names"]):
            return key
    return None


def local_pipeline_dir(model_ref):
    """The directory of a local pipeline, builtin:tiny-sd, or a hub id in the local Hugging Face cache, or None."""
    path = Path(resolve_model_path(model_ref)) if is_builtin(model_ref) else Path(os.path.expanduser(model_ref))
    if (path / "model_index.json").is_file():
        return path
    if "/" in model_ref and not path.is_absolute():
        hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
        found = sorted((hub.expanduser() / f"models--{model_ref.replace('/', '--')}" / "snapshots").glob(
            "*/model_index.json"))
        if found:
            return found[-1].parent
    return None


def is_pipeline(model_ref):
    """Whether `model_ref` names a diffusers pipeline the estimator knows (table, local directory, cache)."""
    return table_key(model_ref) is not None or local_pipeline_dir(model_ref) is not None


def load_pipeline(model_ref):
    key = table_key(model_ref)
    if key:
        entry = PIPELINES[key]
        return Pipeline(name=key, source=f"offline table ({key})", unet=frozen(entry["unet"]),
                        vae=frozen(entry["vae"]), text_encoder=frozen(entry["text_encoder"]),
                        max_tokens=entry["max_tokens"])
    path = local_pipeline_dir(model_ref)
    if path is None:
        names = [n for entry in PIPELINES.values() for n in entry["names"]]
        raise EstimateError(f"unknown diffusion pipeline '{model_ref}': not a directory with model_index.json, not "
                            f"in the offline table and not in the local Hugging Face cache. Known: "
                            f"{', '.join(names)}, builtin:tiny-sd")
    return pipeline_from_dir(path, model_ref)


# ---------------------------------------------------------------- the recipe's estimate part

def spec_fields(config):
    """A row is one picture of `resolution` (no packing, every pixel real); the pictures of a local image folder."""
    return {"packing": False, "fill": 1.0, **picture_count(config)}


def picture_count(config):
    """{examples: the pictures of a local image folder (its metadata.jsonl lines)}, or {}."""
    folder = Path(config["dataset"])
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file() and (folder / "train" / "metadata.jsonl").is_file():
        metadata = folder / "train" / "metadata.jsonl"
    return {"examples": count_lines(metadata)} if metadata.is_file() else {}


# ---------------------------------------------------------------- counts, memory, time

def run_counts(pipe, spec):
    """ParamCounts of the engine's part (UNet + text encoder + adapters), and the VAE's parameters."""
    base = estimate_meta.pipeline_counts(pipe.unet, pipe.vae, pipe.text_encoder)
    unet_lora, text_lora = estimate_meta.lora_counts(pipe.unet, pipe.text_encoder, spec.lora_r, lora_targets(spec),
                                                     spec.text_encoder_lora)
    if spec.mode == "full":
        unet_lora = 0
    lora = unet_lora + text_lora
    quantized = base["unet_linear_sizes"] if spec.mode == "qlora" else ()
    model = base["unet"] + base["text_encoder"]
    counts = ParamCounts(total=model + lora, base=model,
                         trainable=lora + (base["unet"] if spec.mode == "full" else 0), lora=lora, embedding=0,
                         lm_head=0, quantized=sum(quantized), quantized_sizes=quantized, matmul_per_token=0,
                         largest_module=base["largest_module"])
    return counts, base


def lora_targets(spec):
    targets = spec.lora_target_modules
    return targets if targets in (None, "all-linear") else tuple([targets] if isinstance(targets, str) else targets)


def unet_profile(pipe, spec):
    side = spec.resolution // pipe.vae_scale
    if spec.resolution < 8 or side * pipe.vae_scale != spec.resolution:
        raise EstimateError(f"resolution {spec.resolution} is not a multiple of the VAE's downsampling "
                            f"({pipe.vae_scale}); use e.g. {max(1, round(spec.resolution / 64)) * 64}")
    mode = "full" if spec.mode == "full" else "lora"  # bnb's 4-bit matmul keeps no input either
    width = dict(pipe.unet)["cross_attention_dim"]
    return estimate_meta.unet_step(pipe.unet, mode, spec.lora_r, spec.lora_dropout, lora_targets(spec),
                                   spec.gradient_checkpointing, TORCH_DTYPES[spec.precision], side, pipe.max_tokens,
                                   width)


def weight_bytes(spec, counts, vae, e):
    """The engine's part per rank (1/N under ZeRO-3, NF4 quant_state whole) plus the VAE, whole."""
    world = spec.world_size if spec.zero_stage == 3 else 1
    if spec.mode == "qlora":
        packed, state = quantized_bytes(counts)
        engine = (packed + (counts.total - counts.quantized) * e) / world + state
    else:
        engine = 0.0 if spec.offload and spec.zero_stage == 3 else counts.total * e / world
    return engine + vae * e


def memory_terms(pipe, spec, device, counts, base, step, e):
    micro = spec.micro_batch_size
    grads, grads_at_step = gradient_bytes(spec, pipe, counts, e)
    memory = {"weights": weight_bytes(spec, counts, base["vae"], e), "gradients": grads,
              "gradients_at_step": grads_at_step, "optimizer": optimizer_bytes(spec, counts),
              "activations": micro * step.saved, "activations.unet": micro * step.saved}
    # Backward's short-lived bytes, as the tiny pipeline's real CPU step shows them: with checkpointing the block
    # being recomputed (its internals and the gradients flowing through it); without, the largest gradient buffer.
    if spec.gradient_checkpointing:
        transients = {"recomputed_block": micro * step.largest_block}
    else:
        transients = {"gradient_buffer": micro * step.largest_tensor}
    if spec.zero_stage == 3:
        transients["zero3_gathered_parameters"] = zero3_live_bytes(spec, counts, e)
    memory.update({f"transient.{k}": v for k, v in transients.items()})
    memory["runtime"] = runtime_bytes(device)
    # The encoder's working set at full resolution: the picture and six tensors of its first width (measured on an
    # H200: 0.377 GiB for SD1.5 at 512 px in bf16, docs/estimation.md)
    first = dict(pipe.vae)["block_out_channels"][0]
    memory["vae_encode"] = micro * (3 + 6 * first) * spec.resolution ** 2 * e
    return memory


def diffusion_peak(memory, device, margin):
    """peak_memory's two phases, and a third: the VAE's encode, before the UNet runs (weights, optimizer states and
    the encoder's working set)."""
    peak, phase, breakdown = peak_memory({k: v for k, v in memory.items() if k != "vae_encode"}, device, margin)
    held = memory["weights"] + memory["optimizer"] + memory["vae_encode"] + memory["runtime"]
    if held * (1 + margin) <= peak:
        return peak, phase, breakdown
    return held * (1 + margin), "VAE encode", {"weights": memory["weights"], "gradients": 0.0,
                                               "optimizer": memory["optimizer"], "activations": memory["vae_encode"],
                                               "other": memory["runtime"] + held * margin}


def flops_per_image(pipe, spec, step):
    vae, text = estimate_meta.encoder_flops(pipe.vae, pipe.text_encoder, spec.resolution, pipe.max_tokens)
    forward, backward, recompute = step.flops
    text_backward = text if spec.text_encoder_lora else 0
    vae = 0 if spec.cache_latents else vae
    return {"forward": forward, "backward": backward, "recompute": recompute, "vae_encode": vae,
            "text_encoder": text + text_backward,
            "total": forward + backward + recompute + vae + text + text_backward}


def step_time(pipe, spec, device, counts, step, calibration, interconnect):
    e = dtype_bytes(spec.precision)
    images = spec.micro_batch_size * spec.gradient_accumulation_steps
    flops = flops_per_image(pipe, spec, step)
    mfu = device.mfu["full" if spec.mode == "full" else "lora"]
    bandwidth = device.hbm_tbps * 1e12
    passes = 3 if spec.gradient_checkpointing else 2
    terms = {"matmul_s": flops["total"] * images / (device.peak_flops(spec.precision) * mfu),
             "elementwise_s": 3 * step.saved_plain * images * (passes / 2) / bandwidth,
             "dequant_s": counts.quantized * 2.5 * passes * spec.gradient_accumulation_steps / bandwidth,
             "optimizer_s": counts.trainable / spec.world_size * OPTIMIZER_BYTES_PER_PARAM / bandwidth}
    compute_bound = sum(terms.values())
    kind = "cpu" if device.kind == "cpu" else "gpu"
    launches = LAYER_OVERHEAD_S[kind] * step.blocks * passes * spec.gradient_accumulation_steps
    terms["overhead_s"] = STEP_OVERHEAD_S[kind] + (launches if kind == "cpu" else max(0.0, launches - compute_bound))
    comm, detail = comm_seconds(spec, device, counts, e, interconnect)
    terms["comm_s"] = comm
    factor = calibration_factor(calibration, device, spec.precision, CALIBRATION_GROUP)
    cold = compute_bound + terms["overhead_s"] + comm
    calibrated = compute_bound * factor + terms["overhead_s"] + comm if factor else None
    return {"terms": terms, "comm": detail, "flops_per_token": flops, "mfu_assumed": mfu,
            "tokens_per_rank_step": images, "cold_s": cold, "calibrated_s": calibrated,
            "calibration_factor": factor, "device_bound_s": compute_bound,
            "calibration_key": calibration_key(device, spec.precision, CALIBRATION_GROUP)}


def estimate(spec, calibration=None, device=None):
    """The diffusion run's Estimate (rows are pictures: unpacked, every pixel real)."""
    spec = replace(spec, packing=False, fill=1.0)
    pipe = load_pipeline(spec.model)
    device = device or resolve_device(spec.gpu, spec.procs_per_node)
    device.peak_flops(spec.precision)  # refuses fp16/bf16 where the device has none
    interconnect = spec.interconnect or default_interconnect(device)
    e = dtype_bytes(spec.precision)
    counts, base = run_counts(pipe, spec)
    step = unet_profile(pipe, spec)
    memory = memory_terms(pipe, spec, device, counts, base, step, e)
    peak, phase, breakdown = diffusion_peak(memory, device, spec.margin)
    timing = step_time(pipe, spec, device, counts, step, calibration, interconnect)
    total_steps, note = total_optimizer_steps(spec, row="picture")
    result = Estimate(spec=spec, arch=pipe, device=device, precision=spec.precision, counts=counts, memory=memory,
                      peak_bytes=peak, peak_phase=phase, breakdown=breakdown, timing=timing, total_steps=total_steps,
                      steps_note=note.replace(", one row each", ""), interconnect=interconnect, assumptions=[],
                      host_bytes=host_bytes_per_node(spec, counts, e), unit="images",
                      row=f"{spec.resolution}px pictures")
    result.assumptions = diffusion_assumptions(result, base, step)
    return result


def diffusion_assumptions(result, base, step):
    spec, t = result.spec, result.timing
    side = spec.resolution // result.arch.vae_scale
    notes = [
        f"pipeline from {result.arch.source}; parameter counts from diffusers' and transformers' models built on "
        f"the meta device: UNet {base['unet']:,}, VAE {base['vae']:,}, text encoder {base['text_encoder']:,}",
        f"precision {result.precision}; pictures of {spec.resolution}x{spec.resolution} -> {side}x{side} latents, "
        f"{result.arch.max_tokens} prompt tokens; micro-batch {spec.micro_batch_size} x accumulation "
        f"{spec.gradient_accumulation_steps}",
        f"{spec.mode}: " + ("the whole UNet trains" if spec.mode == "full" else
                            f"LoRA r={spec.lora_r} on {lora_targets(spec) or 'the attention projections'}")
        + ("; LoRA on the text encoder too" if spec.text_encoder_lora else "; VAE and text encoder frozen"),
        "activations: one image's step run on the meta device (saved-tensor hooks, SDPA as the flash kernel keeps "
        f"it): {step.saved / GIB:.3f} GiB per image"
        + (" with gradient checkpointing" if spec.gradient_checkpointing else "") + "; GPU figure not measured",
        "the VAE encodes before the UNet runs: its working set is a phase of its own (peak: the larger phase)",
        f"UNet {t['flops_per_token']['forward'] / 1e12:.3g} TFLOPs forward per image (FlopCounterMode on the meta "
        f"device); VAE encode {'cached (none)' if spec.cache_latents else 'every step'}; MFU "
        f"{t['mfu_assumed']:.0%} until calibrated",
        f"margin {spec.margin:.0%}; runtime {result.memory['runtime'] / GIB:.1f} GiB per rank",
    ]
    if spec.mode == "qlora":
        notes.append(f"QLoRA: {result.counts.quantized:,} UNet nn.Linear weights in NF4 "
                     f"({NF4_BYTES_PER_PARAM:g} B + quant_state), the other UNet weights in the compute dtype "
                     f"(DeepSpeed casts back what k-bit preparation upcast to fp32)")
    if t["calibration_factor"]:
        notes.append(f"calibrated: device-bound terms x {t['calibration_factor']:.3f} from a diffusion measurement "
                     f"on this device ({calibration_path()})")
    return notes
