"""tools/estimate_time.py --measure: real steps of the configured run through the launcher and the trainer refit the
throughput term, and later estimates use the saved calibration."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, launcher_env

pytestmark = pytest.mark.slow

CONFIG = str(REPO / "configs" / "tiny_lora.yaml")


def estimate_time(*args):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_time.py"), *map(str, args), "--json"],
                          cwd=REPO, env=launcher_env(OMP_NUM_THREADS=1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_measure_refits_on_real_steps_and_later_estimates_use_it(tmp_path):
    calibration = tmp_path / "calibration.json"
    measured = estimate_time("--config", CONFIG, "--measure", 4, "--calibration", calibration)
    note = measured["calibration"]
    assert note["measured_step_time_s"] > 0 and note["key"] == "cpu/fp32"
    assert note["factor"] == pytest.approx(note["measured_step_time_s"] / note["cold_step_time_s"], rel=0.25)
    assert measured["step_time_calibrated_s"] == pytest.approx(note["measured_step_time_s"], rel=0.02), \
        "re-predicting the measured run gives the measurement back"
    saved = json.loads(calibration.read_text())["cpu/fp32"]
    assert saved["source"] == "estimate-measure" and saved["factor"] == pytest.approx(note["factor"])

    later = estimate_time("--config", CONFIG, "--calibration", calibration)
    assert later["step_time_s"] == pytest.approx(note["measured_step_time_s"], rel=0.02)
    bigger = estimate_time("--config", CONFIG, "--calibration", calibration, "--micro-batch", 8)
    assert bigger["step_time_s"] > 1.5 * later["step_time_s"], "the calibrated model still scales with the work"


def test_json_on_stdout_stays_json_while_the_model_cache_is_built(tmp_path):
    """A cold cache builds the tiny model first, and DeepSpeed's import logs to stdout: --json must not mix them."""
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "estimate_time.py"), "--config", CONFIG, "--json"],
                          cwd=REPO, env=launcher_env(FTL_CACHE_DIR=tmp_path / "cold"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cold" / "models").is_dir(), "the cache was built by this call"
    assert json.loads(proc.stdout)["fits"] is True
