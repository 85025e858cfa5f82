"""Per-GPU memory, step time and total time of a fine-tune before it is launched; calibrated by measurement.

    ftl estimate --config configs/my_run.yaml --gpu H100-80GB --procs-per-node 8
    ftl estimate --model Qwen/Qwen2.5-32B-Instruct --mode lora --procs-per-node 8 --nnodes 1 --gpu H100-80GB \\
        --max-length 4096 --micro-batch-size 1 --gradient-accumulation-steps 8 --zero-stage 3 \\
        --gradient-checkpointing --lora-r 16 --examples 50000 --num-epochs 2 [--json]
    ftl estimate --model Qwen/Qwen3-VL-8B-Instruct --mode qlora --gpu A100-40GB --max-length 1024 \\
        --image-size 640x480 --images-per-row 1          # vision-language: pictures in every row
    ftl estimate --config configs/sd15_lora.yaml --gpu RTX-4090   # diffusion (--resolution 512)
    ftl estimate --config configs/tiny_lora.yaml --measure 5     # run 5 real steps, refit
    ftl estimate --from-history outputs/my_run/training_history.json   # refit from a run

(`python tools/estimate_time.py ...` runs the same.) A run-config key is a flag of its own name (--max-length for
max_length; the short --seq-len, --micro-batch, --grad-accum, --zero, --lora-rank, --lora-targets, --epochs,
--attn, --liger, --gpus-per-node and --nodes work too); flags override what --config gives, and the run config is
resolved as the launcher resolves it (the recipe, the precision, Liger's kernels and gradient checkpointing decided
for the machine estimated for). Without --gpu it estimates for this machine (its GPU, or `cpu`).
--json prints one object (params_base, params_adapter, params_trainable, memory_per_gpu_gib with its breakdown, fits,
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

from finetune_launcher import exit_codes, recipe_table
from finetune_launcher.config import resolve_run_config
from finetune_launcher.config.machine import detect, named
from finetune_launcher.console import ascii_safe, make_console_safe
from finetune_launcher.estimate.calibration import calibration_path, load_calibration
from finetune_launcher.estimate.devices import detect_device, known_gpus, resolve_device
from finetune_launcher.estimate.estimator import estimate
from finetune_launcher.estimate.from_config import spec_from_config
from finetune_launcher.estimate.inputs import EstimateError
from finetune_launcher.estimate.measurement import calibrate_from_history, run_measurement
from finetune_launcher.estimate.report import render_table

NO_DATASET = "(no dataset given: --examples or --tokens size the run)"
# Flags that are not run-config keys: the machine, the dataset's size, the estimate's own assumptions.
ESTIMATE_FIELDS = ("interconnect", "examples", "tokens", "avg_tokens_per_example", "margin", "fill", "image_size",
                   "images_per_row")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="ftl estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a run config (YAML); flags override it")
    add_config_flags(p.add_argument_group("run-config keys (override --config)"))
    machine = p.add_argument_group("the machine estimated for")
    machine.add_argument("--gpu", help=f"device type: {', '.join(known_gpus())} (default: this machine's)")
    machine.add_argument("--procs-per-node", "--nproc-per-node", "--gpus-per-node", dest="procs_per_node", type=int)
    machine.add_argument("--nnodes", "--nodes", dest="nnodes", type=int)
    machine.add_argument("--interconnect", help="network between nodes, e.g. ib-8x400, eth-100")
    data = p.add_argument_group("the dataset's size and the estimate's assumptions")
    data.add_argument("--examples", type=int, help="training examples (with --num-epochs gives the total time)")
    data.add_argument("--tokens", type=int, help="training tokens instead of --examples")
    data.add_argument("--avg-tokens-per-example", type=float)
    data.add_argument("--margin", type=float, help="memory margin as a fraction (default 0.10)")
    data.add_argument("--fill", type=float, help="fraction of each row holding real tokens")
    data.add_argument("--image-size", type=image_size, metavar="WxH",
                      help="vision-language: the typical picture (default: max_pixels square, cut to a row)")
    data.add_argument("--images-per-row", type=float, help="vision-language: pictures per row (default 1)")
    run = p.add_argument_group("output and calibration")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--measure", type=int, metavar="N", help="run N real steps of --config and refit the throughput")
    run.add_argument("--from-history", metavar="PATH", help="refit the throughput from a run's training_history.json")
    run.add_argument("--calibration", metavar="FILE",
                     help="calibration file (default .cache/estimate_calibration.json)")
    run.add_argument("--no-calibration", action="store_true", help="ignore saved calibrations (cold estimate)")
    return p.parse_args(argv)


SHARED_KEYS = ("model", "dataset", "mode", "recipe", "max_length", "micro_batch_size", "gradient_accumulation_steps",
               "zero_stage", "lora_r", "lora_target_modules", "lora_dropout", "precision", "attn_implementation",
               "num_epochs", "max_steps", "offload", "gradient_checkpointing", "liger_kernel", "packing",
               "overlap_comm", "moe_lora_kernel")
SCALAR_TYPES = {"boolean": bool, "integer": int, "number": float, "string": str}


def add_config_flags(group):
    """One flag per run-config key the estimate reads, stored under the key's own name; each recipe's own keys as
    its recipe-table entry declares them."""
    group.add_argument("--model", help="hub id, local directory with config.json, or builtin:NAME")
    group.add_argument("--dataset", help="a local JSONL (or image folder) to size the run by")
    group.add_argument("--mode", choices=recipe_table.MODES)
    group.add_argument("--recipe", choices=recipe_table.names(),
                       help="what is trained (default: from the model, as the run config's recipe: auto)")
    group.add_argument("--max-length", "--seq-len", dest="max_length", type=int)
    group.add_argument("--micro-batch-size", "--micro-batch", dest="micro_batch_size", type=int)
    group.add_argument("--gradient-accumulation-steps", "--grad-accum", dest="gradient_accumulation_steps", type=int)
    group.add_argument("--zero-stage", "--zero", dest="zero_stage", type=int, choices=[2, 3])
    group.add_argument("--lora-r", "--lora-rank", dest="lora_r", type=int)
    group.add_argument("--lora-target-modules", "--lora-targets", dest="lora_target_modules", type=module_list,
                       help="all-linear or a comma list (q_proj,v_proj)")
    group.add_argument("--lora-dropout", type=float)
    group.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    group.add_argument("--attn-implementation", "--attn", dest="attn_implementation",
                       choices=["sdpa", "eager", "flash_attention_2", "flash_attention_3"])
    group.add_argument("--num-epochs", "--epochs", dest="num_epochs", type=float)
    group.add_argument("--max-steps", type=int)
    group.add_argument("--moe-lora-kernel", choices=["peft", "grouped"], help="a mixture of experts' LoRA kernel")
    add_switch(group, "offload")
    add_switch(group, "gradient_checkpointing", text="(default: auto, off where the run fits without it)")
    add_switch(group, "liger_kernel", "liger", text="Liger's kernels (default: auto, on for CUDA GPUs)")
    add_switch(group, "packing")
    add_switch(group, "overlap_comm")
    for key in recipe_table.recipe_keys().values():
        kind = scalar_type(key.schema)
        text = f"{recipe_table.owner_of(key.name).name}: {key.help}"
        if kind is bool:
            add_switch(group, key.name, text=text)
        elif kind:
            group.add_argument(f"--{key.name.replace('_', '-')}", dest=key.name, type=kind,
                               choices=key.schema.get("enum"), help=text)


def add_switch(group, key, *aliases, text=None):
    flags = [f"--{name.replace('_', '-')}" for name in (key, *aliases)]
    group.add_argument(*flags, dest=key, action="store_true", default=None, help=text)
    group.add_argument(*[f"--no-{flag[2:]}" for flag in flags], dest=key, action="store_false")


def scalar_type(schema):
    """The Python type of a scalar JSON schema (null allowed beside it), or None for lists and objects."""
    if "enum" in schema:
        return str
    types = schema.get("type")
    types = [t for t in (types if isinstance(types, list) else [types]) if t != "null"]
    return SCALAR_TYPES.get(types[0]) if len(types) == 1 else None


def config_keys():
    return SHARED_KEYS + tuple(recipe_table.recipe_keys())


def image_size(text):
    """WxH (e.g. 640x480) -> (640, 480)."""
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or not int(width) or not int(height):
        raise argparse.ArgumentTypeError(f"'{text}' is not WIDTHxHEIGHT in pixels, e.g. 640x480")
    return int(width), int(height)


def module_list(text):
    return text if text == "all-linear" else [name.strip() for name in text.split(",") if name.strip()]


def config_overrides(args):
    """{run-config key: value} of the flags given."""
    given = {key: getattr(args, key, None) for key in config_keys()}
    return {key: value for key, value in given.items() if value is not None}


def build_spec(args):
    """(RunSpec, Device): the run config (--config and the flags) resolved for the machine estimated for, then the
    estimate's own flags."""
    overrides = config_overrides(args)
    if not args.config:
        if "model" not in overrides:
            raise EstimateError("give --config CONFIG or --model NAME_OR_DIR (with --mode, --gpu, --max-length, ...)")
        overrides = {"mode": "lora", "dataset": NO_DATASET, **overrides}
    machine = named(args.gpu) if args.gpu else detect()
    config = resolve_run_config(args.config, overrides, procs_per_node=args.procs_per_node,
                                nnodes=args.nnodes or 1, machine=machine, require_model=False)
    procs = config.procs_per_node
    device = resolve_device(args.gpu, procs) if args.gpu else detect_device(procs)
    spec = spec_from_config(config.as_dict(), procs, config.nnodes, gpu=device.name)
    given = {name: getattr(args, name) for name in ESTIMATE_FIELDS if getattr(args, name) is not None}
    return replace(spec, **given), device


