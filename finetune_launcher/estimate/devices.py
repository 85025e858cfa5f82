"""Devices: the GPU table (gpu_table.json beside this module), this machine's CPU, interconnects between nodes, and
which device this machine has (nvidia-smi first: no torch import)."""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from finetune_launcher.estimate.inputs import GIB, EstimateError

GPU_TABLE_PATH = Path(__file__).with_name("gpu_table.json")
CPU_PEAK_GFLOPS_PER_CORE = 100.0  # fp32 GEMM on one AVX-512 core (about 97 measured here; AVX2 cores: half)
CPU_MFU = 0.85
CPU_MEMORY_GBPS_PER_RANK = 20.0
CPU_GLOO_BUSBW_GBPS = 0.5  # DeepSpeed collectives over gloo between processes of one machine (measured)


@dataclass
class Device:
    name: str
    memory_gib: float
    tflops: dict
    hbm_tbps: float
    intra_busbw_gbps: float
    mfu: dict
    link: str = ""
    kind: str = "gpu"  # or "cpu"
    # compiled layers (step_time.py): the fraction of the dense peak the training matrix products reach, and of the
    # memory bandwidth the memory-bound kernels reach; None where not measured (the MFU prior is used)
    tensor_core_efficiency: float = None
    memory_efficiency: float = 1.0

    def peak_flops(self, precision):
        value = self.tflops.get(precision)
        if value is None:
            raise EstimateError(f"{self.name} has no {precision} support; use precision fp16 (or fp32)")
        return value * 1e12


def _gpu_table():
    return json.loads(GPU_TABLE_PATH.read_text())


def known_gpus():
    return sorted(_gpu_table()["devices"]) + ["cpu"]


def known_interconnects():
    return sorted(k for k in _gpu_table()["interconnects"] if not k.startswith("_"))


def cpu_device(procs_per_node=1, cores=None):
    """This machine's CPU, shared by `procs_per_node` ranks: its RAM and its cores (`cores`, default this
    machine's count, e.g. another machine's to re-predict its measurements) split between them."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        ram = 16.0
    cores = cores or os.cpu_count() or 1
    per_rank_cores = max(1, cores // max(1, procs_per_node))
    gflops = CPU_PEAK_GFLOPS_PER_CORE * per_rank_cores
    return Device(name="cpu", memory_gib=ram / max(1, procs_per_node),
                  tflops={"fp32": gflops / 1e3, "bf16": gflops / 1e3, "fp16": None},
                  hbm_tbps=CPU_MEMORY_GBPS_PER_RANK * per_rank_cores / 1e3, intra_busbw_gbps=CPU_GLOO_BUSBW_GBPS,
                  mfu={"full": CPU_MFU, "lora": CPU_MFU}, link="gloo", kind="cpu")


def resolve_device(name, procs_per_node=1):
    """A device from the table by name (case and separators ignored), or `cpu`."""
    if name.lower() == "cpu":
        return cpu_device(procs_per_node)
    devices = _gpu_table()["devices"]
    key = _device_key(name, devices)
    if key is None:
        raise EstimateError(f"unknown GPU type '{name}'. Known: {', '.join(known_gpus())} (also as CUDA names them, "
                            f"e.g. H100, A100, RTX 4090, and with the memory: RTX4090-24GB)")
    return Device(name=key, **{k: v for k, v in devices[key].items() if k != "match"})


def _device_key(name, devices):
    """The table entry `name` means: its key, a CUDA name it matches (H100, RTX 4090), or either with the memory
    size after it (RTX4090-24GB) when that size is the entry's."""
    def norm(text):
        return re.sub(r"[^a-z0-9]", "", text.lower())

    wanted = norm(name)
    exact = [key for key in devices if norm(key) == wanted]
    cuda_named = [key for key, entry in devices.items() if any(norm(c) == wanted for c in entry["match"])]
    if exact or cuda_named:
        return (exact or cuda_named)[0]
    sized = re.fullmatch(r"(.+)[-_ ](\d+) ?gb", name.strip().lower())
    if sized:
        base, gib = norm(sized.group(1)), int(sized.group(2))
        for key, entry in devices.items():
            same_size = abs(entry["memory_gib"] - gib) <= 0.1 * gib
            if same_size and any(norm(c) == base for c in [key, *entry["match"]]):
                return key
    return None


def device_from_cuda_name(cuda_name, memory_bytes=None):
    """Map torch.cuda.get_device_name() to a table entry (longest matching substring wins)."""
    devices = _gpu_table()["devices"]
    best, best_len = None, 0
    for key, entry in devices.items():
        for pattern in entry["match"]:
            if pattern.lower() in cuda_name.lower() and len(pattern) > best_len:
                best, best_len = key, len(pattern)
    if best is None:
        return None
    device = resolve_device(best)
    if memory_bytes:
        device.memory_gib = memory_bytes / GIB
    return device


def inter_node_busbw(device, interconnect):
    table = _gpu_table()["interconnects"]
    if interconnect not in table or interconnect.startswith("_"):
        raise EstimateError(f"unknown interconnect '{interconnect}'. Known: {', '.join(known_interconnects())}")
    link = table[interconnect]
    return min(device.intra_busbw_gbps, link["nic_gbps"] * link["efficiency"])


def default_interconnect(device):
    if device.name in ("H100-80GB", "H200", "B200"):
        return "ib-8x400"
    if device.name.startswith("A100"):
        return "ib-8x200"
    return "eth-100"


def _nvidia_smi_device():
    """The first GPU from nvidia-smi (fast, no torch import), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, _, mib = out[0].rpartition(",")
    device = device_from_cuda_name(name.strip(), float(mib) * 1024 ** 2 if mib.strip().isdigit() else None)
    if device is None:
        raise EstimateError(f"GPU '{name.strip()}' is not in finetune_launcher/estimate/gpu_table.json; pass --gpu "
                            f"(known: {', '.join(known_gpus())})")
    return device


def detect_device(nproc):
    """The table entry for this machine's GPU, or the CPU when there is none (no torch import when possible)."""
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return cpu_device(nproc)
    device = _nvidia_smi_device()
    if device is not None:
        return device
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            device = device_from_cuda_name(name, torch.cuda.get_device_properties(0).total_memory)
            if device is None:
                raise EstimateError(f"GPU '{name}' is not in finetune_launcher/estimate/gpu_table.json; known: "
                                    f"{', '.join(known_gpus())}")
            return device
    except ImportError:
        pass
    return cpu_device(nproc)


