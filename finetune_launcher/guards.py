"""What stops a run loudly instead of letting it train on garbage: non-finite losses and gradients, steps with
nothing to learn from, and the stop signals of a preemption (which end the run cleanly, with a checkpoint)."""
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig
    from finetune_launcher.task import Engine


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to check."""


class StopSignal:
    """Remembers a SIGTERM / SIGUSR1 (Slurm preemption, `kill`); the loop checkpoints and exits 0 at the next step."""

    def __init__(self) -> None:
        self.received: int | None = None

    @classmethod
    def install(cls) -> "StopSignal":
        stop = cls()

        def handler(signum: int, _frame: FrameType | None) -> None:
            stop.received = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError):  # not the main thread (e.g. called from a notebook helper)
                pass
        return stop


@dataclass
class Watchers:
    """What watches a run from before its model exists: the stop signal (preemption) and the estimate-vs-measured
    log (its estimate is made before any model is built)."""
    stop: StopSignal
    estimate: object


class NanGradient(torch.autograd.Function):
    """Testing only (debug_nan_grad_at_step): the loss passes unchanged, its gradient comes back NaN, as after an
    overflow in the backward pass."""

    @staticmethod
    def forward(ctx: Any, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def with_debug_faults(loss: torch.Tensor, cfg: "RunConfig", step: int) -> torch.Tensor:
    """The loss as the debug_nan_* keys ask for it at `step` (tests of the guards), else unchanged."""
    if cfg.debug_nan_at_step == step:
        loss = loss * float("nan")
    if cfg.debug_nan_grad_at_step == step:
        loss = NanGradient.apply(loss)
    return loss


def nothing_to_learn(step: int, unit: str) -> TrainingError:
    return TrainingError(
        f"step {step}: no {unit} in this optimizer step has a label (all labels are -100), so the loss would be 0.0 "
        f"and nothing would be learned. Check the prompt length against max_length and the dataset's field names")


def nonfinite(step: int, what: str, value: float | None, last_checkpoint: Path | None) -> TrainingError:
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else \
        "no checkpoint was saved before this step"
    return TrainingError(
        f"step {step}: {what} is {value} (not finite); stopping instead of training on. Likely causes: all labels "
        f"masked in a batch, fp16 overflow (use bf16 or a smaller LR), a learning rate too high, or bad data. {kept}; "
        f"fix the cause and rerun (it resumes from there)")


def is_finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


def fp16_skipped_step(engine: "Engine") -> bool:
    """With fp16 loss scaling an overflow skips the step and lowers the scale: expected, not fatal."""
    return bool(getattr(engine, "fp16_enabled", lambda: False)()) and not engine.was_step_applied()


def fp16_loss_scale(engine: "Engine") -> float | None:
    """The dynamic loss scale DeepSpeed's fp16 optimizer holds after this step (a Python number: no sync), or None
    outside fp16."""
    if not getattr(engine, "fp16_enabled", lambda: False)():
        return None
    scale = getattr(getattr(engine, "optimizer", None), "cur_scale", None)
    return float(scale) if isinstance(scale, (int, float)) else None