def calibration_for(args):
    if args.no_calibration:
        return {}
    return load_calibration(args.calibration)


def measure(args, spec, device):
    """Run the configured training for N steps, refit, and re-predict the configured run with the new factor."""
    if not args.config:
        raise EstimateError("--measure needs --config: the run whose steps are measured")
    history = run_measurement(args.config, spec.mode, args.measure, spec.procs_per_node,
                              overrides=override_words(config_overrides(args)))
    _, note = calibrate(history, device.name, args)
    return estimate(spec, load_calibration(args.calibration), device=device), note


def override_words(overrides):
    """{key: value} -> ["--key", "value", ...] as the launcher's command line takes them."""
    words = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = ",".join(value)
        words += [f"--{key}", str(value)]
    return words


def calibrate(history, gpu, args):
    cold, entry, calibrated = calibrate_from_history(history, gpu=gpu, path=args.calibration)
    return calibrated, {"measured_step_time_s": entry["measured_step_time_s"], "factor": entry["factor"],
                        "cold_step_time_s": cold.step_time_s, "calibrated_step_time_s": calibrated.step_time_s,
                        "key": entry["key"], "saved_to": str(args.calibration or calibration_path())}


def main(argv=None):
    """The estimate command; returns its exit code."""
    make_console_safe()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        with stdout_to_stderr(args.json):
            result, calibration_note = compute(args)
    except (EstimateError, ValueError, FileNotFoundError) as error:  # ConfigError is a ValueError
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
