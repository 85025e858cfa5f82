"""Side by side on one GPU: our trainer (through `bash launch/train_*.sh`) against the stack users run today
(bench/hf_baseline.py: HF Trainer + PEFT + SDPA), same random-init model shape, same data, same tokens per optimizer
step, same precision (a benchmark, not a test).

    python bench/bench.py --json docs/benchmarks/bench_h200.json              # Llama-3-8B shape, seq 2048, mb 2
    python bench/bench.py --model builtin:small-llama --seq-len 256 --steps 6 --cases hf-gc,ours,ours-gc   # CPU
    python bench/bench.py --model random:qwen2.5-32b --micro-batch 1 --grad-accum 4 --cases ours,hf-liger,ours-qlora
    python bench/bench.py --cases ours,ours-packed,ours-packed-flex        # packed instruction data (issue 31)
    python bench/bench.py --reuse docs/benchmarks/X.json --json Y.json     # re-predict a run's cases (no runs)

Cases (default: all but hf, ours-mb2x and ours-full-bucket5e8; --budget keeps the call inside a device call):
  hf-gc       baseline with gradient checkpointing (what most users run)
  hf-liger    baseline + Liger's kernels (TrainingArguments use_liger_kernel=True), no checkpointing
  hf          baseline without gradient checkpointing
  ours        our defaults: gradient_checkpointing auto (off where it fits), liger_kernel, engine and compile_layers
              auto (on a GPU: Liger, the ddp engine, compiled decoder layers)
  ours-deepspeed  ours with engine: deepspeed (ZeRO-2): the engine's share
  ours-eager  ours with engine: deepspeed and compile_layers: false (the trainer before issue 20)
  ours-gc     ours with gradient checkpointing forced on (compare with hf-gc at equal memory)
  ours-mb2x   ours with twice the micro-batch and half the accumulation (same tokens per optimizer step)
  ours-qlora  QLoRA (NF4, double quant) with our defaults: step time against `ours`
  ours-z3     LoRA under DeepSpeed ZeRO-3 (engine: deepspeed, zero3_gather: layer, compiled layers): against ours
  ours-fsdp2  LoRA sharded by FSDP2 (zero_stage 3, engine: fsdp2, compiled layers): step time against ours
  ours-qlora-fsdp2  QLoRA sharded by FSDP2 (4-bit weights stored in bf16): step time against ours-qlora
  ours-full-fsdp2   full fine-tune of --full-model sharded by FSDP2 (fp32 masters): MFU
  ours-z3-keep    ours-z3 with stage3_max_live_parameters / max_reuse_distance 1e11 (nothing re-gathered in backward)
  ours-z3-prefetch  ours-z3 with stage3_prefetch_bucket_size 1e9
  ours-z3-module  LoRA under ZeRO-3 gathered module by module, eager (the trainer before zero3_gather)
  ours-full   full fine-tune of --full-model (a shape that fits one GPU) with our defaults (one process: the ddp
              engine, compiled layers): MFU
  ours-full-deepspeed  the same with engine: deepspeed (ZeRO-2; the trainer before)
  ours-full-bucket5e8   the same with DeepSpeed's reduce_bucket_size at 5e8 elements (DeepSpeed's own default)
  ours-packed ours on packed instruction data: a Dolly-like file with real lengths (bench/benchlib.py:
              write_instruction_corpus; several examples a row, none attending to another: SDPA with a block-diagonal
              mask); tokens/s counts the rows' real tokens
  ours-packed-flex  ours-packed with attn_implementation: flex_attention (FlexAttention with a document mask: the
              blocks between examples are skipped, no mask is materialised)
  ours-grouped  ours with moe_lora_kernel: grouped (a mixture of experts: the experts' LoRA on the activations
              through grouped GEMMs instead of peft's full-size weight per forward)
  ours-grouped-gc  ours-grouped with gradient checkpointing forced on
  ours-grouped-compiled  ours-grouped with compile_layers: true (each layer compiled, its experts left eager)
Beside each of our cases: the estimator's cold prediction for the same run config (step time, and peak memory
without the margin against the reserved peak), as the launcher's pre-flight makes it.
Mixture of experts (issue 30, one H200, ~7 minutes: `bash bench/moe_h200.sh`):
    python bench/bench.py --model random:qwen3-30b-a3b --seq-len 2048 --micro-batch 1 --grad-accum 4 \
        --cases ours-grouped,hf-gc,ours,hf-liger --profile ours-grouped,hf-gc --budget 450 --json OUT.json
--profile CASE[,CASE]: those cases run 3 more steps under torch.profiler (not measured); the summary (wall vs kernel
time, GPU busy fraction, top kernels and CPU ops, syncs and launches: finetune_launcher/profiling.py) goes into the
case's row. FLOP accounting (MFU = model FLOPs per second / the GPU's dense bf16 peak from
finetune_launcher/estimate/gpu_table.json): per token 6N (full) or 4N (LoRA: forward 2N, input gradients 2N; frozen
weights get no weight gradient) with N all parameters (a mixture of experts: the weights one token multiplies, its
active experts, router and lm_head), plus attention 12 x layers x seq x the attention width (heads x head_dim;
PaLM's convention, no causal discount); recomputation by gradient checkpointing is not counted.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (REPO, build_models, launch_decisions, log_tail, measured, predict,  # noqa: E402
                            record_case, run_hf_baseline, run_launcher, versions, write_instruction_corpus, write_json,
                            write_text_corpus)
from finetune_launcher.console import ascii_safe, make_console_safe  # noqa: E402
from finetune_launcher.profiling import PROFILE_ENV, STEPS_ENV  # noqa: E402

WARMUP = 3
CASES = ("hf-gc", "hf-liger", "hf", "ours", "ours-deepspeed", "ours-eager", "ours-gc", "ours-mb2x", "ours-qlora",
         "ours-z3", "ours-z3-keep", "ours-z3-prefetch", "ours-z3-module", "ours-full", "ours-full-deepspeed",
         "ours-full-bucket5e8", "ours-packed", "ours-packed-flex", "ours-fsdp2", "ours-qlora-fsdp2",
         "ours-full-fsdp2", "ours-grouped", "ours-grouped-gc", "ours-grouped-compiled")
PACKED_EXAMPLES = 3000  # Dolly-like examples written for the packed cases (about 1,700 rows of 2048 tokens)
# each case's step time against another's: (case, against, key, what the ratio says)
STEP_RATIOS = (("ours-qlora", "ours", "step_time_vs_ours_lora", "QLoRA step time / our LoRA step time"),
               ("ours-z3", "ours", "step_time_vs_zero2", "LoRA DeepSpeed ZeRO-3 step time / unsharded"),
               ("ours-fsdp2", "ours", "step_time_vs_unsharded", "LoRA FSDP2 step time / unsharded"),
               ("ours-qlora-fsdp2", "ours-qlora", "step_time_vs_unsharded", "QLoRA FSDP2 step time / unsharded"),
               ("ours-full-fsdp2", "ours-full", "step_time_vs_unsharded", "full FSDP2 step time / one-process ddp"),
               ("ours-z3-keep", "ours", "step_time_vs_zero2", "LoRA ZeRO-3, nothing re-gathered / ZeRO-2"),
               ("ours-z3-prefetch", "ours", "step_time_vs_zero2", "LoRA ZeRO-3, 1e9 prefetch / ZeRO-2"),
               ("ours-z3-module", "ours-eager", "step_time_vs_zero2", "LoRA ZeRO-3 per module / ZeRO-2, both eager"),
               ("ours-full", "ours-full-deepspeed", "step_time_vs_deepspeed",
                "full fine-tune step time, ddp / deepspeed"),
               ("ours-grouped", "ours", "step_time_vs_peft_kernel",
                "MoE LoRA step time, moe_lora_kernel grouped / peft"),
               ("ours-grouped-compiled", "ours-grouped", "step_time_vs_eager_layers",
                "MoE LoRA step time, layers compiled (experts eager) / eager layers"))
# tokens/s of a case against another's: (case, against, key, what the ratio says)
RATE_RATIOS = (("ours-packed", "ours", "tokens_per_s_vs_text_blocks", "packed (SDPA) tokens/s / text blocks"),
               ("ours-packed-flex", "ours", "tokens_per_s_vs_text_blocks", "packed (flex) tokens/s / text blocks"),
               ("ours-packed-flex", "ours-packed", "tokens_per_s_vs_sdpa", "packed: flex / SDPA tokens/s"))
# the targets' cases first: with --budget, the last ones are the ones skipped
DEFAULT_CASES = ("hf-gc", "hf-liger", "ours", "ours-gc", "ours-z3", "ours-full", "ours-qlora", "ours-z3-module",
                 "ours-full-deepspeed", "ours-eager")
PROFILED_STEPS = 3
HF_BASELINES = ("hf-gc", "hf-liger")  # the two ratio columns


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3-8b")
    p.add_argument("--full-model", default="random:qwen2.5-3b")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help=f"measured: the steps after the first {WARMUP}")
    p.add_argument("--cases", default=",".join(DEFAULT_CASES))
    p.add_argument("--profile", default="", metavar="CASE[,CASE]", help="profile these cases (3 extra steps)")
    p.add_argument("--work-dir", default=".cache/bench")
    p.add_argument("--case-timeout", type=int, default=180)
    p.add_argument("--budget", type=int, default=500, help="seconds for all cases: a case starts only with at "
                                                          "least 60 s left, and never runs past the budget")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--reuse", metavar="FILE", help="re-predict an earlier --json's cases with today's estimator "
                                                   "(no runs; the packed corpus is written again, same seed)")
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


def run_ours(args, corpus, name, timeout, **change):
    config = our_config(args, corpus, **change)
    profiled = name in args.profile.split(",")
    env = {}
    if profiled:
        profile_file = (Path(args.work_dir) / name / "profile.json").resolve()
        profile_file.unlink(missing_ok=True)
        config["max_steps"] = args.steps + PROFILED_STEPS
        env = {PROFILE_ENV: str(profile_file), STEPS_ENV: f"{args.steps + 1}-{args.steps + PROFILED_STEPS}"}
    code, history, wall, log = run_launcher(config, Path(args.work_dir) / name, 1, timeout=timeout, env=env,
                                            stop_after_step=config["max_steps"])
    got = measured(history, WARMUP, last=args.steps) if history and code == 0 else None
    row = {"case": name, "stack": "finetune-launcher", "exit_code": code, "wall_s": round(wall, 1),
           "config": config}
    if got is None:
        return dict(row, error=log_tail(log))
    row.update(launch_decisions(log))
    records = [r for r in history["records"] if r["step"] <= args.steps]
    row["losses"] = [r["loss"] for r in records]
    row["tokens_per_step"] = args.micro_batch * args.grad_accum * args.seq_len
    row["nonpad_fraction"] = sorted(r["nonpad_fraction"] for r in records)[len(records) // 2]
    row["data"] = {k: v for k, v in history["metadata"].get("data", {}).items() if not isinstance(v, (list, dict))}
    if profiled and profile_file.exists():
        row["profile"] = json.loads(profile_file.read_text())
    return dict(row, **got)


def run_hf(args, corpus, name, timeout, checkpointing=False, liger=False):
    out = Path(args.work_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(REPO / "bench" / "hf_baseline.py"), "--model", args.model, "--data", str(corpus),
           "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--grad-accum",
           str(args.grad_accum), "--steps", str(args.steps), "--warmup", str(WARMUP), "--lora-r", str(args.lora_r),
           "--json", str(out / "result.json")] + (["--gradient-checkpointing"] if checkpointing else []) + \
        (["--liger"] if liger else []) + (["--profile", str(out / "profile.json")]
                                          if name in args.profile.split(",") else [])
    row = run_hf_baseline(cmd, out, name, timeout)
    if "error" not in row and "--profile" in cmd and (out / "profile.json").exists():
        row["profile"] = json.loads((out / "profile.json").read_text())
    return row


def ds_file_with(args, base="zero2", **zero_settings):
    """A copy of ds_configs/<base>.json with some zero_optimization values set (as a user's --deepspeed file)."""
    data = json.loads((REPO / "ds_configs" / f"{base}.json").read_text())
    data["zero_optimization"].update(zero_settings)
    path = Path(args.work_dir) / (f"{base}_" + "_".join(f"{k}{v:g}" for k, v in zero_settings.items()) + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path.resolve()


def model_flops_per_token(model_ref, mode, seq_len):
    from finetune_launcher.estimate import count_params, load_architecture, RunSpec

    arch = load_architecture(model_ref)
    spec = RunSpec(model=model_ref, mode=mode, max_length=seq_len)
    counts = count_params(arch, spec)
    n = counts.matmul_per_token if arch.is_moe else counts.total
    attention = 12 * arch.num_hidden_layers * seq_len * arch.q_width
    return (6 if mode == "full" else 4) * n + attention


def add_estimates(rows, device):
    """The estimator's cold prediction beside each of our cases (memory without the margin; the HF baseline has no
    run config)."""
    for r in rows:
        if "tokens_per_s" not in r or r.get("stack") != "finetune-launcher":
            continue
        result = predict(r["config"], 1, device, {})
        r["estimate"] = {"step_time_cold_s": result.step_time_s, "peak_gib": result.peak_bytes / 2**30,
                         "gradient_checkpointing": result.spec.gradient_checkpointing,
                         "memory_terms_gib": {k: v / 2**30 for k, v in result.breakdown.items()},
                         "step_time_terms_s": dict(result.timing["terms"])}
        r["estimate"]["step_time_error"] = result.step_time_s / r["step_time_s"] - 1
        if r.get("peak_reserved_gib"):
            r["estimate"]["peak_error"] = r["estimate"]["peak_gib"] / r["peak_reserved_gib"] - 1
    return rows


def add_ratios(rows, args, device):
    peak = device.peak_flops("bf16") if device.kind != "cpu" else device.peak_flops("fp32")
    by_name = {r["case"]: r for r in rows}
    for r in rows:
        if "tokens_per_s" not in r:
            continue
        mode = r.get("config", {}).get("mode", "lora")
        model = r.get("config", {}).get("model", args.model)
        r["model_flops_per_token"] = model_flops_per_token(model, mode, args.seq_len)
        r["mfu"] = r["model_flops_per_token"] * r["tokens_per_s"] / peak
        r["peak_gib"] = r.get("peak_reserved_gib")
        for base in HF_BASELINES:
            base_rate = by_name.get(base, {}).get("tokens_per_s")
            if base_rate and not r["case"].startswith("ours-full"):
                r[f"vs_{base.replace('-', '_')}"] = r["tokens_per_s"] / base_rate
    for case, against, key, _ in STEP_RATIOS:
        if "step_time_s" in by_name.get(case, {}) and "step_time_s" in by_name.get(against, {}):
            by_name[case][key] = by_name[case]["step_time_s"] / by_name[against]["step_time_s"]
    for case, against, key, _ in RATE_RATIOS:
        if "tokens_per_s" in by_name.get(case, {}) and "tokens_per_s" in by_name.get(against, {}):
            by_name[case][key] = by_name[case]["tokens_per_s"] / by_name[against]["tokens_per_s"]
    return rows


def render(rows, args, device):
    lines = [f"{'case':<16} {'stack':<18} {'s/step':>7} {'tok/s':>8} {'MFU':>6} {'x hf-liger':>10} {'x hf-gc':>8} "
             f"{'peak GiB':>9} {'est s':>6} {'err':>5} {'est GiB':>7} {'err':>5} {'loss first->last':>17}"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"{r['case']:<16} {r['stack']:<18} {r.get('skipped') or 'FAILED (exit %s)' % r['exit_code']}")
            continue
        losses = r.get("losses") or [float("nan")]
        nan = float("nan")
        est = r.get("estimate", {})
        lines.append(f"{r['case']:<16} {r['stack']:<18} {r['step_time_s']:7.3f} {r['tokens_per_s']:8,.0f} "
                     f"{r['mfu']:6.1%} {r.get('vs_hf_liger', nan):10.2f} "
                     f"{r.get('vs_hf_gc', nan):8.2f} {r.get('peak_reserved_gib') or nan:9.1f} "
                     f"{est.get('step_time_cold_s', nan):6.3f} {est.get('step_time_error', nan):+5.0%} "
                     f"{est.get('peak_gib', nan):7.1f} {est.get('peak_error', nan):+5.0%} "
                     f"{losses[0]:8.3f}->{losses[-1]:.3f}")
    by_name = {r["case"]: r for r in rows}
    for case, _, key, what in STEP_RATIOS + RATE_RATIOS:
        if key in by_name.get(case, {}):
            lines.append(f"{what}: {by_name[case][key]:.2f}")
    for r in rows:
        if "profile" in r:
            prof = r["profile"]
            lines.append(f"profile {r['case']}: {prof['wall_s_per_step']:.3f} s/step wall, kernels "
                         f"{prof['kernel_s'] / prof['steps']:.3f} s/step, "
                         f"GPU busy {prof['gpu_busy_fraction'] or 0:.0%}")
    lines.append(f"device {device.name}; LoRA model {args.model} r={args.lora_r} all linears; seq {args.seq_len}; "
                 f"micro-batch {args.micro_batch} x accumulation {args.grad_accum}; {args.steps} steps, median after "
                 f"{WARMUP}; peak = max reserved; est: the estimator cold (memory without margin)")
    return "\n".join(lines)


def runners(args, corpus, packed_corpus=None):
    """name -> function(timeout) -> row."""
    packed = lambda: dict(dataset=str(packed_corpus()), dataset_format="dolly")  # noqa: E731 - written when run
    full = dict(mode="full", model=args.full_model)
    bucket = lambda: str(ds_file_with(args, reduce_bucket_size=5e8))  # noqa: E731 - written only when run
    # ZeRO-3 keeping every parameter gathered for the forward until its backward (no re-gather in the backward)
    z3_keep = lambda: str(ds_file_with(args, "zero3", stage3_max_live_parameters=1e11,  # noqa: E731
                                       stage3_max_reuse_distance=1e11))
    z3_prefetch = lambda: str(ds_file_with(args, "zero3", stage3_prefetch_bucket_size=1e9))  # noqa: E731
    return {
        "hf-gc": lambda t: run_hf(args, corpus, "hf-gc", t, checkpointing=True),
        "hf-liger": lambda t: run_hf(args, corpus, "hf-liger", t, liger=True),
        "hf": lambda t: run_hf(args, corpus, "hf", t),
        "ours": lambda t: run_ours(args, corpus, "ours", t),
        "ours-deepspeed": lambda t: run_ours(args, corpus, "ours-deepspeed", t, engine="deepspeed"),
        "ours-eager": lambda t: run_ours(args, corpus, "ours-eager", t, engine="deepspeed", compile_layers=False),
        "ours-gc": lambda t: run_ours(args, corpus, "ours-gc", t, gradient_checkpointing=True),
        "ours-mb2x": lambda t: run_ours(args, corpus, "ours-mb2x", t, micro_batch_size=2 * args.micro_batch,
                                        gradient_accumulation_steps=max(1, args.grad_accum // 2)),
        "ours-qlora": lambda t: run_ours(args, corpus, "ours-qlora", t, mode="qlora"),
        "ours-z3": lambda t: run_ours(args, corpus, "ours-z3", t, zero_stage=3, engine="deepspeed"),
        "ours-fsdp2": lambda t: run_ours(args, corpus, "ours-fsdp2", t, zero_stage=3, engine="fsdp2"),
        "ours-qlora-fsdp2": lambda t: run_ours(args, corpus, "ours-qlora-fsdp2", t, mode="qlora", zero_stage=3,
                                               engine="fsdp2"),
        "ours-full-fsdp2": lambda t: run_ours(args, corpus, "ours-full-fsdp2", t, **full, zero_stage=3, engine="fsdp2"),
        "ours-z3-keep": lambda t: run_ours(args, corpus, "ours-z3-keep", t, zero_stage=3,
                                           deepspeed_config=z3_keep()),
        "ours-z3-prefetch": lambda t: run_ours(args, corpus, "ours-z3-prefetch", t, zero_stage=3,
                                               deepspeed_config=z3_prefetch()),
        "ours-z3-module": lambda t: run_ours(args, corpus, "ours-z3-module", t, zero_stage=3, zero3_gather="module",
                                             engine="deepspeed",
                                             compile_layers=False),
        "ours-full": lambda t: run_ours(args, corpus, "ours-full", t, **full),
        "ours-full-deepspeed": lambda t: run_ours(args, corpus, "ours-full-deepspeed", t, **full, engine="deepspeed"),
        "ours-full-bucket5e8": lambda t: run_ours(args, corpus, "ours-full-bucket5e8", t, **full,
                                                  deepspeed_config=bucket()),
        "ours-packed": lambda t: run_ours(args, corpus, "ours-packed", t, **packed()),
        "ours-packed-flex": lambda t: run_ours(args, corpus, "ours-packed-flex", t, **packed(),
                                               attn_implementation="flex_attention"),
        "ours-grouped": lambda t: run_ours(args, corpus, "ours-grouped", t, moe_lora_kernel="grouped"),
        "ours-grouped-gc": lambda t: run_ours(args, corpus, "ours-grouped-gc", t, moe_lora_kernel="grouped",
                                              gradient_checkpointing=True),
        "ours-grouped-compiled": lambda t: run_ours(args, corpus, "ours-grouped-compiled", t,
                                                    moe_lora_kernel="grouped", compile_layers=True),
    }


def packed_corpus(args):
    """The Dolly-like file of the packed cases (written once under --work-dir; its token lengths beside it)."""
    path = Path(args.work_dir) / "instructions.jsonl"
    if not path.exists():
        _, lengths = write_instruction_corpus(path, PACKED_EXAMPLES, args.model)
        lengths.sort()
        stats = {"examples": len(lengths), "mean_tokens": sum(lengths) / len(lengths),
                 **{f"p{q}_tokens": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (10, 50, 90, 99)},
                 "max_tokens": lengths[-1], "note": "tokens of instruction + context + response, before the template"}
        write_json(stats, path.with_suffix(".stats.json"))
    return path.resolve()


def prepare_models(args, cases):
    """The random shapes' directories before any case (QLoRA's 4-bit weights too are built where it trains)."""
    models = [args.model] + ([args.full_model] if any(c.startswith("ours-full") for c in cases) else [])
    print(f"models ready ({build_models(models):.0f} s)", flush=True)


def reuse(args):
    """Re-predict the cases of an earlier --json (measured on its device) with today's estimator."""
    from finetune_launcher.estimate import resolve_device

    data = json.loads(Path(args.reuse).read_text())
    for key, value in data.get("settings", {}).items():
        if key not in ("reuse", "json"):
            setattr(args, key, value)
    rows = data["cases"]
    for r in rows:
        r.pop("estimate", None)
        if r.get("config", {}).get("dataset_format") == "dolly":  # the same file again, here
            r["config"]["dataset"] = str(packed_corpus(args))
    device = resolve_device(data["device"])
    rows = add_ratios(add_estimates(rows, device), args, device)
    print(ascii_safe(render(rows, args, device)))
    if args.json:
        write_json(dict(data, cases=rows, reused_from=args.reuse, repredicted=time.strftime("%Y-%m-%d")), args.json)
    return 0


def main():
    make_console_safe()
    args = parse_args()
    if args.reuse:
        return reuse(args)
    cases = args.cases.split(",")
    unknown = [c for c in cases + [c for c in args.profile.split(",") if c] if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    started = time.time()
    from finetune_launcher.estimate import detect_device

    device = detect_device(1)
    rows_needed = (args.steps + PROFILED_STEPS + 2) * args.micro_batch * args.grad_accum
    corpus = write_text_corpus(Path(args.work_dir) / "corpus.jsonl", words=rows_needed * args.seq_len)
    prepare_models(args, cases)
    run = runners(args, corpus, lambda: packed_corpus(args))
    rows = []
    for i, name in enumerate(cases, 1):
        left = args.budget - (time.time() - started)
        if left < 60:
            rows.append({"case": name, "stack": "-", "exit_code": None, "skipped": f"skipped ({left:.0f} s of the "
                         f"{args.budget} s budget left)"})
            print(f"[{i}/{len(cases)}] {name}: {rows[-1]['skipped']}", flush=True)
            continue
        print(f"[{i}/{len(cases)}] {name} ... ({time.time() - started:.0f} s so far)", flush=True)
        record_case(rows, run[name](int(min(args.case_timeout, left))), f"[{i}/{len(cases)}] {name}", args, device)
    rows = add_ratios(add_estimates(rows, device), args, device)
    print(ascii_safe(render(rows, args, device)))
    if args.json:
        stats = Path(args.work_dir) / "instructions.stats.json"
        write_json({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "device": device.name,
                    "versions": versions(), "total_s": round(time.time() - started, 1), "settings": vars(args),
                    "packed_corpus": json.loads(stats.read_text()) if stats.exists() else None, "cases": rows},
                   args.json)
    return 0 if all("tokens_per_s" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
