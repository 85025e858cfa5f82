"""The users' big runs on every GPU of one host (issue 32: 8, or 4 where that is what is lent; the output says which),
each a random init of its real shape built on the GPUs (`random:`: nothing downloaded, no checkpoint on disk; QLoRA
quantised layer by layer as it is made), 20 steps through `bash launch/train_<mode>.sh`: step
time, tokens/s per GPU, peak memory per GPU and the estimator's prediction beside each; with --checkpoint, a save at
that size and two resumes of it (same GPUs, then half as many). A benchmark, not a test.

    python bench/big_runs.py --cases qwen2.5-32b-lora --checkpoint --json $OUT/big_32b_lora.json   # one device call
    python bench/big_runs.py --tiny --cases qwen2.5-32b-lora --checkpoint --set engine=ddp \\
        --work-dir /tmp/big_runs                   # the logic on a CPU: tiny models, 2 processes, a resume on 1

Cases (each the user's config of that run, with a synthetic text corpus that fills every row, no eval, precision and
gradient checkpointing as the trainer decides them (auto), logged every step):
  qwen2.5-32b-lora    configs/qwen2.5-32b_lora_8gpu.yaml (LoRA r=64), target 2,250 tokens/s per GPU
  qwen2.5-32b-qlora   configs/qwen2.5-32b_qlora_v100_fp16.yaml (QLoRA r=8; bf16 here, not the V100's fp16)
  qwen3-30b-a3b-lora  configs/qwen3-30b-a3b_lora_8gpu.yaml (LoRA r=16 on attention and experts)
  qwen3-30b-a3b-full  configs/qwen3-30b_full_zero3.yaml, target 12,040 tokens/s per GPU
Layout: the first the estimator says fits (with the pre-flight's margin): the config's own, then zero_stage 3 (the
fsdp2 engine; DeepSpeed for QLoRA), then for a full fine-tune ZeRO-3 with CPU offload (DeepSpeed).
--checkpoint (the first case named): its run saves at half its steps (without LoRA dropout, whose masks are drawn
per rank); that checkpoint is resumed on the same GPUs and on half as many (the global batch kept: twice the
accumulation), each to the last step, and the losses after the save are compared with the first run's. Only fsdp2's
and ddp's checkpoints resume on another count (DeepSpeed's do not: that resume is skipped, saying so); a checkpoint
bigger than the disk allows is not written (said so too).
--budget skips what would overrun one device call; the JSON is rewritten after every run.
"""
import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.benchlib import (REPO, build_models, launch_decisions, log_tail, measured, prediction,  # noqa: E402
                            run_launcher, this_machine_gpus, versions, write_json, write_text_corpus)
from finetune_launcher.console import ascii_safe, make_console_safe  # noqa: E402


@dataclass(frozen=True)
class Case:
    config: str                # the user's run config, relative to the repository
    model: str                 # the random shape built on the GPUs
    tiny_model: str = "builtin:tiny-llama"
    target_per_gpu: float = None
    target_source: str = None


CASES = {
    "qwen2.5-32b-lora": Case("configs/qwen2.5-32b_lora_8gpu.yaml", "random:qwen2.5-32b", target_per_gpu=2250,
                             target_source="NeMo AutoModel, 8 x H100"),
    "qwen2.5-32b-qlora": Case("configs/qwen2.5-32b_qlora_v100_fp16.yaml", "random:qwen2.5-32b"),
    "qwen3-30b-a3b-lora": Case("configs/qwen3-30b-a3b_lora_8gpu.yaml", "random:qwen3-30b-a3b",
                               tiny_model="builtin:tiny-qwen3-moe"),
    "qwen3-30b-a3b-full": Case("configs/qwen3-30b_full_zero3.yaml", "random:qwen3-30b-a3b",
                               tiny_model="builtin:tiny-qwen3-moe", target_per_gpu=12040,
                               target_source="NeMo AutoModel, 8 x H100, expert parallel"),
}
# what a benchmark changes in a user's config: our data, no eval, the trainer's own precision and checkpointing
BENCHMARK = {"dataset_format": "text", "eval_fraction": 0.0, "num_epochs": 1, "logging_steps": 1,
             "save_steps": 100000, "save_total_limit": 2, "precision": "auto", "gradient_checkpointing": "auto",
             "seed": 0}
