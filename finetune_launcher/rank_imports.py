"""What a rank imports: shared by the rank's entry and the launcher, which imports the same modules before it forks
the ranks (finetune_launcher/launch/forked.py)."""
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune_launcher.config.settings import RunConfig

# Imported by a rank only on its way (inside DeepSpeed's engine set-up, or for the curves and tensorboard at the
# end): importing them before the fork keeps them out of every rank's start. A name this version lacks is skipped.
RANK_IMPORTS = ("torch.distributed", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
                "deepspeed.ops.op_builder.all_ops", "peft", "torch.utils.tensorboard", "matplotlib.pyplot")


def leave_out_bitsandbytes(cfg: "RunConfig") -> None:
    """Only QLoRA uses bitsandbytes, but peft imports it whenever it is installed, and bitsandbytes imports
    torch._inductor: about 1.2 s of every rank's start on a CPU core. A None entry in sys.modules makes it look
    absent (importlib.util.find_spec returns None), so peft and transformers leave it out."""
    if cfg.mode != "qlora" and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None
