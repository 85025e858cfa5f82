"""Where a training step's time goes, for the benchmarks (tools/bench.py --profile): torch.profiler over a few
steps, summarised into one small JSON: wall time against the time the GPU ran kernels (and was busy at all), the
kernels and the CPU-side ops that cost most, and the host-device synchronisations and launches counted.

The trainer profiles when FTL_PROFILE_JSON names the output file (rank 0 only), over the steps FTL_PROFILE_STEPS
("first-last", default "4-6"); tools/hf_baseline.py uses the same summary. `kept_for_backward` measures what
autograd keeps for the backward (the estimator's activation terms are checked against it)."""
import contextlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

PROFILE_ENV, STEPS_ENV = "FTL_PROFILE_JSON", "FTL_PROFILE_STEPS"
RUNTIME_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaMemcpyAsync",
                 "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent")


class StepProfiler:
    """`with profiler.step(n): ...` around each training step; profiles steps first..last, then writes `path`."""

    def __init__(self, path=None, first=4, last=6):
        self.path, self.first, self.last = path, first, last
        self.profile, self.t0 = None, None

    @classmethod
    def from_env(cls, is_main):
        path = os.environ.get(PROFILE_ENV)
        if not path or not is_main:
            return cls()
        first, _, last = os.environ.get(STEPS_ENV, "4-6").partition("-")
        return cls(path, int(first), int(last or first))

    @contextlib.contextmanager
    def step(self, step):
        if self.path and step == self.first:
            self.start()
        yield
        if self.profile is not None and step == self.last:
            self.stop()

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        synchronize()
        self.profile = profile(activities=activities)
        self.profile.__enter__()
        self.t0 = time.perf_counter()

    def stop(self):
        synchronize()
        wall = time.perf_counter() - self.t0
        self.profile.__exit__(None, None, None)
        write_summary(self.path, summarize(self.profile, wall, self.last - self.first + 1))
        self.profile = None


@contextlib.contextmanager
def kept_for_backward(module):
    """Counts the bytes autograd keeps for the backward of what runs inside the block, each storage once and
    `module`'s parameters left out. Yields a dict (storage -> bytes): sum its values after the block."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield kept


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(prof, wall_s, steps, top=20):
    """The profile `prof` of `steps` steps that took `wall_s` seconds, as plain numbers (milliseconds per name)."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_kernel = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        by_kernel[e.name][0] += 1
        by_kernel[e.name][1] += e.time_range.elapsed_us() / 1e3
    averages = prof.key_averages()
    cpu_ops = sorted((a for a in averages if a.key not in RUNTIME_CALLS), key=lambda a: -a.self_cpu_time_total)
    kernel_s = sum(ms for _, ms in by_kernel.values()) / 1e3
    busy_s = busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels])
    return {
        "steps": steps, "wall_s": wall_s, "wall_s_per_step": wall_s / steps,
        "kernel_s": kernel_s, "gpu_busy_s": busy_s, "gpu_busy_fraction": busy_s / wall_s if wall_s else None,
        "kernels_launched": len(kernels),
        "runtime_calls": {a.key: {"calls": a.count, "cpu_ms": a.cpu_time_total / 1e3} for a in averages
                          if a.key in RUNTIME_CALLS},
        "top_kernels": [{"name": name[:160], "calls": n, "ms": ms}
                        for name, (n, ms) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]],
        "top_cpu_ops": [{"name": a.key[:160], "calls": a.count, "self_cpu_ms": a.self_cpu_time_total / 1e3,
                         "cpu_total_ms": a.cpu_time_total / 1e3} for a in cpu_ops[:top]],
    }


def busy_seconds(intervals_us):
    """Length of the union of [start, end) intervals in microseconds, in seconds (overlapping streams count once)."""
    total, end = 0.0, None
    for start, stop in sorted(intervals_us):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6


def write_summary(path, summary):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
