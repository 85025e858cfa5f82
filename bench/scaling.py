"""Scaling across the GPUs of one host: each engine's tokens/s on 1 and on 2 GPUs, through `bash launch/train_*.sh`
with torchrun, and scaling = 2-GPU tokens/s / 1-GPU tokens/s against the target (issue 32: at least 1.85x).
Weak scaling: every GPU keeps bench/bench.py's micro-batch and accumulation, so 2 GPUs train twice the tokens per
optimizer step; gradient checkpointing is pinned to what the 1-GPU run decides, so both runs do the same work per
token. A benchmark, not a test.

    python bench/scaling.py --budget 560 --json $OUT/scaling.json          # one device call, 2 GPUs of one host
    python bench/scaling.py --model builtin:tiny-llama --full-model builtin:tiny-llama --seq-len 128 --steps 5 \\
        --warmup 2 --min-case-s 20 --work-dir /tmp/scaling                   # the same on a CPU (2 processes)

Engines (bench/bench.py's shapes: Llama-3-8B LoRA r=16 on all linears; Qwen2.5-3B full fine-tune; seq 2048,
micro-batch 2 x accumulation 2 per GPU):
  lora-ddp     LoRA on the ddp engine (replicated weights, DDP's reducer)
  full-fsdp2   full fine-tune on the fsdp2 engine (zero_stage 3)
  full-zero3   full fine-tune on DeepSpeed ZeRO-3
  qlora-ddp    QLoRA (NF4) on the ddp engine
Each engine runs 1 GPU then 2 GPUs; --budget skips the cases that would overrun it (a case starts only with
--min-case-s left, and never runs past the budget), so the engines listed first are the ones measured. The JSON
(--json) is rewritten after every case. Beside each case: the estimator's cold prediction (bench.benchlib.prediction;
it has no model of the ddp and fsdp2 engines and predicts them as DeepSpeed ZeRO-2 and ZeRO-3).
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench import our_config  # noqa: E402 - bench.py's shapes are the cases'
from bench.benchlib import (build_models, launch_decisions, log_tail, measured, prediction, run_launcher,  # noqa: E402
                            this_machine_gpus, versions, write_json, write_text_corpus)
from finetune_launcher.console import ascii_safe, make_console_safe  # noqa: E402

TARGET = 1.85
GPU_COUNTS = (1, 2)
ENGINES = {  # name -> (what, run-config changes; "full" cases train --full-model)
    "lora-ddp": ("LoRA, ddp engine", {"mode": "lora", "engine": "ddp", "zero_stage": 2}),
    "full-fsdp2": ("full fine-tune, FSDP2", {"mode": "full", "engine": "fsdp2", "zero_stage": 3}),
    "full-zero3": ("full fine-tune, DeepSpeed ZeRO-3", {"mode": "full", "engine": "deepspeed", "zero_stage": 3}),
    "qlora-ddp": ("QLoRA, ddp engine", {"mode": "qlora", "engine": "ddp", "zero_stage": 2}),
}
CPU_NOTE = ("CPU: the processes share this machine's cores and talk over gloo, so these figures say nothing about "
            "GPU scaling; this run only shows that the script works end to end")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:llama-3-8b", help="the LoRA and QLoRA cases' model")
    p.add_argument("--full-model", default="random:qwen2.5-3b", help="the full fine-tune cases' model")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=2, help="per GPU")
    p.add_argument("--grad-accum", type=int, default=2, help="per GPU")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--target", type=float, default=TARGET)
    p.add_argument("--work-dir", default=".cache/scaling")
    p.add_argument("--case-timeout", type=int, default=200)
    p.add_argument("--budget", type=int, default=560, help="seconds for everything (the models' build too)")
    p.add_argument("--min-case-s", type=int, default=60, help="a case starts only with this much of the budget left")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    return args


def case_config(args, corpus, engine):
    """bench/bench.py's run config of this engine's case, the same for 1 and 2 GPUs."""
    change = dict(ENGINES[engine][1])
    if change["mode"] == "full":
        change["model"] = args.full_model
    return our_config(args, corpus, **change)


def pin_checkpointing(config):
    """Gradient checkpointing as the 1-GPU run decides it (auto: on only where the run would not fit without), set
    explicitly so the 2-GPU run, whose sharded states leave more room, does not switch it off."""
    if config.get("gradient_checkpointing", "auto") != "auto":
        return config
    from finetune_launcher.config import resolve_run_config

    resolved = resolve_run_config(None, config, procs_per_node=1, require_model=False)
    return dict(config, gradient_checkpointing=bool(resolved.gradient_checkpointing))


def run_case(args, config, engine, gpus, timeout, device_for):
    out = Path(args.work_dir) / f"{engine}-{gpus}gpu"
    code, history, wall, log = run_launcher(config, out, gpus, extra=("--launcher", "torchrun"), timeout=timeout,
                                            stop_after_step=args.steps)
    row = {"case": f"{engine} x{gpus}", "engine": engine, "gpus": gpus, "exit_code": code, "wall_s": round(wall, 1),
           "config": config, "predicted": prediction(config, gpus, device_for(gpus))}
    got = measured(history, args.warmup, last=args.steps) if history and code == 0 else None
    if got is None:
        return dict(row, error=log_tail(log))
    decisions = launch_decisions(log)
    decisions["engine_decision"] = decisions.pop("engine")  # "engine" names the case's engine
    row.update(decisions, **got, tokens_per_s_per_gpu=got["tokens_per_s"] / gpus)
    row["tokens_per_step"] = gpus * args.micro_batch * args.grad_accum * args.seq_len
    return row


def scaling_rows(rows, target):
    """Per engine: 1- and 2-GPU tokens/s, scaling = their ratio (None where a case has no figure) and whether it
    meets `target`; the estimator's ratio beside it."""
    by_case = {(r["engine"], r["gpus"]): r for r in rows}
    table = []
    for engine in dict.fromkeys(r["engine"] for r in rows):
        one, two = by_case.get((engine, 1), {}), by_case.get((engine, 2), {})
        entry = {"engine": engine, "what": ENGINES[engine][0], "target": target,
                 "tokens_per_s_1": one.get("tokens_per_s"), "tokens_per_s_2": two.get("tokens_per_s"),
                 "scaling": ratio(two.get("tokens_per_s"), one.get("tokens_per_s")),
                 "predicted_scaling": ratio(two.get("predicted", {}).get("tokens_per_s"),
                                            one.get("predicted", {}).get("tokens_per_s"))}
        entry["met"] = None if entry["scaling"] is None else entry["scaling"] >= target
        table.append(entry)
    return table


def ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def render(rows, table, args, device_name):
    lines = [f"{'case':<14} {'s/step':>7} {'tok/s':>9} {'tok/s/GPU':>9} {'peak GiB':>8} {'pred s':>7} "
             f"{'pred tok/s':>10} {'pred GiB':>8}  grad ckpt"]
    for r in rows:
        pred = r.get("predicted", {})
        if "tokens_per_s" not in r:
            lines.append(f"{r['case']:<14} {r.get('skipped') or 'FAILED (exit %s)' % r['exit_code']}")
            continue
        lines.append(f"{r['case']:<14} {r['step_time_s']:7.3f} {r['tokens_per_s']:9,.0f} "
                     f"{r['tokens_per_s_per_gpu']:9,.0f} {number(r.get('peak_reserved_gib'), 8, '.1f')} "
                     f"{number(pred.get('step_time_s'), 7, '.3f')} {number(pred.get('tokens_per_s'), 10, ',.0f')} "
                     f"{number(pred.get('peak_gib'), 8, '.1f')}  "
                     f"{'on' if r['config'].get('gradient_checkpointing') else 'off'}")
    lines.append("")
    lines.append(f"{'engine':<12} {'tok/s on 1':>11} {'tok/s on 2':>11} {'scaling':>8} {'target':>7} "
                 f"{'verdict':>8} {'predicted':>9}")
    for t in table:
        verdict = "-" if t["met"] is None else ("met" if t["met"] else "MISSED")
        lines.append(f"{t['engine']:<12} {number(t['tokens_per_s_1'], 11, ',.0f')} "
                     f"{number(t['tokens_per_s_2'], 11, ',.0f')} {times(t['scaling'], 8)} "
                     f"{times(t['target'], 7)} {verdict:>8} {times(t['predicted_scaling'], 9)}")
    lines.append(f"device {device_name}; weak scaling: per GPU micro-batch {args.micro_batch} x accumulation "
                 f"{args.grad_accum}, seq {args.seq_len}; LoRA/QLoRA {args.model} r={args.lora_r}, full "
                 f"{args.full_model}; {args.steps} steps, median after {args.warmup}; peak = max reserved over GPUs")
    if device_name == "cpu":
        lines.append(CPU_NOTE)
    return "\n".join(lines)


