"""The training recipes, one module each, and what every rank does around them: start the process group, run the
recipe the resolved config names, leave the process group on every path."""
import importlib

import torch

from train.config import ConfigError
from train.distributed import init_distributed, shutdown_distributed
from train.estimate import log_estimate_vs_measured
from train.guards import StopSignal, Watchers
from train.history import check_sinks_available

RECIPE_MODULES = {"causal_lm": "train.recipes.causal_lm", "vision_language": "train.recipes.vision_language",
                  "diffusion": "train.recipes.diffusion"}


def run(cfg):
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
        return importlib.import_module(RECIPE_MODULES[cfg.recipe]).run(cfg, ctx, watch)
    finally:
        # On every path, errors included: left to interpreter teardown, gloo's worker threads abort the process
        # ("terminate called without an active exception") when a peer has already gone.
        shutdown_distributed()
