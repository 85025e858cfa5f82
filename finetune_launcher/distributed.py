"""The process group of a run: rank layout from the launcher's environment, start and stop, and the few collectives
the recipes use (sums of counts and losses, barriers)."""
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, deepspeed, accelerate, srun)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> RankContext:
    """Start the process group (NCCL on GPUs, gloo on the CPU; a world of one without a launcher)."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env()[2])
    if "MASTER_ADDR" not in os.environ:  # plain `python -m finetune_launcher`
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    rank, world, local_rank = dist_env()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return RankContext(rank, world, local_rank, device)


def shutdown_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce(values: Sequence[float | torch.Tensor], device: torch.device, op: str) -> list[float]:
    """Floats or 0-d tensors (left on the device until here) reduced over all ranks, in float64 so token counts
    stay exact. With one process, host numbers stay on the host (no copy to the GPU and back, no sync)."""
    if world_size() == 1 and not any(torch.is_tensor(v) for v in values):
        return [float(v) for v in values]
    return reduced_tensor(values, device, op).tolist()


def reduced_tensor(values: Sequence[float | torch.Tensor], device: torch.device, op: str = "SUM") -> torch.Tensor:
    """The reduction of `values` as one float64 tensor on `device`, not yet copied to the host: the caller decides
    when to synchronise."""
    import torch.distributed as dist

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    return _all_reduce(values, device, "SUM")


def all_reduce_max(values: Sequence[float | torch.Tensor], device: torch.device) -> list[float]:
    return _all_reduce(values, device, "MAX")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
