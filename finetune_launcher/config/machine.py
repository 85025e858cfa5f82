"""The machine a run is resolved for: this one (GPUs found through nvidia-smi, without starting CUDA in the
launcher, which would hold memory on GPU 0 for the whole run) or a named GPU type for a pre-flight elsewhere
(`submit --gpu H100-80GB`)."""
import shutil
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class Machine:
    kind: str               # "cuda" or "cpu"
    gpus: int = 0
    gpu: str = None         # the estimator's device name (gpu_table.json), None on the CPU
    bf16: bool = False
    local: bool = True      # False: a GPU type named for a pre-flight, not this machine

    @property
    def on_gpu(self):
        return self.kind == "cuda"


def detect():
    """This machine: its GPUs (count, table name, bf16 support from the compute capability) or the CPU."""
    rows = _nvidia_smi_rows()
    if not rows:
        return Machine("cpu")
    name, compute_cap = rows[0]
    return Machine("cuda", gpus=len(rows), gpu=_table_name(name), bf16=compute_cap >= 8.0)


def named(gpu_name):
    """A GPU type for a pre-flight on another machine (the estimator's table says whether it has bf16)."""
    if gpu_name.lower() == "cpu":
        return Machine("cpu", local=False)
    from finetune_launcher.estimate import resolve_device

    device = resolve_device(gpu_name)
    return Machine("cuda", gpus=0, gpu=device.name, bf16=bool(device.tflops.get("bf16")), local=False)


def _nvidia_smi_rows():
    if not shutil.which("nvidia-smi"):
        return []
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in proc.stdout.strip().splitlines() if proc.returncode == 0 else []:
        name, _, cap = line.rpartition(",")
        try:
            rows.append((name.strip(), float(cap)))
        except ValueError:
            continue
    return rows


def _table_name(cuda_name):
    from finetune_launcher.estimate import device_from_cuda_name

    device = device_from_cuda_name(cuda_name)
    return device.name if device else cuda_name
