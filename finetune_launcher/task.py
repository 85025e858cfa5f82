"""The contracts of the shared training loop (loop.py): it trains a recipe's `Task`, which draws each step's
micro-batches from a `Sampler`, on an `Engine` (DeepSpeed's, or one of finetune_launcher/engines/). `StepTask` is
the half every task shares (micro-batches from the sampler, collated, counted on the host and copied to the device);
a recipe writes the other half: how a micro-batch is collated and counted, its loss, its eval, and how best/ and
final/ are saved."""
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig
    from finetune_launcher.distributed import RankContext


@dataclass
class StepBatches:
    """This rank's share of one optimizer step."""
    batches: list
    units: int            # units of the loss (task.unit) in them, counted on the host before the copy to the GPU
    real_tokens: int      # non-pad tokens (or images), for throughput
    padded_tokens: int    # tensor elements, for the non-pad fraction


@runtime_checkable
class Sampler(Protocol):
    """Deals the training rows out to the ranks; micro_batches(epoch, step) is a pure function of the seed, the
    rank and the step (finetune_launcher/data/sampling.py)."""
    steps_per_epoch: int

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[Any]]:
        """This rank's micro-batches of one optimizer step, each a list of rows or row indices."""


@runtime_checkable
class Task(Protocol):
    """Everything the loop asks of a recipe."""
    unit: str                # what the loss averages over: "token" | "sample"
    throughput: str          # what the history's <throughput>_per_s counts: "tokens" | "images"
    stats: dict              # data counts for the history

    @property
    def steps_per_epoch(self) -> int: ...

    def micro_batches(self, epoch: int, step_in_epoch: int) -> StepBatches:
        """This rank's share of one optimizer step, on the device."""

    def loss(self, engine: "Engine", batch: dict, normaliser: float) -> torch.Tensor:
        """(sum of the unit losses in `batch`) / normaliser, a scalar tensor."""

    def evaluate(self, engine: "Engine") -> float | None:
        """A deterministic eval loss over the whole eval split (every rank runs the same number of forwards), or
        None without eval data."""

    def after_eval(self, engine: "Engine", step: int) -> dict:
        """Extras for the history at an eval (e.g. sample images under "images"), may be {}."""

    def step_metrics(self, step: int) -> dict:
        """Extras for a logged step's record (e.g. an MoE router's expert load), may be {}; every rank calls it."""

    def save_weights(self, engine: "Engine", out_dir: Path, info: dict) -> None:
        """best/ and final/: the usual whole artefacts; all ranks call it."""


@runtime_checkable
class Engine(Protocol):
    """What the loop and the checkpoints ask of an engine (a DeepSpeed engine answers it as it is)."""
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    world_size: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def get_global_grad_norm(self) -> Any: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def zero_optimization_stage(self) -> int: ...
    def bfloat16_enabled(self) -> bool: ...
    def fp16_enabled(self) -> bool: ...
    def was_step_applied(self) -> bool: ...  # False after an fp16 overflow skipped the step
    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> Any: ...
    def load_checkpoint(self, load_dir: str, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = False, load_module_strict: bool = False) -> tuple: ...


class StepTask:
    """The shared half of a task. A subclass sets `unit` and `throughput` and gives `collate(group, epoch, step,
    micro)` (one micro-batch as tensors) and `count(group, batch)` -> (loss units, real tokens, padded tokens),
    besides loss / evaluate / save_weights."""
    unit = "token"
    throughput = "tokens"

    def __init__(self, cfg: "RunConfig", ctx: "RankContext", sampler: Sampler, stats: dict) -> None:
        self.c, self.ctx, self.sampler, self.stats = cfg, ctx, sampler, stats

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def micro_batches(self, epoch: int, step_in_epoch: int) -> StepBatches:
        groups = self.sampler.micro_batches(epoch, step_in_epoch)
        batches = [self.collate(group, epoch, step_in_epoch, k) for k, group in enumerate(groups)]
        units = real = padded = 0
        for group, batch in zip(groups, batches):  # on the host: no sync
            counted = self.count(group, batch)
            units, real, padded = units + counted[0], real + counted[1], padded + counted[2]
        return StepBatches([self.to_device(b) for b in batches], units, real, padded)

    def collate(self, group: Sequence, epoch: int, step_in_epoch: int, micro: int) -> dict:
        raise NotImplementedError

    def count(self, group: Sequence, batch: dict) -> tuple[int, int, int]:
        raise NotImplementedError

    def to_device(self, batch: dict) -> dict:
        """Tensors to the rank's device; on CUDA from pinned memory, without blocking the host."""
        device = self.ctx.device
        if device.type != "cuda":
            return batch
        return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}

    def after_eval(self, engine: Engine, step: int) -> dict:
        return {}

    def step_metrics(self, step: int) -> dict:
        return {}
