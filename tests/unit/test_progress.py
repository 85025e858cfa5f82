"""The progress line's ETA: measured from the end of the first step, so a first step that compiles the layers does
not make a short run look hours long."""
import io

from finetune_launcher import console


class Clock:
    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


def test_eta_ignores_a_slow_first_step(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "time", clock.time)
    progress = console.Progress(total_steps=440, every=10, stream=io.StringIO())
    progress.enabled = True
    clock.now += 38.0  # step 1: compiling the decoder layers
    progress.update(1, {})
    for step in range(2, 11):
        clock.now += 0.04
        progress.update(step, {})
    eta = progress.eta_seconds(10)
    assert abs(eta - 0.04 * 430) < 0.5, eta  # before: 38.4 / 10 * 430 = 1651 s


def test_eta_after_one_step_and_on_resume(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(console.time, "time", clock.time)
    progress = console.Progress(total_steps=100, start_step=60, stream=io.StringIO())
    progress.enabled = True
    assert progress.eta_seconds(60) is None
    clock.now += 2.0
    progress.update(61, {})
    assert abs(progress.eta_seconds(61) - 2.0 * 39) < 1e-6  # one step so far: its own time is all we have
    assert "ETA 0:01:18" in progress.line(61, {"loss": "1.0"})
