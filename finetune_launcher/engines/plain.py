"""`engine: ddp`: LoRA / QLoRA on replicated weights without DeepSpeed. ZeRO-2 partitions only the adapters'
gradients and optimizer states there (a few hundred MB), yet registers a Python hook on every trainable tensor
(448 for LoRA all-linear on 32 layers) and copies each gradient into its buckets. Here gradients accumulate in
`.grad` natively (DDP's C++ reducer averages them across ranks; nothing with one process), the trainable weights
compute in the run's dtype with fp32 master copies for the optimizer (as DeepSpeed's bf16 mode does), and the
clip, the fused AdamW and the copy back are multi-tensor kernels with the grad norm left on the device.

It answers the loop (finetune_launcher/loop.py) and the checkpoints (finetune_launcher/checkpoint.py) like a
DeepSpeed engine does: forward, backward, step, get_global_grad_norm, optimizer, save_checkpoint / load_checkpoint,
the facts."""
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.engines.torch_engine import TorchEngine
from finetune_launcher.errors import ConfigError

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from finetune_launcher.config.settings import RunConfig

STATE_FILE = "plain_engine.pt"


class PlainEngine(TorchEngine):
    kind = "ddp"

    def __init__(self, model: torch.nn.Module, cfg: "RunConfig",
                 make_optimizer: Callable[[Sequence[torch.Tensor]], torch.optim.Optimizer], device: torch.device,
                 world_size: int) -> None:
        super().__init__(model, cfg, device, world_size)
        cast_floating_parameters(model, self.dtype)
        model.to(device)
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        broadcast_from_rank0(self.params, world_size)  # the adapters' initial values differ by rank (seed + rank)
        # fp32 weights train as they are; 16-bit ones get fp32 masters (the optimizer's) with fp32 gradients
        self.masters = self.params if self.dtype == torch.float32 else \
            [p.detach().float().clone().requires_grad_(True) for p in self.params]
        if self.masters is not self.params:
            for master in self.masters:
                master.grad = torch.zeros_like(master)
        self.optimizer = make_optimizer(self.masters)
        self.ddp = wrap_ddp(model, device) if world_size > 1 else None

    # ------------------------------------------------------------ the step

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.ddp is None:
            return self.module(*args, **kwargs)
        # DDP reduces in the backward of a forward made while this is set: only at the accumulation boundary
        self.ddp.require_backward_grad_sync = self.at_boundary() and self.module.training
        return self.ddp(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()  # DeepSpeed's 1/accumulation (DDP averages over ranks)

    def step(self) -> None:
        if not self.at_boundary():
            self.micro_step += 1
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.masters is not self.params:
            torch._foreach_copy_([m.grad for m in self.masters], grads)
        self._global_grad_norm = torch.nn.utils.clip_grad_norm_(self.masters, self.clip_norm(), foreach=True)
        self.optimizer.step()
        if self.masters is not self.params:
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.masters)
        for p in self.params:
            p.grad = None
        self.micro_step += 1

    def zero_optimization_stage(self) -> int:
        return 0

    # ------------------------------------------------------------ weights and checkpoints (replicated: rank 0 writes)

    def full_state_dict(self, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """The weights as CPU tensors on rank 0 (None on the others): the trainable ones only, or the whole state
        dict (see finetune_launcher.engines.full_state_dict)."""
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        if trainable_only:
            return {n: p.detach().cpu().clone() for n, p in self.module.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, save_dir: str | Path, tag: str, client_state: dict[str, Any], save_latest: bool = False,
                        exclude_frozen_parameters: bool = True) -> None:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
        state = {"format": "finetune-launcher plain engine 1", "micro_step": self.micro_step,
                 "weights": {n: m.detach().cpu() for n, m in zip(self.names, self.masters)},
                 "optimizer": self.optimizer.state_dict(), "client_state": client_state}
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save(state, path / STATE_FILE)

    def load_checkpoint(self, load_dir: str | Path, tag: str, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = False,
                        load_module_strict: bool = False) -> tuple[str, dict[str, Any]]:
        path = Path(load_dir) / tag / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{Path(load_dir)}: no {tag}/{STATE_FILE}; this checkpoint was written by the DeepSpeed "
                              f"engine. Resume it with engine: deepspeed, or start fresh with --resume never")
        state = torch.load(path, map_location=self.device, weights_only=False)
        missing = sorted(set(self.names) - set(state["weights"]))
        if missing:
            raise ConfigError(f"{path}: no weights for {missing[:3]} ({len(missing)} trainable tensors); it was "
                              f"written for another model or LoRA shape")
        with torch.no_grad():
            for name, master, param in zip(self.names, self.masters, self.params):
                master.copy_(state["weights"][name])
                param.copy_(master)
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        self.micro_step = 0  # saved at a step's end: a fresh step, whatever accumulation this run splits it into
        return str(path), state["client_state"]


def cast_floating_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """As DeepSpeed does in bf16/fp16 mode: every floating parameter in the run's dtype (peft keeps adapters in fp32,
    k-bit preparation upcasts norms); buffers (rotary frequencies) stay as they are."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def broadcast_from_rank0(params: Iterable[torch.Tensor], world_size: int) -> None:
    import torch.distributed as dist

    if world_size > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> "DistributedDataParallel":
    """DDP over the trainable parameters (frozen ones get no buckets); weights were broadcast already, and buffers
    are the same on every rank by construction."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False, init_sync=False)
