"""The model cache is built by whichever rank gets its lock first, after the process group exists (a plain
`torchrun -m finetune_launcher` on a fresh machine). transformers then writes weights only on rank 0: a build by
rank 1 once left a cache entry with tokenizer files only, and every later load failed."""
import subprocess
import sys

import pytest

from tests.conftest import REPO, launcher_env

pytestmark = pytest.mark.slow

RANK_ONE_BUILDS_FIRST = """
import os
import torch.distributed as dist
from pathlib import Path
from finetune_launcher.distributed import init_distributed
from finetune_launcher.models.references import resolve_model_path

rank = init_distributed().rank
if rank == 0:
    dist.barrier()  # rank 1 holds the lock and builds; rank 0 finds the entry built
path = Path(resolve_model_path("builtin:tiny-llama"))
if rank == 1:
    dist.barrier()
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(path)
print(f"RANK {rank} {sorted(os.listdir(path))} {sum(p.numel() for p in model.parameters())}", flush=True)
dist.destroy_process_group()
"""


def test_a_cache_entry_built_by_rank_one_has_weights_and_config(tmp_path):
    from finetune_launcher.distributed import free_port

    script = tmp_path / "build.py"
    script.write_text(RANK_ONE_BUILDS_FIRST)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script)]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(FTL_CACHE_DIR=tmp_path / "cache", OMP_NUM_THREADS=1),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("RANK "))
    assert len(lines) == 2, proc.stdout
    for line in lines:
        assert "config.json" in line and "model.safetensors" in line, line
    assert lines[0].split()[-1] == lines[1].split()[-1] and int(lines[0].split()[-1]) > 1_000_000, lines
