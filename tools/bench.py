"""Side by side on one GPU: our trainer (through `bash launch/train_*.sh`) against the stack users run today
(tools/hf_baseline.py: HF Trainer + PEFT + SDPA), same random-init model shape, same data, same tokens per optimizer
step, same precision (a benchmark, not a test).

    python tools/bench.py --json docs/benchmarks/bench_h200.json              # Llama-3-8B shape, seq 2048, mb 2
    python tools/bench.py --model builtin:small-llama --seq-len 256 --steps 6 --cases hf-gc,ours,ours-gc   # CPU

Cases:
  hf-gc       baseline with gradient checkpointing (what most users run)
  hf          baseline without gradient checkpointing
  ours        our defaults: gradient_checkpointing auto (off where it fits), liger_kernel auto (on a GPU)
  ours-gc     ours with gradient checkpointing forced on (compare with hf-gc at equal memory)
  ours-mb2x   ours with twice the micro-batch and half the accumulation (same tokens per optimizer step)
  ours-qlora  QLoRA (NF4, double quant) with our defaults: step time against `ours`
  ours-full   full fine-tune of --full-model (a shape that fits one GPU with ZeRO-2): MFU
  ours-full-bucket5e8   the same with DeepSpeed's reduce_bucket_size at 5e8 elements (DeepSpeed's own default)
FLOP accounting (MFU = model FLOPs per second / the GPU's dense bf16 peak from train/estimate/gpu_table.json): per token
6N (full) or 4N (LoRA: forward 2N, input gradients 2N; frozen weights get no weight gradient) with N all
parameters, plus attention 12 x layers x seq x hidden (PaLM's convention, no causal discount); recomputation by
gradient checkpointing is not counted.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.benchlib import (REPO, log_tail, measured, run_launcher, versions, write_json,  # noqa: E402
                            write_text_corpus)
from train.console import ascii_safe, make_console_safe  # noqa: E402

WARMUP = 3
CASES = ("hf-gc", "hf", "ours", "ours-gc", "ours-mb2x", "ours-qlora", "ours-full", "ours-full-bucket5e8")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3-8b")
    p.add_argument("--full-model", default="random:qwen2.5-3b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--work-dir", default=".cache/bench")
    p.add_argument("--case-timeout", type=int, default=300)
    p.add_argument("--json", metavar="FILE")
    return p.parse_args()


def our_config(args, corpus, **change):
    config = {"mode": "lora", "model": args.model, "dataset": str(corpus), "dataset_format": "text",
              "max_length": args.seq_len, "micro_batch_size": args.micro_batch,
              "gradient_accumulation_steps": args.grad_accum, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r,
              "lora_dropout": 0.0, "lora_target_modules": "all-linear", "packing": True, "eval_fraction": 0.0,
              "max_steps": args.steps, "num_epochs": 1, "learning_rate": 1e-4, "lr_scheduler": "constant",
              "warmup_steps": 0, "logging_steps": 1, "save_steps": 100000, "save_total_limit": 1,
              "precision": "auto", "seed": 0, "zero_stage": 2}
    config.update(change)
    return config


def run_ours(args, corpus, name, **change):
    config = our_config(args, corpus, **change)
    code, history, wall, log = run_launcher(config, Path(args.work_dir) / name, 1, timeout=args.case_timeout)
    got = measured(history, WARMUP) if history and code == 0 else None
    row = {"case": name, "stack": "finetune-launcher", "exit_code": code, "wall_s": round(wall, 1),
           "config": config}
    if got is None:
        return dict(row, error=log_tail(log))
    text = Path(log).read_text(encoding="utf-8", errors="replace")
    row["gradient_checkpointing"] = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                                          if line.startswith("gradient checkpointing:")), None)
    row["losses"] = [r["loss"] for r in history["records"]]
    row["tokens_per_step"] = args.micro_batch * args.grad_accum * args.seq_len
    return dict(row, **got)


def run_hf(args, corpus, name, checkpointing):
    out = Path(args.work_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "tools" / "hf_baseline.py"), "--model", args.model, "--data", str(corpus),
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(WARMUP), "--lora-r", str(args.lora_r),
           "--json", str(out / "result.json")] + (["--gradient-checkpointing"] if checkpointing else [])
    t0 = time.time()
    with open(out / "train.log", "w", encoding="utf-8") as f:
        try:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=args.case_timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    row = {"case": name, "stack": "HF Trainer + PEFT", "exit_code": code, "wall_s": round(time.time() - t0, 1),
           "command": " ".join(cmd)}
    if code != 0 or not (out / "result.json").exists():
        return dict(row, error=log_tail(out / "train.log"))
    return dict(row, **json.loads((out / "result.json").read_text()))


def ds_file_with(args, **zero_settings):
    """A copy of ds_configs/zero2.json with some zero_optimization values set (as a user's --deepspeed file)."""
    data = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    data["zero_optimization"].update(zero_settings)
    path = Path(args.work_dir) / ("zero2_" + "_".join(f"{k}{v:g}" for k, v in zero_settings.items()) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path.resolve()


def model_flops_per_token(model_ref, mode, seq_len):
    from train.estimate import count_params, load_architecture, RunSpec

    arch = load_architecture(model_ref)
    spec = RunSpec(model=model_ref, mode=mode, seq_len=seq_len)
    n = count_params(arch, spec).total
    attention = 12 * arch.num_hidden_layers * seq_len * arch.hidden_size
    return (6 if mode == "full" else 4) * n + attention


def add_ratios(rows, args):
    from train.estimate import detect_device

    device = detect_device(1)
    peak = device.peak_flops("bf16") if device.kind != "cpu" else device.peak_flops("fp32")
    by_name = {r["case"]: r for r in rows}
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        mode = r.get("config", {}).get("mode", "lora")
        model = r.get("config", {}).get("model", args.model)
        r["model_flops_per_token"] = model_flops_per_token(model, mode, args.seq_len)
        r["mfu"] = r["model_flops_per_token"] * r["tokens_per_s"] / peak
    base = by_name.get("hf-gc", {}).get("tokens_per_s")
    for r in rows:
        r["peak_gib"] = r.get("peak_reserved_gib")
        if base and "tokens_per_s" in r and r["case"] not in ("ours-full", "ours-full-bucket5e8"):
            r["vs_hf_gc"] = r["ratio_vs_baseline"] = r["tokens_per_s"] / base
    ours = by_name.get("ours", {}).get("step_time_s")
    if ours and "step_time_s" in by_name.get("ours-qlora", {}):
        by_name["ours-qlora"]["step_time_vs_ours_lora"] = by_name["ours-qlora"]["step_time_s"] / ours
    return rows, device


def render(rows, args, device):
    lines = [f"{'case':<11} {'stack':<18} {'s/step':>7} {'tok/s':>8} {'MFU':>6} {'x hf-gc':>8} {'peak GiB':>9} "
             f"{'loss first->last':>17}"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"{r['case']:<11} {r['stack']:<18} FAILED (exit {r['exit_code']})")
            continue
        losses = r.get("losses") or [float("nan")]
        lines.append(f"{r['case']:<11} {r['stack']:<18} {r['step_time_s']:7.3f} {r['tokens_per_s']:8,.0f} "
                     f"{r['mfu']:6.1%} {r.get('vs_hf_gc', float('nan')):8.2f} "
                     f"{r.get('peak_reserved_gib') or float('nan'):9.1f} {losses[0]:8.3f}->{losses[-1]:.3f}")
    qlora = next((r for r in rows if "step_time_vs_ours_lora" in r), None)
    if qlora:
        lines.append(f"QLoRA step time / our LoRA step time: {qlora['step_time_vs_ours_lora']:.2f}")
    lines.append(f"device {device.name}; LoRA model {args.model} r={args.lora_r} all linears; seq {args.seq_len}; "
                 f"micro-batch {args.micro_batch} x accumulation {args.grad_accum}; {args.steps} steps, median after "
                 f"{WARMUP}; peak = max reserved")
    return "\n".join(lines)


def main():
    make_console_safe()
    args = parse_args()
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    rows_needed = (args.steps + 2) * args.micro_batch * args.grad_accum
    corpus = write_text_corpus(Path(args.work_dir) / "corpus.jsonl", words=rows_needed * args.seq_len)
    runners = {"hf-gc": lambda: run_hf(args, corpus, "hf-gc", True),
               "hf": lambda: run_hf(args, corpus, "hf", False),
               "ours": lambda: run_ours(args, corpus, "ours"),
               "ours-gc": lambda: run_ours(args, corpus, "ours-gc", gradient_checkpointing=True),
               "ours-qlora": lambda: run_ours(args, corpus, "ours-qlora", mode="qlora"),
               "ours-mb2x": lambda: run_ours(args, corpus, "ours-mb2x", micro_batch_size=2 * args.micro_batch,
                                             gradient_accumulation_steps=max(1, args.grad_accum // 2)),
               "ours-full": lambda: run_ours(args, corpus, "ours-full", mode="full", model=args.full_model),
               "ours-full-bucket5e8": lambda: run_ours(args, corpus, "ours-full-bucket5e8", mode="full",
                                                       model=args.full_model,
                                                       deepspeed_config=str(ds_file_with(args, reduce_bucket_size=5e8)))}
    rows = []
    for name in cases:
        row = runners[name]()
        rows.append(row)
        status = (f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_time_s']:.3f} s/step" if "tokens_per_s" in row
                  else f"FAILED (exit {row['exit_code']})\n{row.get('error', '')}")
        print(ascii_safe(f"{name}: {status} ({row['wall_s']:.0f} s)"), flush=True)
        if args.json:
            write_json({"command": " ".join(sys.argv), "partial": True, "cases": rows}, args.json)
    rows, device = add_ratios(rows, args)
    print(ascii_safe(render(rows, args, device)))
    if args.json:
        write_json({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "device": device.name,
                    "versions": versions(), "cases": rows}, args.json)
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
