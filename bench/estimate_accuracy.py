"""Step-time accuracy of the estimator on this machine (a benchmark, not a test): calibrate on one configuration,
predict others (another sequence length, micro-batch, LoRA rank, mode, ZeRO stage, checkpointing), run them all
through the real launcher and trainer, and print predicted vs measured step time, cold and calibrated.

    python bench/estimate_accuracy.py                       # CPU: builtin:small-llama, 2 processes
    python bench/estimate_accuracy.py --model Qwen/Qwen2.5-7B-Instruct --dataset data/my.jsonl --seq-len 2048 \\
        --micro-batch 2 --steps 8 --json docs/benchmarks/estimate_accuracy_h100.json      # the GPU issue

Each case runs `--steps` measured steps after 2 warm-up steps; the measured figure is their median. The
calibration is fitted on the first case only (kept in a temporary file: the saved calibration is not touched).
"""
import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import predict  # noqa: E402
from finetune_launcher.console import ascii_safe, make_console_safe  # noqa: E402
from finetune_launcher.estimate import detect_device, fit_calibration, measured_step_time, run_measurement  # noqa: E402

# (label, run-config overrides relative to the base case)
CASES = [
    ("base: lora r16", {}),
    ("seq x2", {"max_length": "2x"}),
    ("micro-batch x2", {"micro_batch_size": "2x"}),
    ("lora r64", {"lora_r": 64}),
    ("full", {"mode": "full"}),
    ("qlora", {"mode": "qlora"}),
    ("zero 3", {"zero_stage": 3}),
    ("checkpointing", {"gradient_checkpointing": True}),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:small-llama")
    p.add_argument("--dataset", default="data/tiny_instruct.jsonl")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--nproc", type=int, help="processes per node (default: GPUs, or 2 on a CPU)")
    p.add_argument("--steps", type=int, default=4, help="measured steps per case (after 2 warm-up steps)")
    p.add_argument("--cases", help="comma list of case numbers to run (default: all)")
    p.add_argument("--max-load", type=float, help="on a shared machine: before each case wait (up to 3 min) until "
                                                   "the 1-minute load average is below this")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--reuse", metavar="FILE", help="take measured step times from an earlier --json instead of "
                                                    "running (re-predicts with the current model)")
    return p.parse_args()


def base_config(args):
    return {"run_name": "accuracy", "mode": "lora", "model": args.model, "dataset": args.dataset,
            "max_length": args.seq_len, "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1,
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "gradient_checkpointing": False,
            "zero_stage": 2, "packing": True, "num_epochs": 1, "eval_fraction": 0.0, "lr_scheduler": "constant",
            "learning_rate": 1e-4}


def case_config(args, change):
    config = base_config(args)
    for key, value in change.items():
        config[key] = config[key] * 2 if value == "2x" else value
    return config


def write_yaml(config, directory, index):
    import yaml

    path = Path(directory) / f"case{index}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def measure_case(args, config, path, nproc, index):
    history = run_measurement(path, config["mode"], args.steps, nproc, out_dir=Path(path).parent / f"run{index}")
    return measured_step_time(history.get("records", [])), history


def run(args):
    nproc = args.nproc or _default_nproc()
    device = detect_device(nproc)
    reused = json.loads(Path(args.reuse).read_text())["cases"] if args.reuse else None
    chosen = [int(i) for i in args.cases.split(",")] if args.cases else range(len(CASES))
    rows, calibration = [], None
    with tempfile.TemporaryDirectory(prefix="ftl-accuracy-") as tmp:
        for index in chosen:
            label, change = CASES[index]
            config = case_config(args, change)
            load = None
            if reused:
                measured = next(c["measured_s"] for c in reused if c["label"] == label)
            else:
                measured, load = measure_quietly(args, config, write_yaml(config, tmp, index), nproc, index, label)
            cold = predict(config, nproc, device, {})
            if calibration is None:  # the first case calibrates
                entry = fit_calibration(cold, measured, source=f"estimate_accuracy case '{label}'")
                calibration = {entry["key"]: entry}
            calibrated = predict(config, nproc, device, calibration)
            rows.append({"label": label, "change": change, "measured_s": measured, "cold_s": cold.step_time_s,
                         "calibrated_s": calibrated.step_time_s, "calibration_factor": entry["factor"],
                         "load_average": load})
    return rows, device


def measure_quietly(args, config, path, nproc, index, label, attempts=3):
    """Measure a case; with --max-load, retry when other processes loaded the machine during it (the 1-minute
    load average after the case, less our own ranks, above --max-load)."""
    import os

    for attempt in range(1, attempts + 1):
        before = wait_for_quiet(args.max_load)
        t0 = time.time()
        measured, _ = measure_case(args, config, path, nproc, index)
        after = round(os.getloadavg()[0], 2)
        print(ascii_safe(f"  measured {label}: {measured:.4f} s/step ({time.time() - t0:.0f} s, load {before} -> "
                         f"{after})"), file=sys.stderr, flush=True)
        if not args.max_load or after - nproc <= args.max_load or attempt == attempts:
            return measured, {"before": before, "after": after, "attempts": attempt}
    raise AssertionError("unreachable")


def wait_for_quiet(max_load, limit_s=180):
    """The 1-minute load average when the case starts, after waiting for it to drop below `max_load`."""
    import os

    start = time.time()
    while max_load and os.getloadavg()[0] > max_load and time.time() - start < limit_s:
        time.sleep(5)
    return round(os.getloadavg()[0], 2)


def _default_nproc():
    from finetune_launcher.config.machine import detect
    from finetune_launcher.config.resolve import default_procs_per_node

    return default_procs_per_node(detect())


def render(rows, args, device):
    lines = [f"{'case':<18} {'measured s':>10} {'cold s':>9} {'cold err':>9} {'calibrated s':>13} {'cal err':>8}"]
    for r in rows:
        cold_err = r["cold_s"] / r["measured_s"] - 1
        cal_err = r["calibrated_s"] / r["measured_s"] - 1
        lines.append(f"{r['label']:<18} {r['measured_s']:10.4f} {r['cold_s']:9.4f} {cold_err:+9.1%} "
                     f"{r['calibrated_s']:13.4f} {cal_err:+8.1%}")
    worst = max(abs(r["calibrated_s"] / r["measured_s"] - 1) for r in rows[1:]) if len(rows) > 1 else 0.0
    lines.append(f"worst calibrated error on the predicted cases: {worst:.1%} "
                 f"(calibration factor {rows[0]['calibration_factor']:.3f} from '{rows[0]['label']}')")
    lines.append(f"device {device.name}; model {args.model}; seq {args.seq_len}; micro-batch {args.micro_batch}; "
                 f"{args.steps} measured steps per case")
    return "\n".join(lines)


def versions():
    import deepspeed
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "deepspeed": deepspeed.__version__, "machine": platform.machine(), "processor": platform.processor()}


def main():
    make_console_safe()
    args = parse_args()
    rows, device = run(args)
    print(ascii_safe(render(rows, args, device)))
    if args.json:
        data = {"command": " ".join(sys.argv), "device": device.name, "versions": versions(), "cases": rows,
                "date": time.strftime("%Y-%m-%d")}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