DROPPED = ("run_name", "output_dir", "mix_datasets", "eval_steps")
TINY = {"max_length": 128, "gradient_accumulation_steps": 2}
WARMUP = 3
CHECKPOINT_BYTES_PER_TRAINABLE = 12  # fp32 weights (masters) and Adam's two moments; frozen weights are not saved
SAME_LOSS_TOLERANCE = 0.02  # relative: bf16 steps after a resume, reductions in another order on another count
RESHARDING_ENGINES = ("fsdp2", "ddp")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--steps", type=int, help="default 20 (--tiny: 4)")
    p.add_argument("--checkpoint", action="store_true", help="save at half the steps of the first case and resume "
                                                             "it on the same and on half as many GPUs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config value for every case (YAML value), before the layout is chosen")
    p.add_argument("--tiny", action="store_true", help="tiny models, seq 128, accumulation 2, 4 steps (a CPU check)")
    p.add_argument("--work-dir", default=".cache/big_runs")
    p.add_argument("--case-timeout", type=int, default=560)
    p.add_argument("--budget", type=int, default=570, help="seconds for everything (the models' build too)")
    p.add_argument("--min-case-s", type=int, default=120, help="a run starts only with this much of the budget left")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    args.steps = args.steps or (4 if args.tiny else 20)
    args.overrides = dict(parse_setting(p, text) for text in args.set)
    return args


def parse_setting(parser, text):
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        parser.error(f"--set {text}: write KEY=VALUE (--set engine=fsdp2)")
    return key, yaml.safe_load(value)


def case_config(args, name, corpus):
    """The user's config of this run with the benchmark's changes (--tiny: a tiny model of the same kind), or None
    when the config is not in this checkout."""
    import yaml

    from finetune_launcher import recipe_table

    case = CASES[name]
    path = REPO / case.config
    if not path.exists():
        return None
    config = {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in DROPPED}
    config.update(BENCHMARK, model=case.model, dataset=str(corpus), max_steps=args.steps)
    if args.tiny:
        builtin = case.tiny_model.removeprefix("builtin:")
        config.update(TINY, model=case.tiny_model if builtin in recipe_table.builtins() else "builtin:tiny-llama")
    return {**config, **args.overrides}


def choose_layout(config, fits):
    """(config, why): the first layout that `fits(config)` accepts: the config's own, zero_stage 3, and for a full
    fine-tune zero_stage 3 with CPU offload; the last one, saying so, when none does."""
    candidates = [("as configured", {}), ("sharded: zero_stage 3", {"zero_stage": 3})]
    if config["mode"] == "full":
        candidates.append(("sharded with CPU offload: zero_stage 3, offload", {"zero_stage": 3, "offload": True}))
    tried = []
    for why, change in candidates:
        candidate = {**config, **change}
        if candidate in [c for c, _ in tried]:
            continue
        tried.append((candidate, why))
        if fits(candidate):
            return candidate, f"{why} (the estimator: fits)"
    candidate, why = tried[-1]
    return candidate, f"{why} (the estimator: none fits; run anyway)"


def estimator_fits(nproc, device):
    from finetune_launcher.estimate.inputs import DEFAULT_MARGIN

    return lambda config: prediction(config, nproc, device, margin=DEFAULT_MARGIN).get("fits", False)


def measure(config, out, nproc, timeout, log_name="train.log"):
    """Run the config to its last step (then stop: final/ is not timed); a row of what it measured."""
    code, history, wall, log = run_launcher(config, out, nproc, timeout=timeout, log_name=log_name,
                                            stop_after_step=config["max_steps"])
    row = {"processes": nproc, "exit_code": code, "wall_s": round(wall, 1), "config": config,
           **launch_decisions(log)}
    row["resumed_at_step"] = resumed_at_step(log)
    if history:
        row["saves"] = history.get("saves", [])
        row["losses"] = {r["step"]: r["loss"] for r in history.get("records", []) if "loss" in r}
        row["steps_time_s"] = round(sum(r.get("step_time_s", 0) for r in history.get("records", [])), 1)
    got = measured(history, WARMUP) if history and code == 0 else None
    if got is None:
        return dict(row, error=log_tail(log))
    return dict(row, **got, tokens_per_s_per_gpu=got["tokens_per_s"] / nproc)


def resumed_at_step(log):
    """The step the run resumed from, as the trainer printed it (None: it started at step 0)."""
    found = re.search(r"^resumed from .* at step (\d+)$", Path(log).read_text(errors="replace"), re.MULTILINE)
    return int(found.group(1)) if found else None


