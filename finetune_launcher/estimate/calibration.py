"""Calibration: one factor on the device-bound time terms per device and precision, fitted on measured step times
and kept in .cache/estimate_calibration.json (FTL_ESTIMATE_CALIBRATION moves it)."""
import json
import os
from dataclasses import asdict
from pathlib import Path

from finetune_launcher.estimate.inputs import WARMUP_STEPS, EstimateError
from finetune_launcher.models.references import cache_root

CALIBRATION_PATH_ENV = "FTL_ESTIMATE_CALIBRATION"


def calibration_path():
    return Path(os.environ.get(CALIBRATION_PATH_ENV) or cache_root() / "estimate_calibration.json")


def calibration_key(device, precision, group=None):
    """A factor per device and precision, shared by the recipes whose model is the language model's (text or
    vision-language); a recipe whose model reaches another fraction of the peak names its own `group`."""
    return f"{device.name}/{precision}" + (f"/{group}" if group else "")


def load_calibration(path=None):
    path = Path(path) if path else calibration_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def save_calibration(entry, path=None):
    path = Path(path) if path else calibration_path()
    data = load_calibration(path)
    data[entry["key"]] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def calibration_factor(calibration, device, precision, group=None):
    """Multiplier on the device-bound terms fitted on this device and precision (and group), or None."""
    if not calibration:
        return None
    entry = calibration.get(calibration_key(device, precision, group))
    return entry["factor"] if entry else None


def fit_calibration(estimate, measured_step_s, source):
    """Refit the throughput term: the factor that makes the device-bound time match the measurement, keeping
    the overhead and communication terms."""
    timing = estimate.timing
    fixed = timing["terms"]["overhead_s"] + timing["terms"]["comm_s"]
    device_bound = timing["device_bound_s"]
    factor = max(0.05, (measured_step_s - fixed) / device_bound) if device_bound > 0 else 1.0
    return {"key": timing["calibration_key"], "factor": factor,
            "device": estimate.device.name, "precision": estimate.precision, "mode": estimate.spec.mode,
            "measured_step_time_s": measured_step_s, "cold_step_time_s": timing["cold_s"],
            "effective_tflops_per_rank": estimate.flops_per_step / max(1e-9, measured_step_s) / 1e12,
            "source": source, "spec": asdict(estimate.spec)}


def measured_step_time(records):
    """Median step time of the records after warm-up."""
    times = sorted(r["step_time_s"] for r in records
                   if r.get("step") and r["step"] > WARMUP_STEPS and isinstance(r.get("step_time_s"), (int, float)))
    if not times:
        raise EstimateError(f"no step after the first {WARMUP_STEPS} (warm-up) has a step_time_s; run more steps "
                            f"(logging_steps 1 records every one)")
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2

