import math

import pytest

from finetune_launcher.config import RunConfig
from finetune_launcher.schedule import EvalTracker, LRSchedule


def cfg(**extra):
    return RunConfig(**{"mode": "lora", "model": "m", "dataset": "d.jsonl", "learning_rate": 1.0,
                                  **extra})


def test_warmup_then_cosine_to_min_lr():
    schedule = LRSchedule(cfg(warmup_steps=10, min_lr=0.1), total_steps=110)
    assert schedule.lr_at(5) == pytest.approx(0.5)
    assert schedule.lr_at(10) == pytest.approx(1.0)
    assert schedule.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.lr_at(110) == pytest.approx(0.1)


def test_linear_decay():
    schedule = LRSchedule(cfg(lr_scheduler="linear"), total_steps=100)
    assert schedule.lr_at(50) == pytest.approx(0.5)


def test_plateau_halves_lr_after_patience_and_stops_below_min_lr():
    config = cfg(lr_scheduler="plateau", plateau_patience=2, plateau_factor=0.5, min_lr=0.3,
                 improvement_threshold=0.01)
    schedule = LRSchedule(config, 100)
    tracker = EvalTracker(config, schedule)
    assert tracker.on_eval(2.0, 10)["improved"]
    assert not tracker.on_eval(1.995, 20)["improved"]  # within the threshold: not an improvement
    event = tracker.on_eval(2.1, 30)
    assert event["lr_reduced"] and schedule.lr_at(31) == pytest.approx(0.5) and event["stop_reason"] is None
    tracker.on_eval(2.1, 40)
    event = tracker.on_eval(2.1, 50)
    assert event["lr_reduced"] and "below min_lr" in event["stop_reason"]


def test_early_stopping_and_min_eval_loss():
    config = cfg(early_stopping_patience=2, min_eval_loss=0.5)
    tracker = EvalTracker(config, LRSchedule(config, 100))
    tracker.on_eval(1.0, 1)
    assert tracker.on_eval(1.2, 2)["stop_reason"] is None
    assert "early stopping" in tracker.on_eval(1.1, 3)["stop_reason"]
    assert "min_eval_loss" in tracker.on_eval(0.4, 4)["stop_reason"]


def test_tracker_state_round_trips():
    config = cfg()
    tracker = EvalTracker(config, LRSchedule(config, 10))
    tracker.on_eval(1.5, 7)
    other = EvalTracker(config, LRSchedule(config, 10))
    other.load_state_dict(tracker.state_dict())
    assert other.best_loss == 1.5 and other.best_step == 7 and not math.isinf(other.best_loss)


def test_a_relative_threshold_is_a_percentage_of_the_best_loss():
    """The user's plateau rule: LR halved when val loss improves by less than 5% for one eval."""
    config = cfg(lr_scheduler="plateau", plateau_patience=1, plateau_factor=0.5, improvement_threshold="5%")
    schedule = LRSchedule(config, 100)
    tracker = EvalTracker(config, schedule)
    assert tracker.on_eval(2.0, 1)["improved"]
    event = tracker.on_eval(1.92, 2)  # 4% better: not enough
    assert not event["improved"] and event["lr_reduced"] and schedule.scale == 0.5
    assert tracker.on_eval(1.80, 3)["improved"]  # 10% better than 2.0


class ScriptedEvals:
    """A task whose evals return the given losses in turn and whose best/ saves are recorded."""

    stats = {}

    def __init__(self, losses):
        self.losses, self.saved = list(losses), []

    def evaluate(self, engine):
        return self.losses.pop(0)

    def after_eval(self, engine, step):
        return {}

    def save_weights(self, engine, out_dir, info):
        self.saved.append((out_dir.name, info["step"]))


def test_the_console_says_what_best_is_chosen_among(tmp_path, capsys):
    """Step 0 evaluates the base model; best/ holds trained weights only, so the first eval after training started
    is best/ even when it is worse than step 0, and the console says both."""
    from types import SimpleNamespace

    from finetune_launcher.history import History, MetricSinks
    from finetune_launcher.loop import Trainer

    config = cfg(output_dir=str(tmp_path), run_name="run")
    schedule = LRSchedule(config, 100)
    task = ScriptedEvals([7.72, 8.31, 8.02, 7.10])
    history = History(tmp_path / "training_history.json", {}, enabled=False)
    trainer = Trainer(config, SimpleNamespace(is_main=True), task, None, schedule, EvalTracker(config, schedule),
                      history, MetricSinks(tmp_path, (), "run", {}, enabled=False), 100,
                      SimpleNamespace(stop=None, estimate=None))
    trainer.evaluate_baseline()
    for step in (10, 20, 30):
        trainer.evaluate_and_track(step)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval step")]
    assert "loss 7.7200 (the base model; best/ is the best eval after it)" in lines[0]
    assert "loss 8.3100 (best since training started -> best/; the base model's 7.7200 at step 0 is lower)" in lines[1]
    assert lines[2].endswith("loss 8.0200 (best since training started -> best/; the base model's 7.7200 at step 0 "
                             "is lower)")
    assert lines[3].endswith("loss 7.1000 (best since training started -> best/)")
    assert task.saved == [("best", 10), ("best", 20), ("best", 30)] and history.data["best"]["step"] == 30
