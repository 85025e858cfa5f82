"""Run under torchrun (2 processes on the CPU): build the trainer's model and DeepSpeed engine for several
(mode, ZeRO stage) combinations and train two steps. Two measurements, each against the estimator's figures:

- model states: at the second optimizer step (inside the wrapped torch optimizer, where the parameters, the
  gradient partitions, the fp32 gradient copy and the optimizer states are all alive) the bytes each rank holds,
  by role, each storage counted once. Roles go by identity: parameters (and QLoRA's quant_state) are weights; the
  torch optimizer's state tensors and its fp32 master partitions are optimizer; `.grad` of a parameter or master
  partition, and tensors under a DeepSpeed optimizer attribute named for gradients (`*grad*`, `*ipg*` buckets),
  are gradients; any other tensor the DeepSpeed optimizer holds is reported as unclaimed, not filed anywhere.
- peak (combos with the `peak` flag): torch's CPU allocation counter (the profiler's memory events: every byte
  torch allocates and frees, from before the model is loaded to the end of the second step), on packed rows as
  the trainer feeds them; its maximum is the rank's peak of live tensor bytes. Under ZeRO-3 the counter's level
  drifts from run to run by up to about 10% of the peak (seen 115-128 MB on the same combination): a varying
  number of the main thread's allocations (a few dozen of about 2,000, made while loading) never show their free,
  although no Python-reachable tensor holds them. Such bytes only ever add, so a ZeRO-3 peak is the smallest of
  PEAK_REPEATS measurements (ZeRO-2's moved by under 2% between runs, seen: one measurement).

Prints one JSON line per combination on rank 0:
{"combo", "measured": [per rank: {weights, gradients, optimizer, unclaimed[, peak]}], "estimated": {...}}.

usage: torchrun --nproc_per_node 2 tests/e2e/engine_memory_probe.py full:2 lora:3 qlora:2:bf16 full:2:peak ...
"""
import gc
import json
import os
import re
import sys

import torch

from tests.conftest import peak_of, resolve
from finetune_launcher.console import make_console_safe
from finetune_launcher.data.text import collate
from finetune_launcher.distributed import init_distributed, shutdown_distributed
from finetune_launcher.engines import build_engine
from finetune_launcher.estimate import estimate, spec_from_config
from finetune_launcher.recipes.causal_lm.model import load_model

SEQ, MICRO = 64, 2
PEAK_REPEATS = 3
PEAK_SEQ, PEAK_MICRO = 256, 4  # activations well above the model states: the backward phase is the peak
GRADIENT_ATTRIBUTE = re.compile(r"grad|ipg", re.IGNORECASE)


def run_config(mode, zero, extra, peak, world):
    overrides = {"mode": mode, "model": "builtin:tiny-llama", "dataset": "data/tiny_instruct.jsonl",
                 "zero_stage": zero, "micro_batch_size": PEAK_MICRO if peak else MICRO,
                 "max_length": PEAK_SEQ if peak else SEQ, "lora_r": 16, "lora_dropout": 0.0,
                 "gradient_checkpointing": False, "report_to": [], **extra}
    return resolve(None, overrides, procs=world)


class Ledger:
    """Unique storages by role; a storage is counted once, under the first role that claims it."""

    def __init__(self):
        self.seen, self.bytes = set(), {"weights": 0, "gradients": 0, "optimizer": 0, "unclaimed": 0}

    def add(self, role, tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[role] += storage.nbytes()


def tensors_in(obj, depth=0, visited=None):
    """(tensor, is_a_grad) reachable from a DeepSpeed object through attributes, lists and dicts."""
    visited = set() if visited is None else visited
    if id(obj) in visited or depth > 4:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj, False
        if obj.is_leaf and obj.grad is not None:
            yield obj.grad, True
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from tensors_in(item, depth + 1, visited)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item, depth + 1, visited)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        for item in vars(obj).values():
            yield from tensors_in(item, depth + 1, visited)


def quant_state_tensors(param):
    state = getattr(param, "quant_state", None)
    while state is not None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                yield value
        state = getattr(state, "state2", None)


