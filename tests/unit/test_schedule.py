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
