"""Run under torchrun (2 processes on the CPU): build the trainer's model and DeepSpeed engine for several
(mode, ZeRO stage) combinations, train two steps, and at the second optimizer step (inside the wrapped torch
optimizer, where the parameters, the partitioned gradients, the fp32 gradient copy and the optimizer states are
all alive) count the bytes each rank really holds, by role. Prints one JSON line per combination on rank 0:
{"combo", "measured": {rank: {weights, gradients, optimizer}}, "estimated": {...}}.

usage: torchrun --nproc_per_node 2 tests/e2e/engine_memory_probe.py full:2 lora:3 qlora:2 ...
"""
import gc
import json
import os
import sys

import torch

from train.config import load_config
from train.console import make_console_safe
from train.engine import init_distributed, resolve_ds_config, resolve_precision, shutdown_distributed
from train.estimate import estimate, spec_from_config
from train.loop import build_engine
from train.model import hidden_size_of, load_model, model_config

SEQ, MICRO = 64, 2


def run_config(mode, zero, extra):
    overrides = {"mode": mode, "model": "builtin:tiny-llama", "dataset": "data/tiny_instruct.jsonl",
                 "zero_stage": zero, "micro_batch_size": MICRO, "max_length": SEQ, "lora_r": 16,
                 "lora_dropout": 0.0, "gradient_checkpointing": False, "report_to": [], **extra}
    return load_config(None, overrides)


def storage_of(tensor):
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class Ledger:
    """Unique storages by role; a storage is counted once, under the first role that claims it."""

    def __init__(self):
        self.seen, self.bytes = {}, {"weights": 0, "gradients": 0, "optimizer": 0}

    def add(self, role, tensor):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        ptr, nbytes = storage_of(tensor)
        if nbytes == 0 or ptr in self.seen:
            return
        self.seen[ptr] = role
        self.bytes[role] += nbytes


def tensors_in(obj, depth=0, visited=None):
    """Tensors reachable from a DeepSpeed object through attributes, lists and dicts (a few levels deep)."""
    visited = set() if visited is None else visited
    if id(obj) in visited or depth > 4:
        return
    visited.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        grad = obj.grad if obj.is_leaf else None
        if grad is not None:
            yield grad
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
        if hasattr(p, "ds_tensor"):
            ledger.add("weights", p.ds_tensor)
        ledger.add("weights", p.data)
        for tensor in quant_state_tensors(p):
            ledger.add("weights", tensor)
    inner = engine.optimizer.optimizer
    for group in inner.param_groups:
        for master in group["params"]:
            ledger.add("optimizer", master)
            if master.grad is not None:
                ledger.add("gradients", master.grad)
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                ledger.add("optimizer", value)
    for p in model.parameters():
        if p.grad is not None:
            ledger.add("gradients", p.grad)
    for tensor in tensors_in(engine.optimizer):
        ledger.add("gradients", tensor)  # what is left: gradient partitions and reduce buckets
    return ledger.bytes


def measure_combo(mode, zero, extra, rank, world):
    config = run_config(mode, zero, extra)
    precision = resolve_precision(config["precision"])
    ds_config = resolve_ds_config(config, world, hidden_size_of(model_config(config)), precision)
    model, keepalive = load_model(config, precision, ds_config, torch.device("cpu"))
    engine = build_engine(model, config, ds_config)
    snapshot = {}
    inner = engine.optimizer.optimizer
    real_step = inner.step

    def step_and_measure(*args, **kwargs):
        if inner.state:  # the second step: Adam's moments exist
            snapshot.update(held_bytes(engine, model))
        return real_step(*args, **kwargs)

    inner.step = step_and_measure
    torch.manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, 1000, (MICRO, SEQ))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    inner.step = real_step
    spec = spec_from_config(config, world, 1, gpu="cpu")
    predicted = estimate(spec, with_alternatives=False).memory
    del engine, model, keepalive
    gc.collect()
    return snapshot, {k: predicted[k] for k in ("weights", "gradients_at_step", "optimizer")}


def main():
    make_console_safe()
    rank, world, _ = init_distributed()
    for combo in sys.argv[1:]:
        mode, zero, *flags = combo.split(":")
        extra = {"precision": "bf16"} if "bf16" in flags else {}
        measured, predicted = measure_combo(mode, int(zero), extra, rank, world)
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
