"""tools/estimate_time.py --measure: real steps of the configured run through the launcher and the trainer refit the
throughput term; the calibrated estimate of another configuration is checked against that configuration's own
measured run."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, holding_machine, launcher_env

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "configs" / "tiny_lora.yaml")  # micro-batch 4, rows of 256 tokens
BIGGER_MICRO_BATCH = 12
CALIBRATED_TOLERANCE = 0.35


def estimate_time(*args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_time.py"), *map(str, args), "--json"],
                          cwd=REPO, env=launcher_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout)


def calibrated_prediction_error(tmp_path, attempt):
    """Calibrate on the config as it is, predict the bigger micro-batch, measure it: (error, description)."""
    calibration = tmp_path / f"calibration{attempt}.json"
    base = estimate_time("--config", CONFIG, "--measure", 4, "--calibration", calibration)["calibration"]
    saved = json.loads(calibration.read_text())["cpu/fp32"]
    assert base["key"] == "cpu/fp32" and saved["source"] == "estimate-measure"
    assert saved["factor"] == pytest.approx(base["factor"]) and saved["measured_step_time_s"] > 0
    predicted = estimate_time("--config", CONFIG, "--calibration", calibration, "--micro-batch", BIGGER_MICRO_BATCH)
    assert predicted["calibration_factor"] == pytest.approx(saved["factor"]), "later estimates use the calibration"
    bigger = estimate_time("--config", CONFIG, "--micro-batch", BIGGER_MICRO_BATCH, "--measure", 4,
                           "--calibration", tmp_path / f"bigger{attempt}.json")["calibration"]
    error = predicted["step_time_s"] / bigger["measured_step_time_s"] - 1
    return error, (f"micro-batch 4 measured {base['measured_step_time_s']:.3f} s/step; micro-batch "
                   f"{BIGGER_MICRO_BATCH} predicted {predicted['step_time_s']:.3f}, measured "
                   f"{bigger['measured_step_time_s']:.3f} ({error:+.0%})")


def test_calibrated_on_one_run_it_predicts_another_micro_batch(tmp_path):
    """Calibrate on real steps of the config as it is (micro-batch 4), predict micro-batch 12 (three times the work
    per step; the per-step and per-layer overheads do not grow), then measure micro-batch 12 for real. The two
    runs are measured one after the other, with this suite's other launches held off (holding_machine), on a
    machine other jobs may share: a pair whose runs met different loads (seen here: 2.4x apart) is measured once
    more. Quiet, the error is within 7% (docs/estimation.md); an estimate
    that did not scale with the work would be off by about 3x on every attempt."""
    attempts = []
    for attempt in range(2):
        with holding_machine(exclusive=True):  # the other test worker's launches wait meanwhile
            error, description = calibrated_prediction_error(tmp_path, attempt)
        attempts.append(description)
        if abs(error) <= CALIBRATED_TOLERANCE:
            return
    pytest.fail("calibrated prediction off on every attempt: " + "; ".join(attempts))


def test_json_on_stdout_stays_json_while_the_model_cache_is_built(tmp_path):
    """A cold cache builds the tiny model first, and DeepSpeed's import logs to stdout: --json must not mix them."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_time.py"), "--config", CONFIG, "--json"],
                          cwd=REPO, env=launcher_env(FTL_CACHE_DIR=tmp_path / "cold"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cold" / "models").is_dir(), "the cache was built by this call"
    assert json.loads(proc.stdout)["fits"] is True
