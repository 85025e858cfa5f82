"""Per-GPU memory, step time and total time of a fine-tune before it is launched; calibrated by measurement.

    python tools/estimate_time.py --config configs/my_run.yaml --gpu H100-80GB --gpus-per-node 8
    python tools/estimate_time.py --model Qwen/Qwen2.5-32B-Instruct --mode lora --gpus-per-node 8 --nodes 1 \\
        --gpu H100-80GB --seq-len 4096 --micro-batch 1 --grad-accum 8 --zero 3 --gradient-checkpointing \\
        --lora-rank 16 --examples 50000 --epochs 2 [--json]
    python tools/estimate_time.py --model Qwen/Qwen3-VL-8B-Instruct --mode qlora --gpu A100-40GB --seq-len 1024 \
        --image-size 640x480 --images-per-row 1          # vision-language: pictures in every row
    python tools/estimate_time.py --config configs/sd15_lora.yaml --gpu RTX-4090   # diffusion (--resolution 512)
    python tools/estimate_time.py --config configs/tiny_lora.yaml --measure 5     # run 5 real steps, refit
    python tools/estimate_time.py --from-history outputs/my_run/training_history.json   # refit from a run

Without --gpu it estimates for this machine (its GPU, or `cpu`). Flags override what --config gives.
--json prints one object (params_total, params_trainable, memory_per_gpu_gib with its breakdown, fits,
step_time_s, tokens_per_s, total_steps, total_time_h, assumptions, ...). Calibrations are kept in
.cache/estimate_calibration.json (FTL_ESTIMATE_CALIBRATION moves it) per device and precision.
Exit codes: 0 estimate printed, 2 bad input.
"""
import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train import exit_codes  # noqa: E402
from train.console import ascii_safe, make_console_safe  # noqa: E402
from train.estimate import (EstimateError, RunSpec, calibrate_from_history, calibration_path,  # noqa: E402
                            detect_device, estimate, known_gpus, load_calibration, render_table, resolve_device,
                            run_measurement, spec_from_config)

# flag -> RunSpec field
FLAG_FIELDS = {"model": "model", "mode": "mode", "gpus_per_node": "gpus_per_node", "nodes": "nodes", "gpu": "gpu",
               "seq_len": "seq_len", "micro_batch": "micro_batch", "grad_accum": "grad_accum", "zero": "zero",
               "offload": "offload", "gradient_checkpointing": "gradient_checkpointing", "lora_rank": "lora_rank",
               "lora_targets": "lora_targets", "lora_dropout": "lora_dropout", "examples": "examples",
               "tokens": "tokens", "avg_tokens_per_example": "avg_tokens_per_example", "epochs": "epochs",
               "max_steps": "max_steps", "interconnect": "interconnect", "precision": "precision",
               "attn": "attn_implementation", "packing": "packing", "overlap_comm": "overlap_comm",
               "margin": "margin", "fill": "fill", "liger": "liger_kernel", "recipe": "recipe",
               "image_size": "image_size", "images_per_row": "images_per_row", "min_pixels": "min_pixels",
               "max_pixels": "max_pixels", "resolution": "resolution", "cache_latents": "cache_latents",
               "text_encoder_lora": "text_encoder_lora"}
