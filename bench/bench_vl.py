"""Vision-language side by side on one GPU: our VL recipe (through `bash launch/train_lora.sh`) against HF Trainer +
PEFT (tools/hf_baseline.py --vl-data) on a random-init Qwen2.5-VL-3B shape and the shipped synthetic pictures
(data/tiny_vl, resized by the processor to --image-side pixels square: (side / 28)^2 image tokens each), LoRA r=16 on
the language model's linears, the vision tower frozen, bf16 (a benchmark, not a test).

    python tools/bench_vl.py --json docs/benchmarks/bench_vl_h200.json
    python tools/bench_vl.py --shape tiny --image-side 64 --steps 5 --cases hf,ours     # the same on a CPU

Cases: hf (HF Trainer + PEFT, no checkpointing), hf-liger (+ use_liger_kernel=True), ours (our defaults: Liger,
compiled language-model layers, checkpointing as the estimate decides). tokens/s counts the non-pad tokens of each
step, image tokens included, on both sides; rows vary in length, so the median of the measured steps is compared.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (REPO, launch_decisions, log_tail, measured, run_hf_baseline, run_launcher,  # noqa: E402
                            versions, write_json)
from finetune_launcher.console import ascii_safe, make_console_safe  # noqa: E402

WARMUP = 3
CASES = ("hf", "hf-liger", "ours")
SHAPES = {  # vl_config keyword arguments (finetune_launcher/recipes/vision_language/tiny.py)
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, max_position_embeddings=32768, vocab_size=151936),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                    out_hidden_size=2048, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        rope_theta=1e6, mrope_section=(16, 24, 24), tie_word_embeddings=True),
    "tiny": {},
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-vl-3b")
    p.add_argument("--image-side", type=int, default=448, help="pixels; a multiple of patch x merge (28; tiny: 16)")
    p.add_argument("--data", default=str(REPO / "data" / "tiny_vl" / "train.jsonl"))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help=f"measured: the steps after the first {WARMUP}")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--work-dir", default=".cache/bench_vl")
    p.add_argument("--case-timeout", type=int, default=200)
    p.add_argument("--json", metavar="FILE")
    return p.parse_args()


def build_model(args):
    """The shape's directory (config, bf16 random weights made on the GPU, tokenizer, processor bounded to the
    image side), built once under --work-dir."""
    import torch

    from finetune_launcher.recipes.vision_language.tiny import build_vl_directory

    target = Path(args.work_dir).resolve() / f"{args.shape}-{args.image_side}px"
    if not (target / "config.json").exists():
        cuda = torch.cuda.is_available()
        pixels = (args.image_side ** 2, args.image_side ** 2)
        build_vl_directory("qwen2.5-vl", target, SHAPES[args.shape], pixels,
                           "bfloat16" if cuda else "float32", "cuda" if cuda else "cpu")
    return target


def run_ours(args, model_dir, timeout):
    config = {"mode": "lora", "model": str(model_dir), "dataset": args.data, "eval_fraction": 0.0,
              "max_length": args.max_length, "micro_batch_size": args.micro_batch,
              "gradient_accumulation_steps": args.grad_accum, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
              "lora_target_modules": "all-linear", "max_steps": args.steps, "num_epochs": 1, "learning_rate": 1e-4,
              "lr_scheduler": "constant", "warmup_steps": 0, "logging_steps": 1, "save_steps": 100000,
              "eval_steps": 100000, "precision": "auto", "seed": 0, "zero_stage": 2}
    shutil.rmtree(Path(args.work_dir) / "ours" / "run", ignore_errors=True)  # a fresh run, never a resumed one
    code, history, wall, log = run_launcher(config, Path(args.work_dir) / "ours", 1, timeout=timeout,
                                            stop_after_step=args.steps)
    row = {"case": "ours", "stack": "finetune-launcher", "exit_code": code, "wall_s": round(wall, 1), "config": config}
    got = measured(history, WARMUP, last=args.steps) if history and code == 0 else None
    if got is None:
        return dict(row, error=log_tail(log))
    row.update(launch_decisions(log))
    row["losses"] = [r["loss"] for r in history["records"] if r["step"] <= args.steps]
    return dict(row, **got)


def run_hf(args, model_dir, name, timeout):
    out = Path(args.work_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "bench" / "hf_baseline.py"), "--model", str(model_dir), "--vl-data", args.data,
           "--seq-len", str(args.max_length), "--micro-batch", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(WARMUP), "--json",
           str(out / "result.json")] + (["--liger"] if name == "hf-liger" else [])
    return run_hf_baseline(cmd, out, name, timeout)


def main():
    make_console_safe()
    args = parse_args()
    started = time.time()
    model_dir = build_model(args)
    print(f"model ready: {model_dir} ({time.time() - started:.0f} s)", flush=True)
    rows = []
    for name in args.cases.split(","):
        row = run_ours(args, model_dir, args.case_timeout) if name == "ours" else \
            run_hf(args, model_dir, name, args.case_timeout)
        rows.append(row)
        status = (f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_time_s']:.3f} s/step" if "tokens_per_s" in row
                  else f"FAILED (exit {row['exit_code']})\n{row.get('error', '')}")
        print(ascii_safe(f"{name}: {status} ({row['wall_s']:.0f} s)"), flush=True)
    by_name = {r["case"]: r for r in rows}
    for r in rows:
        for base in ("hf", "hf-liger"):
            if "tokens_per_s" in r and "tokens_per_s" in by_name.get(base, {}):
                r[f"vs_{base.replace('-', '_')}"] = r["tokens_per_s"] / by_name[base]["tokens_per_s"]
    for r in rows:
        if "tokens_per_s" in r:
            print(ascii_safe(f"{r['case']:<9} {r['step_time_s']:.3f} s/step {r['tokens_per_s']:9,.0f} tokens/s "
                             f"x hf {r.get('vs_hf', float('nan')):.2f} x hf-liger "
                             f"{r.get('vs_hf_liger', float('nan')):.2f} peak {r.get('peak_reserved_gib') or 0:.1f} "
                             f"GiB"))
    if args.json:
        write_json({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
                    "image_side": args.image_side, "versions": versions(), "total_s": round(time.time() - started, 1),
                    "cases": rows}, args.json)
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
