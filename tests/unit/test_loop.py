"""The shared loop in one process, without a launch: a toy regression task on the plain engine reaches the loop's
rules (resume, the non-finite stop, plateau LR and early stopping) the recipes rely on."""
import json
import math

import pytest
import torch

from finetune_launcher.config import RunConfig
from finetune_launcher.data.sampling import ShardedSampler
from finetune_launcher.distributed import RankContext
from finetune_launcher.engines import torch_adamw
from finetune_launcher.engines.plain import PlainEngine
from finetune_launcher.guards import StopSignal, TrainingError, Watchers
from finetune_launcher.loop import train
from finetune_launcher.task import Engine, Sampler, StepTask, Task

CPU = RankContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


class ToyTask(StepTask):
    """y = x . w_true + noise; the loss is the squared error summed over samples."""
    unit = "sample"
    throughput = "images"

    def __init__(self, cfg, model, eval_shift=0.0):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 4, generator=generator)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.01 * torch.randn(64, generator=generator)
        sampler = ShardedSampler(48, 0, 1, cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.seed)
        super().__init__(cfg, CPU, sampler, {"format": "toy"})
        self.model, self.eval_shift = model, eval_shift

    def collate(self, group, epoch, step_in_epoch, micro):
        return {"x": self.x[group], "y": self.y[group]}

    def count(self, group, batch):
        return len(group), len(group), len(group)

    def loss(self, engine, batch, normaliser):
        return ((engine(batch["x"]).squeeze(-1) - batch["y"]) ** 2).sum() / normaliser

    def evaluate(self, engine):
        with torch.no_grad():
            return float(((engine(self.x[48:]).squeeze(-1) - self.y[48:]) ** 2).mean()) + self.eval_shift

    def save_weights(self, engine, out_dir, info):
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), out_dir / "model.pt")


class NoEstimate:
    def attach(self, history):
        return self

    def observe(self, step, record):
        pass


def config(tmp_path, **changes):
    values = dict(mode="full", model="toy", dataset="toy", recipe="causal_lm", run_name="toy", engine="ddp",
                  output_dir=str(tmp_path), precision="fp32", micro_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=0.3, lr_scheduler="constant", max_steps=24, eval_steps=6, logging_steps=1,
                  save_steps=6, report_to=(), max_grad_norm=0.0)
    return RunConfig(**{**values, **changes})


def run(cfg, eval_shift=0.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    task = ToyTask(cfg, model, eval_shift)
    engine = PlainEngine(model, cfg, lambda params: torch_adamw(params, cfg), CPU.device, 1)
    outcome = train(cfg, CPU, task, engine, Watchers(StopSignal(), NoEstimate()), (5, 5))
    history = json.loads((cfg.run_dir / "training_history.json").read_text())
    return outcome, history, task, engine


def losses(history):
    return {row["step"]: row["loss"] for row in history["records"]}


def test_the_toy_task_and_the_plain_engine_answer_the_loops_contracts(tmp_path):
    cfg = config(tmp_path)
    model = torch.nn.Linear(4, 1)
    task = ToyTask(cfg, model)
    engine = PlainEngine(model, cfg, lambda params: torch_adamw(params, cfg), CPU.device, 1)
    assert isinstance(task, Task) and isinstance(task.sampler, Sampler) and isinstance(engine, Engine)


def test_the_loss_falls_and_best_and_final_are_written(tmp_path):
    outcome, history, _, _ = run(config(tmp_path))
    assert outcome.code == 0 and history["status"] == "completed"
    steps = losses(history)
    assert steps[24] < 0.05 * steps[1]
    assert (tmp_path / "toy" / "final" / "model.pt").is_file() and (tmp_path / "toy" / "best" / "model.pt").is_file()
    trained = [e for e in history["evals"] if e["step"] > 0]
    assert history["best"]["step"] == min(trained, key=lambda e: e["eval_loss"])["step"]


def test_a_resumed_run_continues_with_the_losses_of_an_uninterrupted_one(tmp_path):
    _, whole, _, _ = run(config(tmp_path / "whole"))
    run(config(tmp_path / "split", max_steps=12))
    _, resumed, _, _ = run(config(tmp_path / "split", max_steps=24))
    assert resumed["metadata"]["resumed_at_steps"] == [12]
    for step in range(13, 25):
        assert losses(resumed)[step] == pytest.approx(losses(whole)[step], rel=1e-6), step


def test_a_non_finite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, debug_nan_at_step=8)
    with pytest.raises(TrainingError, match="step 8"):
        run(cfg)
    history = json.loads((cfg.run_dir / "training_history.json").read_text())
    assert history["status"] == "failed" and max(losses(history)) == 7
    assert (cfg.run_dir / "checkpoints" / "latest").read_text().strip() == "step-6"


def test_a_plateau_lowers_the_lr_and_early_stopping_ends_the_run(tmp_path):
    """A rising eval loss never improves on the first eval: the plateau halves the LR after `plateau_patience`
    evals, and `early_stopping_patience` evals without improvement stop the run with the reason."""
    cfg = config(tmp_path, lr_scheduler="plateau", plateau_patience=1, plateau_factor=0.5, eval_steps=3,
                 early_stopping_patience=2, max_steps=30, learning_rate=1e-6)

    class Rising(ToyTask):
        def evaluate(self, engine):
            self.evals = getattr(self, "evals", 0) + 1
            return 1.0 + self.evals

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    task = Rising(cfg, model)
    engine = PlainEngine(model, cfg, lambda params: torch_adamw(params, cfg), CPU.device, 1)
    train(cfg, CPU, task, engine, Watchers(StopSignal(), NoEstimate()), (5, 5))
    history = json.loads((cfg.run_dir / "training_history.json").read_text())
    rates = {row["step"]: row["learning_rate"] for row in history["records"]}
    # evals at 3 (the best), 6 (worse: plateau, LR halved), 9 (worse again: the second without improvement, stop)
    assert rates[6] == pytest.approx(1e-6) and rates[7] == pytest.approx(0.5e-6)
    assert history["stopped_early_at"] == 9 and "2 evals" in history["stop_reason"], history["stop_reason"]
    assert math.isfinite(history["evals"][-1]["eval_loss"])
