"""Console output that never crashes a run: ASCII-safe streams, rank-0 printing, and a progress line with ETA."""
import os
import sys
import time
from collections.abc import Mapping
from typing import TextIO


def make_console_safe() -> None:
    """Unencodable characters (from any library) are escaped instead of raising UnicodeEncodeError, so a GBK or
    ASCII console cannot kill a finished run; library progress bars are turned off (ours is ASCII)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace", line_buffering=True)
        except (AttributeError, ValueError):
            pass
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter, not about the run
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    """Print on rank 0 only, ASCII-safe."""
    if is_main_process():
        print(ascii_safe(message), flush=True)


def warn(message: str) -> None:
    if is_main_process():
        print(ascii_safe(f"WARNING: {message}"), file=sys.stderr, flush=True)


def ascii_safe(text: object) -> str:
    return str(text).encode("ascii", "backslashreplace").decode("ascii")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


class Progress:
    """`step 120/300 [########..........] 40% loss 1.234 lr 2.0e-04 0.52 s/step ETA 0:01:33` on rank 0.
    On a terminal the line redraws in place; in a log file one line is written every `every` steps."""

    def __init__(self, total_steps: int, start_step: int = 0, every: int = 10, stream: TextIO | None = None) -> None:
        self.total, self.start, self.every = total_steps, start_step, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.time()
        self.first = None  # (step, time) of the first update: the rate is measured from there
        self.enabled = is_main_process()

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at the rate since the first step ended, so the first step's one-off costs (compiling the
        layers, CUDA and allocator warm-up) do not inflate the estimate; from the start while only one is done."""
        now = time.time()
        if self.first is not None and step > self.first[0]:
            since_step, since = self.first
        elif step > self.start:
            since_step, since = self.start, self.t0
        else:
            return None
        return (now - since) / (step - since_step) * (self.total - step)

    def line(self, step: int, metrics: Mapping[str, object]) -> str:
        width = 20
        filled = int(width * step / max(1, self.total))
        bar = "#" * filled + "." * (width - filled)
        eta = self.eta_seconds(step)
        parts = [f"step {step}/{self.total} [{bar}] {100 * step / max(1, self.total):3.0f}%"]
        parts += [f"{k} {v}" for k, v in metrics.items()]
        parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
        return ascii_safe(" ".join(parts))

    def update(self, step: int, metrics: Mapping[str, object]) -> None:
        if not self.enabled:
            return
        if self.first is None and step > self.start:
            self.first = (step, time.time())
        if self.tty:
            self.stream.write("\r" + self.line(step, metrics) + "\033[K")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(self.line(step, metrics) + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
