"""Vision-language side by side on one GPU: our VL recipe (through `bash launch/train_lora.sh`) against HF Trainer +
PEFT (bench/hf_baseline.py --vl-data) on a random-init Qwen2.5-VL-3B shape and the shipped synthetic pictures
(data/tiny_vl, resized by the processor to --image-side pixels square: (side / 28)^2 image tokens each), LoRA r=16 on
the language model's linears, the vision tower frozen, bf16 (a benchmark, not a test).

    python bench/bench_vl.py --json docs/benchmarks/bench_vl_h200.json
    python bench/bench_vl.py --shape tiny --image-side 64 --steps 5 --cases hf,ours     # the same on a CPU

    # a user's run config at its real shape (issue 31): the Qwen3-VL-32B QLoRA in fp16, on synthetic pictures
    python bench/bench_vl.py --model random:qwen3-vl-32b --config configs/qwen3-vl-32b_qlora_v100_fp16.yaml \
        --pictures 64 --picture-size 768x768 --steps 6 --cases ours,hf --json out.json

Cases: hf (HF Trainer + PEFT, no checkpointing), hf-liger (+ use_liger_kernel=True), ours (our defaults: Liger,
compiled language-model layers, checkpointing as the estimate decides). tokens/s counts the non-pad tokens of each
step, image tokens included, on both sides; rows vary in length, so the median of the measured steps is compared.

With --config (a run config YAML; --model random:ARCH, built where it trains, nothing on disk): `ours` is that config
through the launcher as written (mode, precision, LoRA rank/targets/dropout, max_length, pixel bounds, micro-batch,
accumulation, checkpointing, ZeRO stage) but for the data (--pictures synthetic pictures of --picture-size, each with
a question and an answer of tens of words), no evaluation or mixed datasets, a constant learning rate and --steps
steps; `hf` is HF Trainer + PEFT with the same settings (QLoRA: peft's k-bit preparation; fp16: the Trainer's
GradScaler). fp16 rows record the loss scale of every step (DeepSpeed's dynamic scaler, the Trainer's GradScaler).
Beside `ours`: the estimator's cold prediction for that run config.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (REPO, build_models, launch_decisions, log_tail, measured, one_token_words,  # noqa: E402
                            predict, record_case, run_hf_baseline, run_launcher, versions, write_json)
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
    p.add_argument("--model", help="random:ARCH (e.g. random:qwen3-vl-32b) instead of building --shape's directory")
    p.add_argument("--config", help="a run config YAML whose settings both stacks use (see above)")
    p.add_argument("--pictures", type=int, default=0, help="synthetic pictures (rows) to write instead of --data")
    p.add_argument("--picture-size", default="768x768", help="WxH of the synthetic pictures")
    p.add_argument("--reuse", metavar="FILE", help="re-predict an earlier --json's cases with today's estimator (no "
                                                   "runs; the synthetic pictures are written again, same seed)")
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


# run-config keys of a user's file that the benchmark replaces (its data, evaluation and schedule)
NOT_KEPT = ("run_name", "dataset", "eval_dataset", "mix_datasets", "eval_fraction", "lr_scheduler", "plateau_factor",
            "plateau_patience", "improvement_threshold", "min_lr", "min_eval_loss", "warmup_ratio", "warmup_steps",
            "eval_steps", "save_steps", "logging_steps", "max_steps", "num_epochs", "output_dir")


def our_config(args, model_dir):
    config = {"mode": "lora", "model": str(model_dir), "dataset": args.data, "eval_fraction": 0.0,
              "max_length": args.max_length, "micro_batch_size": args.micro_batch,
              "gradient_accumulation_steps": args.grad_accum, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
              "lora_target_modules": "all-linear", "max_steps": args.steps, "num_epochs": 1, "learning_rate": 1e-4,
              "lr_scheduler": "constant", "warmup_steps": 0, "logging_steps": 1, "save_steps": 100000,
              "eval_steps": 100000, "precision": "auto", "seed": 0, "zero_stage": 2}
    if args.config:
        import yaml

        user = yaml.safe_load(Path(args.config).read_text())
        config.update({k: v for k, v in user.items() if k not in NOT_KEPT}, model=str(model_dir))
    return config


def run_ours(args, model_dir, timeout):
    config = our_config(args, model_dir)
    shutil.rmtree(Path(args.work_dir) / "ours" / "run", ignore_errors=True)  # a fresh run, never a resumed one
    code, history, wall, log = run_launcher(config, Path(args.work_dir) / "ours", 1, timeout=timeout,
                                            stop_after_step=args.steps)
    row = {"case": "ours", "stack": "finetune-launcher", "exit_code": code, "wall_s": round(wall, 1), "config": config}
    got = measured(history, WARMUP, last=args.steps) if history and code == 0 else None
    if got is None:
        return dict(row, error=log_tail(log))
    row.update(launch_decisions(log))
    records = [r for r in history["records"] if r["step"] <= args.steps]
    row["losses"] = [r["loss"] for r in records]
    row["engine"] = history["metadata"].get("engine")
    if any("loss_scale" in r for r in records):
        row["loss_scales"] = [r.get("loss_scale") for r in records]
        row["skipped_steps"] = [r["step"] for r in records if r.get("step_skipped")]
    row["data"] = {k: v for k, v in history["metadata"].get("data", {}).items() if not isinstance(v, (list, dict))}
    return dict(row, **got)


def run_hf(args, model_dir, name, timeout):
    out = Path(args.work_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    c = our_config(args, model_dir)
    targets = c["lora_target_modules"]
    cmd = [sys.executable, str(REPO / "bench" / "hf_baseline.py"), "--model", str(model_dir), "--vl-data", args.data,
           "--seq-len", str(c["max_length"]), "--micro-batch", str(c["micro_batch_size"]), "--grad-accum",
           str(c["gradient_accumulation_steps"]), "--steps", str(args.steps), "--warmup", str(WARMUP),
           "--lora-r", str(c["lora_r"]), "--lora-dropout", str(c["lora_dropout"]),
           "--lora-targets", targets if isinstance(targets, str) else ",".join(targets),
           "--json", str(out / "result.json")] + (["--liger"] if name == "hf-liger" else [])
    if args.config:
        cmd += (["--qlora"] if c["mode"] == "qlora" else []) + (["--fp16"] if c.get("precision") == "fp16" else []) + \
            (["--gradient-checkpointing"] if c.get("gradient_checkpointing") is True else []) + \
            (["--max-pixels", str(c["max_pixels"])] if c.get("max_pixels") else [])
    row = run_hf_baseline(cmd, out, name, timeout)
    if "tokens_per_s" in row:
        row["config"] = {k: c[k] for k in ("mode", "precision", "lora_r", "lora_target_modules", "max_length",
                                           "micro_batch_size", "gradient_accumulation_steps") if k in c}
    return row


def write_pictures(args):
    """--pictures synthetic pictures of --picture-size (JPEG: shapes on a noisy gradient) with a question and an
    answer of tens of words each, as image + text conversations (data/tiny_vl's format); returns the JSONL path."""
    import random

    import numpy as np
    from PIL import Image, ImageDraw

    out = Path(args.work_dir).resolve() / f"pictures-{args.pictures}-{args.picture_size}"
    target = out / "train.jsonl"
    if target.exists():
        return str(target)
    (out / "images").mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.picture_size.lower().split("x"))
    rng = random.Random(0)
    words = one_token_words(args.model or "builtin:tiny-qwen3-vl")
    lines = []
    for i in range(args.pictures):
        base = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8) // 4
        base += np.linspace(0, 180, width, dtype=np.uint8)[None, :, None]
        picture = Image.fromarray(base)
        draw = ImageDraw.Draw(picture)
        for _ in range(6):
            x, y = rng.randrange(width), rng.randrange(height)
            r = rng.randrange(width // 16, width // 4)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
        name = f"images/pic_{i:04d}.jpg"
        picture.save(out / name, quality=90)
        question = " ".join(rng.choice(words) for _ in range(rng.randint(12, 40)))
        answer = " ".join(rng.choice(words) for _ in range(rng.randint(30, 120)))
        lines.append(json.dumps({"messages": [{"role": "user", "content": "<image>" + question},
                                              {"role": "assistant", "content": answer}], "images": [name]}))
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(target)


def reuse(args):
    """Re-predict the cases of an earlier --json (measured on its device) with today's estimator."""
    from finetune_launcher.estimate import resolve_device

    data = json.loads(Path(args.reuse).read_text())
    for key, value in data.get("settings", {}).items():
        if key not in ("reuse", "json", "work_dir"):
            setattr(args, key, value)
    if args.pictures:
        args.data = write_pictures(args)
    rows = data["cases"]
    for r in rows:
        r.pop("estimate", None)
        if r.get("stack") == "finetune-launcher" and "config" in r:
            r["config"]["dataset"] = args.data
    rows = add_estimates(rows, resolve_device(data["device"]))
    for r in rows:
        est = r.get("estimate")
        if est:
            print(ascii_safe(f"{r['case']}: {r['step_time_s']:.3f} s/step measured, {est['step_time_cold_s']:.3f} "
                             f"predicted ({est['step_time_error']:+.0%}); peak {r.get('peak_reserved_gib')} GiB "
                             f"reserved, {est['peak_gib']:.1f} predicted ({est.get('peak_error', float('nan')):+.0%})"))
    if args.json:
        write_json(dict(data, cases=rows, reused_from=args.reuse, repredicted=time.strftime("%Y-%m-%d")), args.json)
    return 0


def add_estimates(rows, device):
    for r in rows:
        if r.get("stack") == "finetune-launcher" and "tokens_per_s" in r:
            result = predict(r["config"], 1, device, {})
            r["estimate"] = {"step_time_cold_s": result.step_time_s, "peak_gib": result.peak_bytes / 2**30,
                             "gradient_checkpointing": result.spec.gradient_checkpointing,
                             "memory_terms_gib": {k: v / 2**30 for k, v in result.breakdown.items()},
                             "step_time_terms_s": dict(result.timing["terms"]),
                             "step_time_error": result.step_time_s / r["step_time_s"] - 1}
            if r.get("peak_reserved_gib"):
                r["estimate"]["peak_error"] = r["estimate"]["peak_gib"] / r["peak_reserved_gib"] - 1
    return rows


def main():
    make_console_safe()
    args = parse_args()
    if args.reuse:
        return reuse(args)
    started = time.time()
    from finetune_launcher.estimate import detect_device

    device = detect_device(1)
    if args.model:  # random:ARCH: its directory (config, tokenizer, processor) now, the weights where it trains
        build_models([args.model])
        model_dir = args.model
    else:
        model_dir = build_model(args)
    if args.pictures:
        args.data = write_pictures(args)
    print(f"model ready: {model_dir} ({time.time() - started:.0f} s)", flush=True)
    rows = []
    for name in args.cases.split(","):
        row = run_ours(args, model_dir, args.case_timeout) if name == "ours" else \
            run_hf(args, model_dir, name, args.case_timeout)
        record_case(rows, row, name, args, device)
    rows = add_estimates(rows, device)
    by_name = {r["case"]: r for r in rows}
    for r in rows:
        for base in ("hf", "hf-liger"):
            if "tokens_per_s" in r and "tokens_per_s" in by_name.get(base, {}):
                r[f"vs_{base.replace('-', '_')}"] = r["tokens_per_s"] / by_name[base]["tokens_per_s"]
    for r in rows:
        if "tokens_per_s" in r:
            est = r.get("estimate", {})
            scales = r.get("loss_scales") or []
            print(ascii_safe(f"{r['case']:<9} {r['step_time_s']:.3f} s/step {r['tokens_per_s']:9,.0f} tokens/s "
                             f"x hf {r.get('vs_hf', float('nan')):.2f} x hf-liger "
                             f"{r.get('vs_hf_liger', float('nan')):.2f} peak {r.get('peak_reserved_gib') or 0:.1f} "
                             f"GiB; est {est.get('step_time_cold_s', float('nan')):.3f} s "
                             f"{est.get('peak_gib', float('nan')):.1f} GiB; losses "
                             f"{' '.join(f'{x:.3f}' for x in r.get('losses') or [])}"
                             + (f"; loss scales {' '.join(f'{x:g}' for x in scales if x is not None)}"
                                if scales else "")))
    if args.json:
        write_json({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "shape": args.model or args.shape,
                    "image_side": args.image_side, "device": device.name, "versions": versions(),
                    "total_s": round(time.time() - started, 1), "settings": vars(args), "cases": rows}, args.json)
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
