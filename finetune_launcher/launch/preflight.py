"""The pre-flight estimate the launchers print before any process starts (and `submit --gpu` on a login node)."""

HOST_SHARE = 0.85  # of this machine's RAM, for what the estimate puts in host memory; the rest is the processes' own


def preflight(cfg, gpu=None):
    """The estimator's verdict for the resolved run config (.fits, .refusal), or None where no estimate can be made
    (the reason is printed)."""
    from finetune_launcher.estimate import estimate_from_config

    return estimate_from_config(cfg.as_dict(), cfg.procs_per_node, cfg.nnodes, announce=True, gpu=gpu or cfg.gpu)


def host_memory_refusal(verdict, total_bytes=None):
    """Why the host memory the estimate puts on each node of a GPU run (offloaded states, a model each rank loads
    whole before it is sharded) cannot fit this machine's RAM, or None. `total_bytes`: the RAM (default: this
    machine's, where the launcher starts this node's ranks)."""
    import psutil

    if verdict.device.kind == "cpu" or not verdict.host_bytes:
        return None  # on the CPU the device memory is the RAM, and the estimate's memory check covers it
    have = psutil.virtual_memory().total if total_bytes is None else total_bytes
    need = verdict.host_bytes
    if need <= HOST_SHARE * have:
        return None
    gib = 2**30
    return (f"predicted host memory per node {need / gib:.1f} GiB (offloaded states and models loaded whole before "
            f"sharding) exceeds {HOST_SHARE:.0%} of this machine's {have / gib:.1f} GiB of RAM; use fewer processes "
            f"per node, engine: fsdp2 for 16-bit weights (rank 0 alone loads them) or no offload; pass --force to "
            f"launch anyway")
