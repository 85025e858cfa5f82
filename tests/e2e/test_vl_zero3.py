"""ZeRO-3 with 2 processes on the tiny Qwen3-VL where one rank's micro-batches are text-only: LoRA (+ merger), full
and QLoRA train and evaluate without a hang (the blank-image rule), with really partitioned parameters."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, launcher_env

pytestmark = pytest.mark.slow
MODES = ("lora", "full", "qlora")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from train.distributed import free_port

    out = tmp_path_factory.mktemp("vl_zero3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(REPO / "tests" / "e2e" / "vl_zero3_worker.py"), str(out), *MODES]
    # the timeout turns a hang into a failure instead of a stuck CI job
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS=1), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    found = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return {(r["mode"], r["rank"]): r for r in found}


@pytest.mark.parametrize("mode", MODES)
def test_text_only_rank_trains_beside_an_image_rank(results, mode):
    import math

    image_rank, text_rank = results[(mode, 0)], results[(mode, 1)]
    for r in (image_rank, text_rank):
        assert r["partitioned"], "ZeRO-3 did not shard the model"
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"] + [r["eval_loss"]])
    assert text_rank["blank_image"] and not image_rank["blank_image"]
