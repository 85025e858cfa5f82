"""What the two torch engines (plain.py: `engine: ddp`, fsdp2.py: `engine: fsdp2`) answer alike: gradient
accumulation counted in micro-steps, the grad norm left on the device, and the facts the loop and the history ask
of a DeepSpeed engine (precision, offload, whether the step was applied)."""
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.dtypes import torch_dtype

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig


class TorchEngine:
    kind = ""

    def __init__(self, model: torch.nn.Module, cfg: "RunConfig", device: torch.device, world_size: int) -> None:
        self.module, self.device, self.world_size = model, device, world_size
        self.dtype = torch_dtype(cfg.precision)
        self.accumulation, self.max_grad_norm = cfg.gradient_accumulation_steps, cfg.max_grad_norm
        self.micro_step = 0
        self._global_grad_norm: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def at_boundary(self) -> bool:
        return (self.micro_step + 1) % self.accumulation == 0

    def clip_norm(self) -> float:
        """The clip threshold; none (inf) still measures the norm."""
        return self.max_grad_norm if self.max_grad_norm > 0 else float("inf")

    def get_global_grad_norm(self) -> torch.Tensor | None:
        """The last step's grad norm as a device tensor (the loop reads it with the loss, in one sync)."""
        return self._global_grad_norm

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    # ------------------------------------------------------------ what the loop and the history ask

    def bfloat16_enabled(self) -> bool:
        return self.dtype == torch.bfloat16

    def fp16_enabled(self) -> bool:
        return False  # fp16 needs loss scaling: DeepSpeed's engine (config/resolve.py routes it there)

    def zero_offload_optimizer(self) -> bool:
        return False

    def was_step_applied(self) -> bool:
        return True
