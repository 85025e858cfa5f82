"""Measuring runs for calibration: a few real steps of a run config through the launcher and the trainer, and
the refit of the throughput term from a run's training_history.json."""
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import yaml

from finetune_launcher.estimate.calibration import fit_calibration, measured_step_time, save_calibration
from finetune_launcher.estimate.devices import cpu_device, device_from_cuda_name, known_gpus, resolve_device
from finetune_launcher.estimate.estimator import estimate
from finetune_launcher.estimate.from_config import spec_from_config
from finetune_launcher.estimate.inputs import WARMUP_STEPS, EstimateError
from finetune_launcher.resources import PACKAGE_DIR


def measurement_overrides(steps, out_dir, run_name="estimate-measure"):
    """Run-config overrides for a short measuring run: every step logged, no eval, no checkpoints."""
    return ["--max_steps", str(steps + WARMUP_STEPS), "--logging_steps", "1", "--eval_fraction", "0",
            "--lr_scheduler", "constant", "--warmup_steps", "0", "--warmup_ratio", "0", "--save_steps", "1000000",
            "--eval_steps", "1000000", "--report_to", "[]", "--output_dir", str(out_dir), "--run_name", run_name,
            "--resume", "never"]


def run_measurement(config_path, mode, steps, nproc, overrides=(), out_dir=None, timeout=None):
    """Train `steps` (+ warm-up) real steps of the run through the launcher and the trainer; return the run's
    training_history.json as a dict. Raises EstimateError with the trainer's output tail when it fails."""
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ftl-measure-"))
    config_path = _config_with_mode(config_path, mode, out_dir)
    cmd = [sys.executable, "-m", "finetune_launcher.launch", "--mode", mode, str(config_path), "--no-preflight",
           "--nproc-per-node", str(nproc), *map(str, overrides), *measurement_overrides(steps, out_dir)]
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=PACKAGE_DIR.parent, env=env, capture_output=True, text=True, timeout=timeout)
    history_file = out_dir / "estimate-measure" / "training_history.json"
    if proc.returncode != 0 or not history_file.exists():
        tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
        raise EstimateError(f"the measuring run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(history_file.read_text())


def _config_with_mode(config_path, mode, out_dir):
    """The launcher insists that a config's mode matches the launcher's: write a copy when measuring another mode."""
    data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    if data.get("mode") == mode:
        return config_path
    data["mode"] = mode
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / f"{Path(config_path).stem}-{mode}.yaml"
    copy.write_text(yaml.safe_dump(data))
    return copy


def spec_from_history(history, gpu=None):
    """(RunSpec, Device) of a run from its training_history.json metadata."""
    meta = history.get("metadata") or {}
    if "config" not in meta:
        raise EstimateError("this training_history.json has no metadata.config; it was not written by this trainer")
    config = dict(meta["config"])
    world = int(meta.get("world_size", 1))
    nnodes = int((meta.get("estimate") or {}).get("nnodes", 1))
    device_name = str(meta.get("device", "cpu"))
    if gpu:
        device = resolve_device(gpu, world // nnodes)
    elif device_name.startswith("cpu"):
        device = cpu_device(world // nnodes)
    else:
        device = device_from_cuda_name(device_name)
        if device is None:
            raise EstimateError(f"the run's device '{device_name}' is not in the estimator's GPU table "
                                f"(finetune_launcher/estimate/gpu_table.json); pass --gpu (known: "
                                f"{', '.join(known_gpus())})")
    spec = spec_from_config(config, world // nnodes, nnodes, gpu=device.name)
    if meta.get("total_steps"):
        spec = replace(spec, max_steps=int(meta["total_steps"]))
    return spec, device


def calibrate_from_history(history, gpu=None, path=None, save=True):
    """(cold estimate, calibration entry, calibrated estimate) from a finished or running job's history."""
    spec, device = spec_from_history(history, gpu)
    cold = estimate(spec, calibration={}, device=device, with_alternatives=False)
    measured = measured_step_time(history.get("records", []))
    entry = fit_calibration(cold, measured, source=str(history.get("metadata", {}).get("run_name", "history")))
    if save:
        save_calibration(entry, path)
    calibrated = estimate(spec, calibration={entry["key"]: entry}, device=device)
    return cold, entry, calibrated

