"""Checkpoints: training state for resume (DeepSpeed engine + our client state + per-rank RNG), written to a
temporary directory and renamed into place only when every rank has finished; and the user-facing `best/` and
`final/` weights (LoRA adapters or the whole model, gathered by the engine when it shards them)."""
import hashlib
import json
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from finetune_launcher.config.settings import identity_keys
from finetune_launcher.distributed import barrier
from finetune_launcher.engines import full_state_dict
from finetune_launcher.fsutil import apply_umask, atomic_write_json, atomic_write_text, fresh_tmp_dir, replace_dir

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig
    from finetune_launcher.task import Engine

LATEST = "latest"
IDENTITY_FILE = "run_settings.json"
HASHED_BYTES = 256 * 1024 ** 2  # data files up to this size are hashed whole; larger ones by size and mtime
RESHARDING_ENGINES = ("ddp", "fsdp2")  # checkpoints that load on any number of processes (whole, or DCP)
BATCH_LAYOUT = ("world_size", "micro_batch_size", "gradient_accumulation_steps")


# ---------------------------------------------------------------- what a checkpoint was trained with

def training_identity(cfg: "RunConfig") -> dict[str, Any]:
    """The settings that change what is trained (config.identity_keys: the keys declared so) plus a fingerprint of each
    local data file, so an edited dataset is not continued silently either. The engine's checkpoint format too (listed
    only when it is not DeepSpeed's: older checkpoints match); for engines whose checkpoints load on any number of
    processes, the global batch of a step rather than how it is split over processes and micro-batches."""
    values = cfg.as_dict()
    identity = {key: values[key] for key in identity_keys(cfg.recipe)}
    if values["engine"] != "deepspeed":
        identity["engine"] = values["engine"]
    if values["engine"] in RESHARDING_ENGINES:
        identity = with_global_batch(identity, values)
    for key in ("dataset", "eval_dataset"):
        if values.get(key) and Path(values[key]).is_file():
            identity[f"{key}_content"] = file_fingerprint(Path(values[key]))
    return identity


