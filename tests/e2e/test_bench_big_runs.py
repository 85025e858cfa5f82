"""bench/big_runs.py end to end on the CPU at a tiny shape (what a multi-GPU session will run at 32B): the run saves
at half its steps on 2 processes, and its checkpoint resumed on 2 and on 1 process (fsdp2: DCP reshards) repeats
the saved run's losses; the JSON a device call returns holds every row."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, launcher_env

pytestmark = pytest.mark.slow


def test_a_checkpoint_of_two_processes_resumes_on_two_and_on_one_with_the_same_losses(tmp_path):
    out = tmp_path / "big.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "big_runs.py"), "--tiny", "--cases",
                           "qwen2.5-32b-lora", "--checkpoint", "--set", "engine=fsdp2", "--set", "zero_stage=3",
                           "--min-case-s", "10", "--work-dir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=REPO, env=launcher_env(FTL_CPU_PROCS="2"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["run"]: row for row in json.loads(out.read_text())["cases"]}
    assert list(rows) == ["measure", "resume on 2", "resume on 1"]
    assert rows["measure"]["processes"] == 2 and rows["measure"]["engine"].startswith("fsdp2")
    assert [save["step"] for save in rows["measure"]["saves"] if save["what"] == "checkpoint"][0] == 2
    for run in ("resume on 2", "resume on 1"):
        assert rows[run]["resumed_at_step"] == 2, run
        assert sorted(int(step) for step in rows[run]["losses"]) == [3, 4], run
        assert rows[run]["loss_max_rel_diff"] < 1e-4 and rows[run]["same_losses"] is True, run
    assert rows["resume on 1"]["config"]["gradient_accumulation_steps"] == \
        2 * rows["measure"]["config"]["gradient_accumulation_steps"]
    assert "resumed at step 2" in proc.stdout
