"""Every mode and ZeRO stage through the real launchers on this machine's GPUs, with the estimator's cold and
calibrated predictions beside what was measured (a benchmark, not a test).

    python bench/gpu_matrix.py --json docs/benchmarks/gpu_matrix_h200.json          # one device call
    python bench/gpu_matrix.py --model builtin:small-llama --seq-len 256 --steps 6   # the same on a CPU
    python bench/gpu_matrix.py --preset eight-gpu --json docs/benchmarks/eight_gpu_h200x8.json   # the 32B shapes

Preset eight-gpu (every GPU of the machine, or 2 CPU processes): the Qwen2.5-32B shape built under zero.Init on the
GPUs for ZeRO-3 (no checkpoint on disk; QLoRA builds its 4-bit model on each GPU one decoder layer at a time):
LoRA r=64 ZeRO-2 and ZeRO-3, QLoRA r=8, full fine-tune ZeRO-3 with a checkpoint at step 10 and a resumed run from
it; the consolidated save and the resume are timed from the history's `saves`.

Cases (1 GPU): LoRA, QLoRA and full fine-tune under ZeRO-2 and ZeRO-3, LoRA ZeRO-2 in fp16 with dynamic loss
scaling, and LoRA / full ZeRO-2 at twice the micro-batch (what of the step is host time and what device time);
with 2 or more GPUs also LoRA ZeRO-2 and full ZeRO-3 on 2. Each case runs `bash launch/train_<mode>.sh` for
--steps steps on a random-init model of a real shape (random:ARCH builds it on the GPU: nothing downloaded),
with a synthetic text corpus that fills every row. Measured: the median step time and tokens/s after the warm-up
steps, and the largest peak of allocated and reserved GPU memory over the ranks. Predicted: the estimator cold
(no calibration) and calibrated leave-one-out (the factor is the median of the factors fitted on the other cases of
the same precision, so no case predicts itself); memory without the margin. Every case runs the DeepSpeed engine
with eager layers (`engine: deepspeed`, `compile_layers: false`: what the estimator models; bench/bench.py measures
the switches). A run is ended once its last step is recorded (no final save is timed), and --budget (default 520 s)
skips the cases that would not fit one device call.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (log_tail, measured, predict, run_launcher, versions, write_json,  # noqa: E402
                            write_text_corpus)
from finetune_launcher.console import ascii_safe, make_console_safe  # noqa: E402

WARMUP = 3
ALL = 0  # every GPU of the machine (2 processes on a CPU)
# name -> (processes, run-config changes); "_resumes": run again in that case's directory, resuming
MATRIX = {
    "lora-z2": (1, {"mode": "lora", "zero_stage": 2}),
    "lora-z3": (1, {"mode": "lora", "zero_stage": 3}),
    "qlora-z2": (1, {"mode": "qlora", "zero_stage": 2, "gradient_checkpointing": True}),
    "qlora-z3": (1, {"mode": "qlora", "zero_stage": 3, "gradient_checkpointing": True}),
    "full-z2": (1, {"mode": "full", "zero_stage": 2}),
    "full-z3": (1, {"mode": "full", "zero_stage": 3}),
    "lora-z2-fp16": (1, {"mode": "lora", "zero_stage": 2, "precision": "fp16"}),
    # twice the tokens per step: a host-bound step barely moves, a device-bound one doubles
    "lora-z2-mb8": (1, {"mode": "lora", "zero_stage": 2, "micro_batch_size": 8}),
    "full-z2-mb8": (1, {"mode": "full", "zero_stage": 2, "micro_batch_size": 8}),
    "lora-z2-2gpu": (2, {"mode": "lora", "zero_stage": 2}),
    "full-z3-2gpu": (2, {"mode": "full", "zero_stage": 3}),
}
EIGHT_GPU = {  # gradient checkpointing as the trainer decides by default (off where the estimate fits)
    "lora-r64-z2": (ALL, {"mode": "lora", "lora_r": 64, "lora_alpha": 128, "zero_stage": 2}),
    "lora-r64-z3": (ALL, {"mode": "lora", "lora_r": 64, "lora_alpha": 128, "zero_stage": 3}),
    "qlora-r8-z2": (ALL, {"mode": "qlora", "lora_r": 8, "lora_alpha": 16, "zero_stage": 2}),
    "full-z3": (ALL, {"mode": "full", "zero_stage": 3, "save_steps": 10}),
    "full-z3-resume": (ALL, {"mode": "full", "zero_stage": 3, "save_steps": 10, "resume": "always",
                             "_resumes": "full-z3", "_extra_steps": 5}),
}
PRESETS = {"matrix": dict(cases=MATRIX, model="random:qwen2.5-1.5b", micro_batch=4, steps=20),
           "eight-gpu": dict(cases=EIGHT_GPU, model="random:qwen2.5-32b", micro_batch=1, steps=12)}
CASES = {**MATRIX, **EIGHT_GPU}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="matrix")
    p.add_argument("--model", help="default: the preset's (random:qwen2.5-1.5b; eight-gpu: random:qwen2.5-32b)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, help="default: the preset's (4; eight-gpu: 1)")
    p.add_argument("--steps", type=int, help="default: the preset's (20; eight-gpu: 12)")
    p.add_argument("--cases", help=f"comma list of {', '.join(CASES)} (default: the preset's that fit the GPUs)")
    p.add_argument("--work-dir", default=".cache/gpu_matrix")
    p.add_argument("--case-timeout", type=int, default=300)
    p.add_argument("--budget", type=int, default=520, help="seconds for all cases: a case starts only with at least "
                                                           "60 s left, and never runs past the budget")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--reuse", metavar="FILE", help="re-predict from an earlier --json's measurements (no runs)")
    args = p.parse_args()
    for key in ("model", "micro_batch", "steps"):
        if getattr(args, key) is None:
            setattr(args, key, PRESETS[args.preset][key])
    return args


def base_config(args, corpus):
    return {"model": args.model, "dataset": str(corpus), "dataset_format": "text", "max_length": args.seq_len,
            "micro_batch_size": args.micro_batch, "gradient_accumulation_steps": 1, "lora_r": 16, "lora_alpha": 32,
            "lora_dropout": 0.0, "lora_target_modules": "all-linear", "gradient_checkpointing": False,
            "packing": True, "eval_fraction": 0.0, "max_steps": args.steps, "num_epochs": 1,
            "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_steps": 0, "logging_steps": 1,
            "save_steps": 100000, "save_total_limit": 1, "precision": "auto", "seed": 0,
            # the estimator's modes and stages as calibrated; the issue-20 switches are measured by bench/bench.py
            "engine": "deepspeed", "compile_layers": False}


def available_gpus():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def chosen_cases(args):
    if args.cases:
        unknown = [c for c in args.cases.split(",") if c not in CASES]
        if unknown:
            sys.exit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
        return args.cases.split(",")
    gpus = available_gpus()
    return [name for name, (procs, _) in PRESETS[args.preset]["cases"].items()
            if procs == ALL or (procs <= max(gpus, 1) and not (gpus == 0 and procs > 1))]


def processes(procs):
    if procs != ALL:
        return procs
    import os

    return available_gpus() or int(os.environ.get("FTL_CPU_PROCS", "2"))


def run_cases(args, names, on_case=lambda rows: None):
    work = Path(args.work_dir)
    tokens_needed = (args.steps + 2) * args.seq_len * args.micro_batch * 2
    corpus = write_text_corpus(work / "corpus.jsonl", words=tokens_needed)  # >= 1 token per word
    results = []
    started = time.time()
    for name in names:
        procs, change = CASES[name]
        procs = processes(procs)
        config = {**base_config(args, corpus), **change}
        if name in EIGHT_GPU:
            config["gradient_checkpointing"] = "auto"
        resumes, extra = config.pop("_resumes", None), config.pop("_extra_steps", 0)
        config["max_steps"] += extra
        t0 = time.time()
        left = args.budget - (time.time() - started)
        if left < 60:
            print(f"{name}: skipped ({left:.0f} s of the {args.budget} s budget left)", flush=True)
            results.append({"case": name, "processes": procs, "config": config, "exit_code": None,
                            "skipped": True})
            continue
        saves = config["save_steps"] <= config["max_steps"]  # else nothing after the last step is measured
        code, history, wall, log = run_launcher(config, work / (resumes or name), procs,
                                                timeout=int(min(args.case_timeout, left)),
                                                log_name=f"{name}.log" if resumes else "train.log",
                                                stop_after_step=None if saves else config["max_steps"])
        row = {"case": name, "processes": procs, "config": config, "exit_code": code, "wall_s": round(wall, 1)}
        if history:
            row["saves"] = history.get("saves", [])
            row["resumed_at_steps"] = history["metadata"].get("resumed_at_steps")
        got = measured(history, WARMUP) if history and code == 0 else None
        if got is None:
            row["error"] = log_tail(log)
            print(ascii_safe(f"{name}: FAILED (exit {code}) after {time.time() - t0:.0f} s\n{row['error']}"),
                  flush=True)
        else:
            row.update(got, precision=history["metadata"]["precision"])
            print(ascii_safe(f"{name}: {got['step_time_s']:.3f} s/step, {got['tokens_per_s']:,.0f} tokens/s, "
                             f"peak {got['peak_reserved_gib']} GiB reserved ({wall:.0f} s)"), flush=True)
        results.append(row)
        on_case(results)
    return results


def add_predictions(rows):
    from finetune_launcher.estimate import detect_device, fit_calibration, resolve_device

    for row in rows:
        if "step_time_s" not in row:
            continue
        # --reuse: predict for the device the measurement was made on, not this machine
        device = resolve_device(row["device"], row["processes"]) if row.get("device") else \
            detect_device(row["processes"])
        cold = predict(row["config"], row["processes"], device, {})
        row["device"] = device.name
        row["cold_step_time_s"] = cold.step_time_s
        row["predicted_peak_gib"] = cold.peak_bytes / 2**30
        row["factor"] = fit_calibration(cold, row["step_time_s"], row["case"])["factor"]
        row["_cold"] = cold
    for row in rows:
        if "_cold" not in row:
            continue
        fitted = [r for r in rows if "_cold" in r and r is not row]
        # Same precision where there is one; the fp16 case borrows bf16's (same tensor-core rate on these GPUs).
        others = [r["factor"] for r in fitted if r["precision"] == row["precision"]] or [r["factor"] for r in fitted]
        if not others:
            continue
        cold = row["_cold"]
        key = f"{cold.device.name}/{cold.precision}"
        factor = sorted(others)[len(others) // 2] if len(others) % 2 else \
            sum(sorted(others)[len(others) // 2 - 1:len(others) // 2 + 1]) / 2  # median: one odd case can't skew it
        calibrated = predict(row["config"], row["processes"], cold.device, {key: {"factor": factor}})
        row["calibrated_step_time_s"] = calibrated.step_time_s
    for row in rows:
        row.pop("_cold", None)
    return rows


def render(rows, args):
    head = (f"{'case':<14} {'GPUs':>4} {'s/step':>7} {'tok/s':>8} {'cold s':>7} {'err':>6} {'calib s':>7} "
            f"{'err':>6} {'alloc':>6} {'resv':>6} {'pred':>6} {'err':>6}")
    lines = [head]
    for r in rows:
        if "step_time_s" not in r:
            lines.append(f"{r['case']:<14} {r['processes']:>4} {'skipped' if r.get('skipped') else 'FAILED'} "
                         f"(exit {r['exit_code']})")
            continue
        m = r["step_time_s"]
        cal = r.get("calibrated_step_time_s")
        resv = r.get("peak_reserved_gib")
        pred = r["predicted_peak_gib"]
        lines.append(
            f"{r['case']:<14} {r['processes']:>4} {m:7.3f} {r['tokens_per_s']:8,.0f} {r['cold_step_time_s']:7.3f} "
            f"{r['cold_step_time_s'] / m - 1:+6.0%} {cal if cal else float('nan'):7.3f} "
            f"{(cal / m - 1) if cal else float('nan'):+6.0%} {r.get('peak_allocated_gib') or float('nan'):6.1f} "
            f"{resv or float('nan'):6.1f} {pred:6.1f} {(pred / resv - 1) if resv else float('nan'):+6.0%}")
    for r in rows:
        if r.get("saves"):
            timed = ", ".join(f"{e['what']} at step {e['step']} {e['seconds']:.1f} s" for e in r["saves"])
            resumed = f" (resumed at step {r['resumed_at_steps'][-1]})" if r.get("resumed_at_steps") else ""
            lines.append(f"saves {r['case']}{resumed}: {timed}")
    lines.append(f"model {args.model}, seq {args.seq_len}, micro-batch {args.micro_batch}, {args.steps} steps "
                 f"({WARMUP} warm-up); memory in GiB (alloc/resv: measured peak, pred: estimator without margin; "
                 f"err vs reserved)")
    return "\n".join(lines)


def save(args, rows):
    """Written after every case too, so a run cut short still leaves its measurements."""
    if args.json:
        write_json({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "versions": versions(),
                    "gpus": available_gpus(), "cases": rows}, args.json)


def main():
    make_console_safe()
    args = parse_args()
    if args.reuse:
        import json

        rows = [r for r in json.loads(Path(args.reuse).read_text())["cases"]]
        for row in rows:  # measured before the trainer had Liger's kernels
            row["config"].setdefault("liger_kernel", False)
    else:
        rows = run_cases(args, chosen_cases(args), on_case=lambda done: save(args, done))
    rows = add_predictions(rows)
    print(ascii_safe(render(rows, args)))
    save(args, rows)
    return 0 if all("step_time_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