def with_global_batch(identity: Mapping[str, Any], values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`identity` with its batch layout (processes x micro-batch x accumulation) replaced by the global batch: the
    rows of a step are the same whichever way they are split (the samplers deal them from the global order)."""
    values = values or identity
    identity = {k: v for k, v in identity.items() if k not in BATCH_LAYOUT}
    identity["global_batch_size"] = values["world_size"] * values["micro_batch_size"] * \
        values["gradient_accumulation_steps"]
    return identity


def file_fingerprint(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASHED_BYTES:
        return f"size {stat.st_size}, modified {int(stat.st_mtime)}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"sha256 {digest.hexdigest()[:16]}"


def resume_differences(checkpoint: str | Path, identity: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """[(key, value in the checkpoint, value now)] for every training setting that differs. A checkpoint without a
    record of its settings (written by an older version) is compared on nothing. Between engines only the engine is
    named, not the batch layout each records its own way."""
    path = Path(checkpoint) / IDENTITY_FILE
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    saved_engine, engine = saved.pop("engine", "deepspeed"), identity.get("engine", "deepspeed")
    now = {k: v for k, v in identity.items() if k != "engine"}
    if saved_engine != engine:
        saved, now = without_batch_layout(saved), without_batch_layout(now)
    elif engine in RESHARDING_ENGINES and "global_batch_size" not in saved and "world_size" in saved:
        saved = with_global_batch(saved)  # recorded before checkpoints were compared by global batch
    keys = sorted(set(saved) | set(now))
    differences = [(key, saved.get(key), now.get(key)) for key in keys if saved.get(key) != now.get(key)]
    return ([("engine", saved_engine, engine)] if saved_engine != engine else []) + differences


def without_batch_layout(identity: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in (*BATCH_LAYOUT, "global_batch_size")}


# ---------------------------------------------------------------- training state (resume)

def resume_problem(cfg: "RunConfig", checkpoint: Path, total_steps: int) -> str | None:
    """Why checkpoint `checkpoint` should not be continued silently, or None. A checkpoint at the last step of a
    run that did not finish (killed or requeued while it saved final/) is not a problem: resuming finishes it."""
    differences = resume_differences(checkpoint, training_identity(cfg))
    step = int(checkpoint.name.split("-")[-1])
    start_fresh = "start fresh with --resume never (the checkpoint is overwritten) or another --run_name"
    fix = f"{start_fresh}, or continue it anyway with --resume always"
    if differences:
        lines = "\n".join(f"  - {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in differences)
        return (f"{checkpoint} was trained with other settings than this run:\n{lines}\nNothing was trained; {fix}")
    history = finished_history(checkpoint.parent.parent)
    if history and history.get("stopped_early_at") == step:
        return (f"{checkpoint.parent.parent} stopped early at step {step} ({history['stop_reason']}), so there is "
                f"nothing to train. Continue past the stop with --resume always, or {start_fresh}")
    if total_steps < step or (total_steps == step and history):
        more = "it already finished" if total_steps == step else f"max_steps {total_steps} is below it"
        return (f"{checkpoint} is at step {step} and this run has {total_steps} steps: {more}, so there is nothing to "
                f"train. Raise max_steps (or num_epochs) to continue it, or {start_fresh}")
    return None


def finished_history(run_dir: str | Path) -> dict[str, Any] | None:
    """The history of the run in `run_dir` when it wrote final/ and marked itself completed, else None."""
    try:
        history = json.loads((Path(run_dir) / "training_history.json").read_text())
    except (OSError, ValueError):
        return None
    return history if history.get("status") == "completed" else None


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(engine: "Engine", root: str | Path, step: int, client_state: dict, rank: int, keep: int,
                        adapters_only: bool, identity: Mapping[str, Any]) -> Path:
    """Write checkpoints/step-N atomically (all ranks call), then point `latest` at it and prune old ones.
    `identity`: the run's training settings (training_identity), kept beside the state for resume checks."""
    root = Path(root)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(tmp), tag="state", client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=adapters_only)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        atomic_write_json(tmp / IDENTITY_FILE, identity)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        atomic_write_text(root / LATEST, final.name + "\n")
        prune_checkpoints(root, keep)
    barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_checkpoints(root: str | Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest` points at, or None. A half-written .tmp directory is never returned."""
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_training_state(engine: "Engine", path: str | Path, rank: int, adapters_only: bool) -> dict[str, Any]:
    _, client_state = engine.load_checkpoint(str(path), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=False,
                                             load_module_strict=not adapters_only)
    rng_file = Path(path) / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


# ---------------------------------------------------------------- best/ and final/ weights

def save_training_info(out_dir: str | Path, info: Mapping[str, Any]) -> None:
    """training_info.json beside saved weights: what the tools after training read (base model, mode, recipe)."""
    atomic_write_json(Path(out_dir) / "training_info.json", info)
    apply_umask(out_dir)


def save_weights(engine: "Engine", model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, mode: str, rank: int,
                 info: Mapping[str, Any]) -> Path:
    """Write `out_dir` (best/ or final/) atomically: adapters for LoRA/QLoRA, the whole model for full.
    All ranks must call it (sharded engines gather collectively)."""
    out_dir = Path(out_dir)
    # LoRA: the trainable weights by the model's own names, which peft's save_pretrained turns into the adapter's
    # (once: given its own output, it looks up modules_to_save weights under names it has already changed); never
    # `model.state_dict()`, which would also serialise every 4-bit base weight.
    state = full_state_dict(engine, trainable_only=mode in ("lora", "qlora"))
    if rank == 0:
        tmp = fresh_tmp_dir(out_dir)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "training_info.json", info)
        apply_umask(tmp)  # safetensors writes 0600 files; best/ and final/ are for sharing
        replace_dir(tmp, out_dir)
    barrier()
    return out_dir