DIFFUSION_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the diffusion recipe's default (train.config)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a run config (YAML); flags override it")
    p.add_argument("--model", help="hub id, local directory with config.json, or builtin:NAME")
    p.add_argument("--mode", choices=["full", "lora", "qlora"])
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpu", help=f"device type: {', '.join(known_gpus())} (default: this machine's)")
    p.add_argument("--interconnect", help="network between nodes, e.g. ib-8x400, eth-100")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--zero", type=int, choices=[2, 3])
    p.add_argument("--offload", action="store_true", default=None)
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None)
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--liger", dest="liger", action="store_true", default=None,
                   help="Liger's kernels (default: on for GPUs, as the trainer's liger_kernel: auto)")
    p.add_argument("--no-liger", dest="liger", action="store_false")
    p.add_argument("--packing", dest="packing", action="store_true", default=None)
    p.add_argument("--no-packing", dest="packing", action="store_false")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-targets", help="all-linear or a comma list (q_proj,v_proj)")
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--attn", choices=["sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"])
    p.add_argument("--overlap-comm", action="store_true", default=None)
    p.add_argument("--examples", type=int, help="training examples (with --epochs gives the total time)")
    p.add_argument("--tokens", type=int, help="training tokens instead of --examples")
    p.add_argument("--avg-tokens-per-example", type=float)
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--margin", type=float, help="memory margin as a fraction (default 0.10)")
    p.add_argument("--fill", type=float, help="fraction of each row holding real tokens")
    p.add_argument("--recipe", choices=["causal_lm", "vision_language", "diffusion"],
                   help="what is trained (default: from the model: a diffusers pipeline, a vision tower, or text)")
    p.add_argument("--image-size", type=image_size, metavar="WxH",
                   help="vision-language: the typical picture (default: max_pixels square, cut to a row)")
    p.add_argument("--images-per-row", type=float, help="vision-language: pictures per row (default 1)")
    p.add_argument("--min-pixels", type=int, help="vision-language: the processor's lower pixel bound")
    p.add_argument("--max-pixels", type=int, help="vision-language: the processor's upper pixel bound")
    p.add_argument("--resolution", type=int, help="diffusion: square picture side in pixels (default 512)")
    p.add_argument("--cache-latents", action="store_true", default=None, help="diffusion: VAE latents cached")
    p.add_argument("--text-encoder-lora", action="store_true", default=None, help="diffusion: LoRA on the text "
                   "encoder too")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure", type=int, metavar="N", help="run N real steps of --config and refit the throughput")
    p.add_argument("--from-history", metavar="PATH", help="refit the throughput from a run's training_history.json")
    p.add_argument("--calibration", metavar="FILE", help="calibration file (default .cache/estimate_calibration.json)")
    p.add_argument("--no-calibration", action="store_true", help="ignore saved calibrations (cold estimate)")
    return p.parse_args(argv)


