"""The diffusion parts in a real 2-process DeepSpeed engine on the CPU: ZeRO-3 partitions the UNet (QLoRA with bf16
4-bit storage included), training lowers the validation loss that both ranks compute identically, sampling runs on
every rank, and the LoRA gathered from the shards loads into the base pipeline and changes its image."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO, launcher_env

pytestmark = pytest.mark.slow


def run_worker(out_dir, mode, stage, precision, text_encoder_lora):
    from train.distributed import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "e2e" / "sd_zero_worker.py"), mode, str(stage), precision,
           "1" if text_encoder_lora else "0", str(out_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=launcher_env(OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


@pytest.mark.parametrize("mode,stage,precision,text_encoder_lora",
                         [("lora", 2, "fp32", False), ("qlora", 3, "bf16", True)])
def test_zero_training_lowers_validation_loss_and_saves_a_loadable_lora(tmp_path, mode, stage, precision,
                                                                       text_encoder_lora):
    from diffusers import StableDiffusionPipeline

    from train.models.tiny import resolve_model_path

    path = resolve_model_path("builtin:tiny-sd")  # built once here, not by both ranks
    results = run_worker(tmp_path / "lora", mode, stage, precision, text_encoder_lora)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(r["partitioned"] == (stage == 3) for r in results)
    assert results[0]["val_before"] == results[1]["val_before"] and results[0]["val_after"] == results[1]["val_after"]
    assert results[0]["val_after"] < 0.97 * results[0]["val_before"]
    assert all(r["sample_size"] == [64, 64] for r in results)
    assert (tmp_path / "lora" / "text_encoder").exists() == text_encoder_lora

    pipeline = StableDiffusionPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)

    def image():
        return pipeline("a red circle", height=64, width=64, num_inference_steps=4, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images[0]

    base = image()
    pipeline.load_lora_weights(tmp_path / "lora")
    assert np.abs(image() - base).mean() > 0.01
