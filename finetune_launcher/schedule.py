"""Learning-rate schedules (warmup + cosine / linear / constant) and the eval-driven plateau rules:
halve the LR when eval loss stops improving, keep `best/` by the same rule, stop early, say why."""
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig


def total_steps(cfg: "RunConfig", steps_per_epoch: int) -> int:
    """Optimizer steps of the run: max_steps, else num_epochs passes (at least one step)."""
    return cfg.max_steps or max(1, math.ceil(cfg.num_epochs * steps_per_epoch))


class LRSchedule:
    def __init__(self, cfg: "RunConfig", total_steps: int) -> None:
        self.base_lr = cfg.learning_rate
        self.min_lr = cfg.min_lr
        self.kind = cfg.lr_scheduler
        self.total_steps = max(1, total_steps)
        self.warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * self.total_steps))
        self.scale = 1.0  # multiplied by plateau_factor at each plateau

    def lr_at(self, step: int) -> float:
        """LR for 1-based optimizer step `step`."""
        if self.warmup and step <= self.warmup:
            return self.base_lr * self.scale * step / self.warmup
        if self.kind in ("constant", "plateau"):
            return self.base_lr * self.scale
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        if self.kind == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            factor = 1.0 - progress
        return (self.min_lr + (self.base_lr - self.min_lr) * factor) * self.scale

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.scale = state["scale"]


class EvalTracker:
    """Applies the improvement rule to each eval loss. `on_eval` returns what happened: improved (save best/),
    lr_reduced, and stop_reason (None to go on). It sees the evals after training started only: the step-0 eval is
    the base model's (best/ must hold trained weights), so the first eval of a run always improves."""

    def __init__(self, cfg: "RunConfig", schedule: LRSchedule) -> None:
        self.threshold = cfg.improvement_threshold
        self.plateau = cfg.lr_scheduler == "plateau"
        self.factor = cfg.plateau_factor
        self.patience = cfg.plateau_patience
        self.early_stop = cfg.early_stopping_patience
        self.min_eval_loss = cfg.min_eval_loss
        self.min_lr = cfg.min_lr
        self.schedule = schedule
        self.best_loss = math.inf
        self.best_step = None
        self.bad_evals = 0       # since the last improvement
        self.plateau_evals = 0   # since the last improvement or LR reduction

    def on_eval(self, loss: float, step: int) -> dict[str, Any]:
        event = {"improved": False, "lr_reduced": False, "stop_reason": None}
        if self.improves(loss):
            self.best_loss, self.best_step = loss, step
            self.bad_evals = self.plateau_evals = 0
            event["improved"] = True
        else:
            self.bad_evals += 1
            self.plateau_evals += 1
        if self.plateau and self.plateau_evals >= self.patience:
            self.schedule.scale *= self.factor
            self.plateau_evals = 0
            event["lr_reduced"] = True
            if self.schedule.base_lr * self.schedule.scale < self.min_lr:
                event["stop_reason"] = (f"learning rate {self.schedule.base_lr * self.schedule.scale:.3g} fell "
                                        f"below min_lr {self.min_lr:.3g}")
        if self.min_eval_loss is not None and loss < self.min_eval_loss:
            event["stop_reason"] = f"eval loss {loss:.4f} reached min_eval_loss {self.min_eval_loss}"
        if self.early_stop and self.bad_evals >= self.early_stop:
            event["stop_reason"] = (f"early stopping: no improvement of more than {self.threshold} in "
                                    f"{self.bad_evals} evals (best {self.best_loss:.4f} at step {self.best_step})")
        return event

    def improves(self, loss: float) -> bool:
        """Lower than the best by more than the threshold: an absolute loss, or "5%" of the best loss."""
        if self.best_loss == math.inf:
            return True
        threshold = self.threshold
        if isinstance(threshold, str):
            threshold = float(threshold.rstrip("%")) / 100 * self.best_loss
        return loss < self.best_loss - threshold

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("best_loss", "best_step", "bad_evals", "plateau_evals")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