def number(value, width, spec):
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def times(value, width):
    return number(value, width - 1, ".2f") + "x" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def cases_of(engines):
    return [(engine, gpus) for engine in engines for gpus in GPU_COUNTS]


def main(argv=None):
    make_console_safe()
    args = parse_args(argv)
    started = time.time()
    gpus_here = this_machine_gpus()
    if 0 < gpus_here < max(GPU_COUNTS):
        sys.exit(f"error: this machine has {gpus_here} GPU(s); scaling needs {max(GPU_COUNTS)} GPUs of one host")
    from finetune_launcher.estimate import detect_device

    device_name = detect_device(1).name
    engines = args.engines.split(",")
    configs, build_s = prepare(args, engines)
    facts = {"date": time.strftime("%Y-%m-%d"), "device": device_name, "gpus_on_machine": gpus_here,
             "models_build_s": round(build_s, 1), **({"note": CPU_NOTE} if device_name == "cpu" else {})}
    rows = []
    for i, (engine, gpus) in enumerate(cases_of(engines), 1):
        rows.append(run_or_skip(args, configs[engine], engine, gpus, started, f"[{i}/{2 * len(engines)}]"))
        save(args, rows, dict(facts, partial=True, total_s=round(time.time() - started, 1)))
    print(ascii_safe(render(rows, scaling_rows(rows, args.target), args, device_name)))
    # the versions last: asking torch for the GPU's name starts CUDA in this process, which would hold memory on
    # GPU 0 beside the cases
    save(args, rows, dict(facts, partial=False, total_s=round(time.time() - started, 1), versions=versions()))
    return 0 if all("tokens_per_s" in r for r in rows) else 1


def prepare(args, engines):
    """The corpus, the models' directories and each engine's run config; the build's seconds."""
    tokens = (args.steps + 2) * max(GPU_COUNTS) * args.micro_batch * args.grad_accum * args.seq_len
    corpus = write_text_corpus(Path(args.work_dir) / "corpus.jsonl", words=tokens)  # >= 1 token per word
    full = any(ENGINES[e][1]["mode"] == "full" for e in engines)
    build_s = build_models([args.model] + ([args.full_model] if full else []))
    print(f"models ready ({build_s:.0f} s)", flush=True)
    return {engine: pin_checkpointing(case_config(args, corpus, engine)) for engine in engines}, build_s


def run_or_skip(args, config, engine, gpus, started, tag):
    from finetune_launcher.estimate import detect_device

    left = args.budget - (time.time() - started)
    name = f"{engine} x{gpus}"
    if left < args.min_case_s:
        row = {"case": name, "engine": engine, "gpus": gpus, "exit_code": None,
               "skipped": f"skipped ({left:.0f} s of the {args.budget} s budget left)"}
    else:
        print(f"{tag} {name} ... ({time.time() - started:.0f} s so far)", flush=True)
        row = run_case(args, config, engine, gpus, int(min(args.case_timeout, left)), detect_device)
    status = row.get("skipped") or (f"{row['tokens_per_s']:,.0f} tokens/s, {row['step_time_s']:.3f} s/step"
                                    if "tokens_per_s" in row else
                                    f"FAILED (exit {row['exit_code']})\n{row.get('error', '')}")
    print(ascii_safe(f"{tag} {name}: {status}"), flush=True)
    return row


def save(args, rows, facts):
    """The JSON, rewritten after every case, so a call cut short still returns what was measured."""
    if args.json:
        write_json({"command": " ".join(sys.argv), **facts, "target": args.target,
                    "scaling": scaling_rows(rows, args.target), "cases": rows}, args.json)


if __name__ == "__main__":
    sys.exit(main())
