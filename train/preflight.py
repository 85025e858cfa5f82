"""Pre-flight estimate printed by the launchers before any process starts."""


def preflight(config, nproc, nnodes):
    """Return the estimator's verdict (with .fits and .refusal), or None where no estimate can be made."""
    try:
        from train.estimate import estimate_from_config
    except ImportError:
        return None
    return estimate_from_config(config, nproc, nnodes, announce=True)