def image_size(text):
    """WxH (e.g. 640x480) -> (640, 480)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT in pixels, e.g. 640x480")
    return int(width), int(height)


def explicit_fields(args):
    values = {}
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "lora_targets" and value != "all-linear":
            value = [v.strip() for v in value.split(",") if v.strip()]
        values[name] = value
    return values


def build_spec(args):
    fields = explicit_fields(args)
    gpus = fields.get("gpus_per_node") or (1 if "gpu" in fields else local_processes())
    fields["gpus_per_node"] = gpus
    device = resolve_device(fields["gpu"], gpus) if "gpu" in fields else detect_device(gpus)
    fields["gpu"] = device.name
    if args.config:
        from train.config import resolve_run_config
        from train.config.machine import named

        config = resolve_run_config(args.config, procs_per_node=gpus, nnodes=fields.get("nodes", 1),
                                    machine=named(device.name), require_model=False)
        spec = spec_from_config(config.as_dict(), gpus, fields.get("nodes", 1), gpu=device.name)
        return replace(spec, **fields), device
    if "model" not in fields:
        raise EstimateError("give --config CONFIG or --model NAME_OR_DIR (with --mode, --gpu, --seq-len, ...)")
    fields.setdefault("recipe", recipe_of(fields["model"]))
    if fields["recipe"] == "diffusion":
        fields.setdefault("lora_targets", DIFFUSION_LORA_TARGETS)
        fields.setdefault("packing", False)
    if fields["recipe"] == "vision_language":
        fields["packing"] = False  # length-grouped rows (train/data/vision_language.py)
    # the trainer's defaults: liger_kernel auto, gradient_checkpointing auto (off when it fits without)
    fields.setdefault("liger_kernel", device.kind != "cpu" and fields["recipe"] != "diffusion")
    spec = RunSpec(**fields)
    if "gradient_checkpointing" not in fields:
        without = replace(spec, gradient_checkpointing=False)
        fits = estimate(without, calibration={}, device=device, with_alternatives=False).fits
        spec = without if fits else replace(spec, gradient_checkpointing=True)
    return spec, device


def recipe_of(model):
    """What the trainer's recipe: auto picks for `model`: diffusion for a diffusers pipeline, vision_language for
    a model with a vision tower, else causal_lm."""
    from train.estimate.diffusion import is_pipeline

    if is_pipeline(model):
        return "diffusion"
    from train.estimate import load_architecture

    return "vision_language" if load_architecture(model).vision_params else "causal_lm"


def local_processes():
    """What the launcher would start here: one process per GPU, or FTL_CPU_PROCS (2) on a CPU machine."""
    import os

    gpus = len(list(Path("/dev").glob("nvidia[0-9]*")))
    return gpus or int(os.environ.get("FTL_CPU_PROCS", "2"))


def calibration_for(args):
    if args.no_calibration:
        return {}
    return load_calibration(args.calibration)


def measure(args, spec, device):
    """Run the configured training for N steps, refit, and re-predict the configured run with the new factor."""
    if not args.config:
        raise EstimateError("--measure needs --config: the run whose steps are measured")
    history = run_measurement(args.config, spec.mode, args.measure, spec.gpus_per_node,
                              overrides=config_overrides(args))
    _, note = calibrate(history, device.name, args)
    return estimate(spec, load_calibration(args.calibration), device=device), note


def config_overrides(args):
    """The flags that change the run itself, passed to the measuring run as run-config overrides."""
    keys = {"seq_len": "max_length", "micro_batch": "micro_batch_size", "grad_accum": "gradient_accumulation_steps",
            "zero": "zero_stage", "lora_rank": "lora_r", "model": "model", "precision": "precision",
            "attn": "attn_implementation", "resolution": "resolution", "min_pixels": "min_pixels",
            "max_pixels": "max_pixels"}
    overrides = []
    for flag, key in keys.items():
        if getattr(args, flag) is not None:
            overrides += [f"--{key}", str(getattr(args, flag))]
    for flag in ("offload", "gradient_checkpointing", "packing", "cache_latents", "text_encoder_lora"):
        if getattr(args, flag) is not None:
            overrides += [f"--{flag}", str(getattr(args, flag)).lower()]
    return overrides


def calibrate(history, gpu, args):
    cold, entry, calibrated = calibrate_from_history(history, gpu=gpu, path=args.calibration)
    return calibrated, {"measured_step_time_s": entry["measured_step_time_s"], "factor": entry["factor"],
                        "cold_step_time_s": cold.step_time_s, "calibrated_step_time_s": calibrated.step_time_s,
                        "key": entry["key"], "saved_to": str(args.calibration or calibration_path())}


def main(argv=None):
    make_console_safe()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with stdout_to_stderr(args.json):
            result, calibration_note = compute(args)
    except (EstimateError, ValueError, FileNotFoundError) as error:
        print(ascii_safe(f"error: {error}"), file=sys.stderr)
        return exit_codes.USER_ERROR
    print_result(result, calibration_note, args.json)
    return 0


@contextlib.contextmanager
def stdout_to_stderr(active):
    """With --json, stdout carries the JSON alone: whatever else prints meanwhile (DeepSpeed's and transformers'
    log lines while the model cache is built, at the Python or the file-descriptor level) goes to stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def compute(args):
    """(Estimate, calibration note or None) for the command line."""
    if args.from_history:
        history = json.loads(Path(args.from_history).read_text())
        return calibrate(history, args.gpu, args)
    spec, device = build_spec(args)
    if args.measure:
        return measure(args, spec, device)
    return estimate(spec, calibration_for(args), device=device), None


def print_result(result, calibration_note, as_json):
    if as_json:
        data = result.to_json()
        if calibration_note:
            data["calibration"] = calibration_note
        print(json.dumps(data, indent=2))
        return
    print(ascii_safe(render_table(result)))
    if calibration_note:
        c = calibration_note
        print(ascii_safe(f"\ncalibration: measured {c['measured_step_time_s']:.4f} s/step; cold prediction "
                         f"{c['cold_step_time_s']:.4f}; device-bound terms x {c['factor']:.3f} -> "
                         f"{c['calibrated_step_time_s']:.4f} ({c['key']}, saved to {c['saved_to']})"))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... | head` stopped reading: nothing left to say (Python's documented idiom)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
