"""The trainer's log lines: the estimate when training starts and the measured step time after warm-up, both
recorded under metadata.estimate in training_history.json."""
import json
import os

from finetune_launcher.console import say
from finetune_launcher.estimate.from_config import estimate_from_config
from finetune_launcher.estimate.inputs import GIB, WARMUP_STEPS

LAUNCH_ESTIMATE_ENV = "FTL_LAUNCH_ESTIMATE"  # the launcher's pre-flight figures (a JSON file), for rank 0


def estimate_figures(result, nnodes):
    """What the trainer logs and records of an Estimate."""
    return {"nnodes": nnodes, "predicted_step_time_s": result.step_time_s,
            "predicted_peak_gib": result.peak_bytes / GIB, "cold_step_time_s": result.timing["cold_s"],
            "calibrated": bool(result.timing["calibration_factor"]), "device": result.device.name}


def launch_estimate():
    """The figures the launcher's pre-flight wrote for this launch, or None (no launcher, --no-preflight)."""
    path = os.environ.get(LAUNCH_ESTIMATE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class EstimateLog:
    """Logs the estimate when training starts and the measured step time after warm-up (once), and records both
    in the history metadata. Rank 0 only. Never raises: an estimate problem must not stop a run."""

    def __init__(self, config, world, history=None, measured_steps=3):
        self.history, self.measured_steps, self.seen, self.times, self.figures = history, measured_steps, 0, [], None
        self.recorded = {}
        if int(os.environ.get("RANK", "0")) != 0:
            return
        self.figures = launch_estimate() or self._estimate(config, world)
        if self.figures is None:
            return
        self._say(f"estimate: {self.figures['predicted_peak_gib']:.2f} GiB peak per rank, "
                  f"{self.figures['predicted_step_time_s']:.3f} s/step "
                  f"({'calibrated' if self.figures['calibrated'] else 'cold'}, {self.figures['device']})")
        self._record({key: self.figures[key] for key in ("nnodes", "predicted_step_time_s", "predicted_peak_gib",
                                                         "cold_step_time_s")})

    def _estimate(self, config, world):
        try:
            nnodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            result = estimate_from_config(config, world // nnodes, nnodes)
        except Exception as error:  # noqa: BLE001 - logging only
            self._say(f"estimate: unavailable ({type(error).__name__}: {error})")
            return None
        return estimate_figures(result, nnodes) if result is not None else None

    def observe(self, step, record):
        """Call after every optimizer step; the first WARMUP_STEPS after a (re)start are not measured."""
        if self.figures is None or self.times is None:
            return
        self.seen += 1
        if self.seen <= WARMUP_STEPS:
            return
        self.times.append(record["step_time_s"])
        if len(self.times) < self.measured_steps:
            return
        measured = sorted(self.times)[len(self.times) // 2]
        predicted = self.figures["predicted_step_time_s"]
        self._say(f"estimate vs measured after warm-up: {measured:.3f} s/step measured, {predicted:.3f} predicted "
                  f"({(predicted / measured - 1) * 100:+.0f}%)")
        self._record({"measured_step_time_s": measured, "measured_at_step": step})
        self.times = None

    def attach(self, history):
        """Record into `history` from now on, with what was recorded before it existed (the estimate is made
        before the model is built: under ZeRO-3 building the estimator's meta-device model later would run inside
        transformers' zero.Init on one rank only)."""
        self.history = history
        self._record({})
        return self

    def _record(self, values):
        self.recorded.update(values)
        if self.history is None or not self.recorded:
            return
        metadata = self.history.data.setdefault("metadata", {})
        metadata.setdefault("estimate", {}).update(self.recorded)

    @staticmethod
    def _say(text):
        say(text)


def log_estimate_vs_measured(config, world, history=None):
    """The trainer's hook: returns an object whose .observe(step, record) is called after each step."""
    return EstimateLog(config, world, history)