def run_case(args, name, config, nproc, device, timeout, save=False):
    """One case on every GPU: the layout the estimator says fits, the run (`save`: a checkpoint at half its steps),
    the prediction and the target."""
    case = CASES[name]
    config, layout = choose_layout(config, estimator_fits(nproc, device))
    if save:
        config = dict(config, save_steps=args.steps // 2)
        if "lora_dropout" in config:  # drawn per rank: a resume on another count could not repeat the masks
            config["lora_dropout"] = 0.0
    print(ascii_safe(f"{name} on {nproc}: {layout} ..."), flush=True)
    row = measure(config, Path(args.work_dir) / name, nproc, timeout)
    row.update(case=name, run="measure", layout=layout, predicted=per_gpu(prediction(config, nproc, device), nproc))
    if case.target_per_gpu and "tokens_per_s_per_gpu" in row:
        row.update(target_per_gpu=case.target_per_gpu, target_source=case.target_source,
                   met=row["tokens_per_s_per_gpu"] >= case.target_per_gpu)
    return row


def per_gpu(predicted, nproc):
    if "tokens_per_s" in predicted:
        predicted["tokens_per_s_per_gpu"] = round(predicted["tokens_per_s"] / nproc, 1)
    return predicted


def checkpoint_room(config, nproc, device, work):
    """None when two checkpoints of this run fit the disk's free space, else why not."""
    trainable = prediction(config, nproc, device).get("params_trainable") or 0
    need = 2 * CHECKPOINT_BYTES_PER_TRAINABLE * trainable
    free = shutil.disk_usage(work).free
    if need <= 0.9 * free:
        return None
    return (f"two checkpoints of {trainable / 1e9:.1f}B trainable parameters take about {need / 1e9:.0f} GB "
            f"({CHECKPOINT_BYTES_PER_TRAINABLE} bytes each: fp32 weights and Adam's moments); the disk of "
            f"{work} has {free / 1e9:.0f} GB free")


def resume_runs(args, saved, nproc, timeout_left):
    """The saved run's checkpoint at half its steps, resumed to the last step on the same GPUs and on half as many
    (the global batch kept); each with the largest relative difference of its losses from the saved run's."""
    half, engine = args.steps // 2, (saved.get("engine") or "").split(" ")[0]
    rows = []
    for procs in dict.fromkeys((nproc, max(1, nproc // 2))):
        row = {"case": saved["case"], "run": f"resume on {procs}", "processes": procs, "exit_code": None}
        if procs != nproc and engine not in RESHARDING_ENGINES:
            rows.append(dict(row, skipped=f"the {engine} engine's checkpoints resume on the same number of "
                                          f"processes only (use engine fsdp2 or ddp)"))
            continue
        timeout, source = timeout_left(), Path(args.work_dir) / saved["case"] / "run"
        if timeout is None or not (source / "checkpoints" / f"step-{half}").is_dir():
            rows.append(dict(row, skipped="skipped: the budget is spent" if timeout is None else
                             f"skipped: the run wrote no checkpoint {source / 'checkpoints' / f'step-{half}'}"))
            continue
        out = Path(args.work_dir) / f"{saved['case']}-resume-{procs}"
        link_checkpoint(source, out / "run", half)
        config = dict(saved["config"], gradient_accumulation_steps=saved["config"]["gradient_accumulation_steps"]
                      * nproc // procs)
        print(f"{saved['case']}: resume of step {half} on {procs} ...", flush=True)
        got = measure(config, out, procs, timeout)
        got["loss_max_rel_diff"] = loss_difference(saved.get("losses", {}), got.get("losses", {}), half)
        got["same_losses"] = None if got["loss_max_rel_diff"] is None else \
            got.get("resumed_at_step") == half and got["loss_max_rel_diff"] <= SAME_LOSS_TOLERANCE
        got["launch_and_load_s"] = round(got["wall_s"] - got.get("steps_time_s", 0), 1)
        rows.append({**row, **got})
    return rows


def link_checkpoint(run_dir, new_run_dir, step):
    """A new run directory whose only checkpoint is `step` of `run_dir` (hard links: no copy of the bytes)."""
    source = run_dir / "checkpoints" / f"step-{step}"
    target = new_run_dir / "checkpoints"
    shutil.rmtree(new_run_dir, ignore_errors=True)
    shutil.copytree(source, target / source.name, copy_function=os.link)
    (target / "latest").write_text(f"{source.name}\n")


def loss_difference(reference, resumed, after):
    """The largest |resumed - reference| / |reference| over the steps after `after` both have (None: none)."""
    steps = [s for s in resumed if s > after and s in reference]
    return max((abs(resumed[s] - reference[s]) / abs(reference[s]) for s in steps), default=None)


def render(rows, nproc, device_name):
    lines = [f"{'case':<19} {'run':<12} {'GPUs':>4} {'engine':<9} {'s/step':>7} {'tok/s/GPU':>9} {'target':>7} "
             f"{'peak GiB':>8} {'pred s':>7} {'pred tok/s/GPU':>14} {'pred GiB':>8}"]
    for r in rows:
        head = f"{r['case']:<19} {r['run']:<12} {r.get('processes', nproc):>4}"
        if "tokens_per_s" not in r:
            lines.append(f"{head} {r.get('skipped') or 'FAILED (exit %s)' % r['exit_code']}")
            continue
        pred = r.get("predicted", {})
        lines.append(f"{head} {(r.get('engine') or '-').split(' ')[0]:<9} {r['step_time_s']:7.2f} "
                     f"{r['tokens_per_s_per_gpu']:9,.0f} {number(r.get('target_per_gpu'), 7, ',.0f')} "
                     f"{number(r.get('peak_reserved_gib'), 8, '.1f')} {number(pred.get('step_time_s'), 7, '.2f')} "
                     f"{number(pred.get('tokens_per_s_per_gpu'), 14, ',.0f')} {number(pred.get('peak_gib'), 8, '.1f')}")
    for r in rows:
        if r.get("layout"):
            lines.append(f"{r['case']}: {r['layout']}; checkpointing {r.get('gradient_checkpointing') or '-'}")
        for save in r.get("saves") or []:
            lines.append(f"{r['case']} {r['run']}: {save['what']} at step {save['step']} took {save['seconds']:.1f} s")
        if r.get("loss_max_rel_diff") is not None:
            lines.append(f"{r['case']} {r['run']}: resumed at step {r.get('resumed_at_step')}, "
                         f"launch and load {r['launch_and_load_s']:.0f} s, losses after it within "
                         f"{r['loss_max_rel_diff']:.2%} of the saved run's "
                         f"({'same' if r['same_losses'] else 'NOT the same'} at {SAME_LOSS_TOLERANCE:.0%})")
    lines.append(f"device {device_name} x {nproc}" + ("" if nproc == 8 else f" (issue 32 asks 8; {nproc} here)")
                 + f"; medians after {WARMUP} warm-up steps; peak = max reserved over GPUs; pred = the estimator, "
                   f"cold, without margin (fsdp2 predicted as DeepSpeed ZeRO-3, ddp as ZeRO-2)")
    return "\n".join(lines)


def number(value, width, spec):
    return f"{value:{width}{spec}}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def main(argv=None):
    make_console_safe()
    args = parse_args(argv)
    from finetune_launcher.estimate import detect_device

    started = time.time()
    nproc = this_machine_gpus() or int(os.environ.get("FTL_CPU_PROCS", "2"))
    device = detect_device(nproc)
    names = args.cases.split(",")
    configs = prepare(args, names, nproc)

    def timeout_left():
        left = args.budget - (time.time() - started)
        return int(min(args.case_timeout, left)) if left >= args.min_case_s else None

    facts = {"date": time.strftime("%Y-%m-%d"), "device": device.name, "gpus": nproc}
    rows = []
    for name in names:
        rows += case_rows(args, name, configs[name], nproc, device, timeout_left)
        save(args, rows, dict(facts, partial=True, total_s=round(time.time() - started, 1)))
    print(ascii_safe(render(rows, nproc, device.name)))
    save(args, rows, dict(facts, partial=False, total_s=round(time.time() - started, 1), versions=versions()))
    return 0 if all("tokens_per_s" in r or r.get("skipped") for r in rows) else 1


def prepare(args, names, nproc):
    """Each case's config (None: not in this checkout), the corpus they read, their models' directories built."""
    corpus = Path(args.work_dir) / "corpus.jsonl"
    configs = {name: case_config(args, name, corpus) for name in names}
    known = [c for c in configs.values() if c]
    rows_per_step = max((c["micro_batch_size"] * c["gradient_accumulation_steps"] * c["max_length"] for c in known),
                        default=0)
    write_text_corpus(corpus, words=(args.steps + 2) * nproc * rows_per_step)  # >= 1 token per word
    seconds = build_models([c["model"] for c in known])
    print(f"models ready ({seconds:.0f} s)", flush=True)
    return configs


def case_rows(args, name, config, nproc, device, timeout_left):
    """The case's row, and with --checkpoint for the first case the resumes' rows."""
    row = {"case": name, "run": "measure", "processes": nproc, "exit_code": None}
    if config is None:
        return [dict(row, skipped=f"{CASES[name].config} is not in this checkout")]
    timeout = timeout_left()
    if timeout is None:
        return [dict(row, skipped="skipped: the budget is spent")]
    checkpointed = args.checkpoint and name == args.cases.split(",")[0]
    room = checkpoint_room(config, nproc, device, Path(args.work_dir)) if checkpointed else None
    measured_row = run_case(args, name, config, nproc, device, timeout, save=checkpointed and room is None)
    if not checkpointed:
        return [measured_row]
    if room:
        return [measured_row, {"case": name, "run": "checkpoint", "exit_code": None, "skipped": room}]
    if "tokens_per_s" not in measured_row:
        return [measured_row]
    return [measured_row, *resume_runs(args, measured_row, nproc, timeout_left)]


def save(args, rows, facts):
    """The JSON, rewritten after every case, so a call cut short still returns what was measured."""
    if args.json:
        write_json({"command": " ".join(sys.argv), **facts, "cases": rows}, args.json)


if __name__ == "__main__":
    sys.exit(main())
