"""From a run config (a Mapping of run-config keys, e.g. train.config.load_config's result) to an estimate: the
RunSpec, `gradient_checkpointing: auto` and `liger_kernel: auto` resolved as the trainer resolves them, the
DeepSpeed settings that change memory, and the launcher's pre-flight."""
import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from train.estimate.calibration import load_calibration
from train.estimate.dataset_size import is_text_blocks, with_dataset_size, with_image_count, with_vl_dataset_size
from train.estimate.devices import detect_device, resolve_device
from train.estimate.estimator import estimate
from train.estimate.inputs import GIB, EstimateError, RunSpec
from train.estimate.report import preflight_text


def spec_from_config(config, nproc, nnodes, gpu=None):
    """A RunSpec for a validated run config (a Mapping of its keys) and the launcher's process counts; what the
    recipe (config["recipe"]: causal_lm, vision_language or diffusion) trains decides which keys count."""
    if config["gradient_checkpointing"] == "auto":
        config = dict(config, gradient_checkpointing=resolve_gradient_checkpointing(config, nproc, nnodes, gpu)[0])
    recipe = config.get("recipe") or "causal_lm"
    common = dict(
        model=config["model"], mode=config["mode"], lora_rank=config["lora_r"],
        lora_targets=config["lora_target_modules"], lora_dropout=config["lora_dropout"],
        micro_batch=config["micro_batch_size"], grad_accum=config["gradient_accumulation_steps"],
        zero=config["zero_stage"], offload=config["offload"], gradient_checkpointing=config["gradient_checkpointing"],
        gpus_per_node=nproc, nodes=nnodes, gpu=gpu or "cpu", precision=config["precision"],
        overlap_comm=config["overlap_comm"], epochs=config["num_epochs"], max_steps=config["max_steps"],
        recipe=recipe, zero3_gather=config.get("zero3_gather", "layer"))
    if recipe == "diffusion":
        spec = RunSpec(**common, resolution=config["resolution"], cache_latents=config["cache_latents"],
                       text_encoder_lora=config["text_encoder_lora"])
        return with_deepspeed_settings(with_image_count(spec, config), config)
    compiled = config.get("compile_layers")
    spec = RunSpec(**common, seq_len=config["max_length"], attn_implementation=config["attn_implementation"],
                   liger_kernel=liger_expected(config, gpu), packing=config["packing"],
                   compile_layers=compiled if isinstance(compiled, bool) else None,
                   text_blocks=recipe == "causal_lm" and is_text_blocks(config))
    if recipe == "vision_language":  # length-grouped rows, never packed (train/data/vision_language.py)
        spec = with_vl_dataset_size(replace(spec, packing=False, min_pixels=config["min_pixels"],
                                            max_pixels=config["max_pixels"], train_merger=config["train_merger"],
                                            lora_vision=config["lora_vision"]), config)
    else:
        spec = with_dataset_size(spec, config)
    return with_deepspeed_settings(spec, config)


def liger_expected(config, gpu):
    """Whether the trainer will apply Liger's kernels: `auto` does on GPUs (liger-kernel is in the [gpu] extra)."""
    setting = config.get("liger_kernel", "auto")
    if setting == "auto":
        return bool(gpu) and gpu != "cpu"
    return bool(setting)


def resolve_gradient_checkpointing(config, nproc, nnodes, gpu=None):
    """(on?, why) for `gradient_checkpointing: auto`: off when the run is predicted to fit without it (a third less
    compute per step), on otherwise or when no estimate can be made."""
    setting = config["gradient_checkpointing"]
    if setting != "auto":
        return setting, "set in the run config"
    try:
        device = resolve_device(gpu, nproc) if gpu else detect_device(nproc)
        spec = spec_from_config(dict(config, gradient_checkpointing=False), nproc, nnodes, gpu=device.name)
        result = estimate(spec, calibration={}, device=device, with_alternatives=False)
    except EstimateError as error:
        return True, f"auto: on (no memory estimate: {error})"
    need, have = result.peak_bytes / GIB, device.memory_gib
    if result.fits:
        return False, f"auto: off (predicted {need:.1f} GiB of {have:.1f} GiB per {device.name} without it)"
    return True, f"auto: on (without it {need:.1f} GiB > {have:.1f} GiB per {device.name})"


def deepspeed_zero_settings(config):
    """The zero_optimization section: from the resolved DeepSpeed dict under `deepspeed` when the mapping has one,
    else from the user's file named by deepspeed_config ({} when neither, or when the file cannot be read)."""
    resolved = config.get("deepspeed")
    if isinstance(resolved, Mapping):
        return dict(resolved.get("zero_optimization") or {})
    if not config.get("deepspeed_config"):
        return {}
    try:
        return json.loads(Path(config["deepspeed_config"]).read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError):
        return {}


def with_deepspeed_settings(spec, config):
    """The reduce bucket, ZeRO-3's live-parameter limit and overlap_comm where the DeepSpeed settings give
    concrete values (our files say "auto")."""
    zero = deepspeed_zero_settings(config)
    if not zero:
        return spec
    numbers = {k: int(v) for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    overlap = zero.get("overlap_comm", "auto")
    return replace(spec, reduce_bucket_size=numbers.get("reduce_bucket_size"),
                   max_live_parameters=numbers.get("stage3_max_live_parameters"),
                   overlap_comm=spec.overlap_comm if overlap == "auto" else bool(overlap))


def estimate_from_config(config, nproc, nnodes, announce=False, gpu=None, calibration=None):
    """The launcher's pre-flight: an estimate for this run on this machine's device (or `gpu`), printed when
    `announce`. Returns the Estimate (.fits, .refusal) or None when no estimate can be made (said why)."""
    from train.console import ascii_safe

    try:
        device = resolve_device(gpu, nproc) if gpu else detect_device(nproc)
        spec = spec_from_config(config, nproc, nnodes, gpu=device.name)
        result = estimate(spec, calibration if calibration is not None else load_calibration(), device=device)
    except EstimateError as error:
        if announce:
            print(ascii_safe(f"pre-flight: no estimate ({error})"), flush=True)
        return None
    if announce:
        print(ascii_safe(preflight_text(result)), flush=True)
    return result