def held_bytes(engine, model):
    ledger = Ledger()
    for p in model.parameters():
        ledger.add("weights", getattr(p, "ds_tensor", None))
        ledger.add("weights", p.data)
        for tensor in quant_state_tensors(p):
            ledger.add("weights", tensor)
    inner = engine.optimizer.optimizer
    for state in inner.state.values():
        for value in state.values():
            ledger.add("optimizer", value)  # Adam's moments (and its step counters)
    for group in inner.param_groups:
        for master in group["params"]:
            ledger.add("optimizer", master)  # the fp32 master partition
            ledger.add("gradients", master.grad)  # the fp32 gradient partition
    for p in model.parameters():
        ledger.add("gradients", p.grad)
    for name, value in vars(engine.optimizer).items():
        named_for_gradients = bool(GRADIENT_ATTRIBUTE.search(name))
        for tensor, is_grad in tensors_in(value):
            ledger.add("gradients" if named_for_gradients or is_grad else "unclaimed", tensor)
    return ledger.bytes


def packed_batch(micro, seq, step):
    """A micro-batch as the trainer packs it: three examples per row, positions restarting."""
    generator = torch.Generator().manual_seed(step)
    rows = []
    for _ in range(micro):
        ids, positions = [], []
        for length in (seq // 2, seq // 4, seq - seq // 2 - seq // 4):
            ids += torch.randint(5, 1000, (length,), generator=generator).tolist()
            positions += list(range(length))
        rows.append({"input_ids": ids, "labels": list(ids), "position_ids": positions})
    return collate(rows, 0, True)


def train_two_steps(config, world, snapshot, peak):
    model, keepalive = load_model(config, torch.device("cpu"))
    engine = build_engine(model, config)
    gc.collect()  # what loading left for the garbage collector is not part of the training peak
    inner = engine.optimizer.optimizer
    real_step = inner.step

    def step_and_measure(*args, **kwargs):
        if inner.state and not peak:  # the second step: Adam's moments exist
            snapshot.update(held_bytes(engine, model))
        return real_step(*args, **kwargs)

    inner.step = step_and_measure
    torch.manual_seed(0)
    for step in range(2):
        if peak:
            batch = packed_batch(config.micro_batch_size, config.max_length, step)
        else:
            ids = torch.randint(0, 1000, (config.micro_batch_size, config.max_length))
            batch = {"input_ids": ids, "labels": ids}
        engine.backward(engine(**batch).loss)
        engine.step()
    inner.step = real_step


def measure_combo(mode, zero, flags, world):
    peak = "peak" in flags
    config = run_config(mode, zero, {"precision": "bf16"} if "bf16" in flags else {}, peak, world)
    measured = {}
    if peak:
        from torch.profiler import ProfilerActivity, profile

        peaks = []
        for _ in range(PEAK_REPEATS if zero == 3 else 1):
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
                train_two_steps(config, world, measured, peak)
            peaks.append(peak_of(profiler))
            gc.collect()
        measured["peak"], measured["peaks"] = min(peaks), peaks
    else:
        train_two_steps(config, world, measured, peak)
    gc.collect()  # the engine of this combination goes before the next one is built
    result = estimate(spec_from_config(config.as_dict(), world, 1, gpu="cpu"), with_alternatives=False)
    predicted = {k: result.memory[k] for k in ("weights", "gradients_at_step", "optimizer")}
    # the peak without the margin and the runtime (python, torch, DeepSpeed themselves: not tensors)
    predicted["peak_tensors"] = result.peak_bytes / (1 + result.spec.margin) - result.memory["runtime"]
    predicted["peak_phase"] = result.peak_phase
    return measured, predicted


def main():
    make_console_safe()
    ctx = init_distributed()
    rank, world = ctx.rank, ctx.world
    for combo in sys.argv[1:]:
        mode, zero, *flags = combo.split(":")
        measured, predicted = measure_combo(mode, int(zero), flags, world)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, measured)
        if rank == 0:
            print("RESULT " + json.dumps({"combo": combo, "measured": gathered, "estimated": predicted}),
                  flush=True)
        torch.distributed.barrier()
    # Every rank leaves the process group before exiting: left to interpreter teardown, a rank that exits first
    # closes its gloo connections under the other's threads, which then abort ("terminate called without an
    # active exception", seen in CI).
    shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
