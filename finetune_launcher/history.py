"""training_history.json (the source of truth), tensorboard and wandb sinks, and the curves picture."""
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_launcher.fsutil import atomic_write_json

if TYPE_CHECKING:
    import numpy as np

HISTORY_FIELDS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s",
                  "nonpad_fraction")


class History:
    """One record per logged step (eval_loss added on eval steps) plus run metadata; rewritten atomically on each
    change so a reader (plot tool, estimator) can follow a run in progress."""

    def __init__(self, path: str | Path, metadata: dict[str, Any], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.data = {"metadata": metadata, "records": [], "evals": [], "saves": [], "best": None,
                     "stop_reason": None, "stopped_early_at": None, "status": "running"}

    def resume_from(self, step: int) -> None:
        """Keep what happened up to `step` (the checkpoint being resumed); later records will be written again."""
        if not self.path.exists():
            return
        previous = json.loads(self.path.read_text())
        self.data["records"] = [r for r in previous.get("records", []) if r["step"] <= step]
        self.data["evals"] = [r for r in previous.get("evals", []) if r["step"] <= step]
        self.data["saves"] = previous.get("saves", [])  # each save happened, also past the checkpoint
        best = previous.get("best")
        self.data["best"] = best if best and best["step"] <= step else None
        self.data["metadata"]["resumed_at_steps"] = previous["metadata"].get("resumed_at_steps", []) + [step]

    def log_save(self, step: int, what: str, seconds: float) -> None:
        """How long a checkpoint or a best/final save took (a 32B ZeRO-3 gather is minutes, worth knowing)."""
        self.data.setdefault("saves", []).append({"step": step, "what": what, "seconds": round(seconds, 3)})

    def log_step(self, record: dict[str, Any]) -> None:
        self.data["records"].append(record)

    def log_eval(self, step: int, eval_loss: float, extra: Mapping[str, Any] | None = None) -> None:
        entry = {"step": step, "eval_loss": eval_loss, **(extra or {})}
        self.data["evals"].append(entry)
        for record in reversed(self.data["records"]):
            if record["step"] == step:
                record["eval_loss"] = eval_loss
                break

    def set(self, key: str, value: object) -> None:
        self.data[key] = value

    def save(self) -> None:
        if self.enabled:
            atomic_write_json(self.path, _finite_or_text(self.data))


def _finite_or_text(value: Any) -> Any:
    """JSON has no NaN/Infinity: store them as strings so the file stays valid and the fact stays visible."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_text(v) for v in value]
    return value


def flat_scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of numbers as one level of scalars: {"a": {"b": [1, 2]}} -> {"a/b/0": 1, "a/b/1": 2}."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            flat.update(flat_scalars(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class MetricSinks:
    """The sinks the resolved config's report_to names (config/sources.py normalize_report_to: tensorboard, plus
    wandb when asked for; none at all for `report_to: none`), rank 0 only; training_history.json is written either
    way."""

    def __init__(self, log_dir: str | Path, report_to: Sequence[str], run_name: str, config: dict[str, Any],
                 enabled: bool = True) -> None:
        import importlib.util

        self.writers = []
        if not enabled:
            return
        if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writers.append(("tb", SummaryWriter(log_dir=str(log_dir))))
        if "wandb" in report_to:
            import wandb

            wandb_dir = Path(log_dir).parent  # outputs/<run>/wandb/
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "finetune-launcher"), name=run_name,
                             config=config, dir=str(wandb_dir))
            self.writers.append(("wandb", run))

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        clean = {k: v for k, v in flat_scalars(metrics).items() if isinstance(v, (int, float)) and v is not None}
        for kind, writer in self.writers:
            if kind == "tb":
                for key, value in clean.items():
                    writer.add_scalar(key, value, step)
            else:
                writer.log(clean, step=step)

    def log_image(self, step: int, tag: str, image: "np.ndarray") -> None:
        """An HWC uint8 picture (e.g. the sample grid)."""
        for kind, writer in self.writers:
            if kind == "tb":
                writer.add_image(tag, image, step, dataformats="HWC")
            else:
                import wandb

                writer.log({tag: wandb.Image(image)}, step=step)

    def close(self) -> None:
        for kind, writer in self.writers:
            if kind == "tb":
                writer.close()
            else:
                writer.finish()


def check_sinks_available(report_to: Sequence[str]) -> None:
    """Fail before any model is loaded when a sink the resolved report_to names is not installed."""
    import importlib.util

    if "wandb" in report_to and importlib.util.find_spec("wandb") is None:
        from finetune_launcher.config import ConfigError

        raise ConfigError("report_to includes wandb but wandb is not installed: pip install wandb "
                          "(or remove wandb from report_to)")


def load_history(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no history file at {path}")
    return json.loads(path.read_text())


def curve_panels(history: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, list[int], list[float], str]]]]:
    """What training_curves.png plots: [(title, [(label, steps, values, style)])], one entry per panel. The third
    panel is the throughput the history records (tokens/s for language models, images/s for diffusion)."""
    records = history.get("records", [])

    def series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    losses = [("train loss", *series(records, "loss"), "-")]
    eval_steps, eval_loss = series(history.get("evals", []), "eval_loss")
    if eval_steps:
        losses.append(("eval loss", eval_steps, eval_loss, "o-"))
    rate = throughput_key(records)
    unit = rate[:-len("_per_s")] if rate else "tokens"
    return [("loss", losses), ("learning rate", [("", *series(records, "learning_rate"), "-")]),
            (f"{unit}/s", [("", *series(records, rate), "-")] if rate else [])]


def throughput_key(records: Sequence[Mapping[str, Any]]) -> str | None:
    """The "<unit>_per_s" key the loop wrote (finetune_launcher/loop.py: the task's throughput unit), or None."""
    return next((key for record in records for key in record if key.endswith("_per_s")), None)


def plot_history(history: Mapping[str, Any], png_path: str | Path) -> str | Path:
    """Training and eval loss, learning rate and throughput against step, as one PNG. Works mid-run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for axis, (title, lines) in zip(axes, curve_panels(history)):
        for label, steps, values, style in lines:
            axis.plot(steps, values, style, label=label or None)
        axis.set_xlabel("step")
        axis.set_title(title)
    best = history.get("best")
    if best:
        axes[0].axvline(best["step"], color="gray", linestyle=":", label=f"best (step {best['step']})")
    axes[0].legend()
    name = history.get("metadata", {}).get("run_name", "")
    status = history.get("status", "")
    fig.suptitle(f"{name} ({status})")
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return png_path
