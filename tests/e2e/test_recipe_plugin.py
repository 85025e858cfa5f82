"""A fourth recipe needs its own files and one recipe-table entry, nothing else: tests/e2e/toy_recipe.py registers
one from outside the package and the real launcher trains it on 2 processes."""
import json
import random

import torch

from tests.conftest import REPO, assert_ok, launcher_env, read_history, run_launcher


def write_data(path, n=96, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            x = [rng.uniform(-1, 1) for _ in range(3)]
            f.write(json.dumps({"x": x, "y": 2 * x[0] - x[1] + 0.5 * x[2]}) + "\n")
    return path


def test_a_recipe_registered_from_a_test_module_trains_through_the_launcher(tmp_path):
    data = write_data(tmp_path / "rows.jsonl")
    config = tmp_path / "toy.yaml"
    config.write_text(f"recipe: toy_regression\nmode: full\nmodel: toy:linear-3\ndataset: {data}\n"
                      f"target_scale: 2.0\neval_fraction: 0.25\nmicro_batch_size: 4\nmax_steps: 40\n"
                      f"eval_steps: 10\nlogging_steps: 5\nsave_steps: 10\nlearning_rate: 0.2\n"
                      f"lr_scheduler: constant\ngradient_checkpointing: false\noutput_dir: {tmp_path}\n")
    proc = run_launcher("train_full.sh", config, "--no-preflight",
                        env=launcher_env(FTL_RECIPES="tests.e2e.toy_recipe"), fresh=True)
    assert_ok(proc)
    history = read_history(tmp_path / "toy")
    assert history["metadata"]["recipe"] == "toy_regression" and history["metadata"]["world_size"] == 2
    assert history["metadata"]["config"]["target_scale"] == 2.0  # its own key, declared in its table entry
    evals = [e["eval_loss"] for e in history["evals"]]
    assert evals[-1] < 0.1 * evals[0], evals
    weights = torch.load(tmp_path / "toy" / "final" / "model.pt")["weight"][0]
    assert torch.allclose(weights, torch.tensor([4.0, -2.0, 1.0]), atol=0.5), weights  # 2 x the true weights


def test_without_registration_the_recipe_is_unknown_before_launch(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(f"recipe: toy_regression\nmode: full\nmodel: toy:linear-3\ndataset: {REPO}/x.jsonl\n")
    proc = run_launcher("train_full.sh", config, env=launcher_env(FTL_RECIPES=""), fresh=True)
    assert proc.returncode == 2 and "unknown recipe 'toy_regression'" in proc.stderr and "FTL_RECIPES" in proc.stderr, \
        proc.stderr[-2000:]
