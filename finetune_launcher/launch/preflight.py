"""The pre-flight estimate the launchers print before any process starts (and `submit --gpu` on a login node)."""


def preflight(cfg, gpu=None):
    """The estimator's verdict for the resolved run config (.fits, .refusal), or None where no estimate can be made
    (the reason is printed)."""
    from finetune_launcher.estimate import estimate_from_config

    return estimate_from_config(cfg.as_dict(), cfg.procs_per_node, cfg.nnodes, announce=True, gpu=gpu or cfg.gpu)
