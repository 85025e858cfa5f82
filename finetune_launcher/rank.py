"""What every rank does around its recipe: start the process group, run the recipe the resolved config names (its
`train` part in the recipe table), leave the process group on every path."""
from typing import TYPE_CHECKING

import torch

from finetune_launcher import recipe_table
from finetune_launcher.config import ConfigError, RunConfig
from finetune_launcher.distributed import init_distributed, shutdown_distributed
from finetune_launcher.estimate import log_estimate_vs_measured
from finetune_launcher.guards import StopSignal, Watchers
from finetune_launcher.history import check_sinks_available

if TYPE_CHECKING:
    from finetune_launcher.loop import Outcome


def run(cfg: RunConfig) -> "Outcome":
    """Train the resolved run config `cfg` on this rank; returns the loop's Outcome."""
    check_sinks_available(cfg.report_to)
    # Before the (long) model load: a preemption then still ends in a clean exit.
    watch = Watchers(StopSignal.install(), log_estimate_vs_measured(cfg.as_dict(), cfg.world_size))
    ctx = init_distributed()
    try:
        if ctx.world != cfg.world_size:
            raise ConfigError(f"the run config was resolved for {cfg.world_size} processes but {ctx.world} started; "
                              f"launch with the same number of processes (bash launch/train_*.sh does)")
        torch.manual_seed(cfg.seed + ctx.rank)  # adapters' initial values, dropout: the same on every rerun
        return recipe_table.part(cfg.recipe, "train")(cfg, ctx, watch)
    finally:
        # On every path, errors included: left to interpreter teardown, gloo's worker threads abort the process
        # ("terminate called without an active exception") when a peer has already gone.
        shutdown_distributed()
