"""From a resolved run config (a Mapping of its keys: RunConfig.as_dict(), a history's metadata.config) to an
estimate: RunSpec takes each key it shares with the config by name and value, the recipe's estimate part adds what
only it reads, the resolved DeepSpeed dict gives the settings that change memory; and the launcher's pre-flight.

The config's decisions are taken as it resolved them: recipe, precision, liger_kernel and gradient_checkpointing
arrive decided (config/resolve.py), and an undecided "auto" is refused, never decided here again."""
from collections.abc import Mapping
from dataclasses import fields, replace

from finetune_launcher.console import ascii_safe
from finetune_launcher.estimate.calibration import load_calibration
from finetune_launcher.estimate.devices import detect_device, resolve_device
from finetune_launcher.estimate.estimator import estimate, estimate_part
from finetune_launcher.estimate.inputs import EstimateError, RunSpec
from finetune_launcher.estimate.report import preflight_text

MACHINE_FIELDS = ("procs_per_node", "nnodes", "gpu")  # given by the caller: the machine estimated for
# "auto" resolved before
DECIDED_KEYS = ("recipe", "precision", "liger_kernel", "gradient_checkpointing", "compile_layers")


def spec_from_config(config, nproc, nnodes, gpu=None):
    """A RunSpec for a resolved run config (a Mapping of its keys) on `nproc` processes on each of `nnodes` nodes
    of `gpu` (a device name; None: this machine's CPU)."""
    undecided = [key for key in DECIDED_KEYS if config.get(key) == "auto"]
    if undecided:
        raise EstimateError(f"the run config is not resolved ({', '.join(undecided)}: auto); estimate a config that "
                            f"finetune_launcher.config.resolve_run_config returned")
    shared = {f.name: config[f.name] for f in fields(RunSpec) if f.name in config and f.name not in MACHINE_FIELDS}
    own = estimate_part(config["recipe"]).spec_fields(config)
    spec = RunSpec(**{**shared, **own}, procs_per_node=nproc, nnodes=nnodes, gpu=gpu or "cpu")
    return replace(spec, **deepspeed_settings(config.get("deepspeed"), spec))


def deepspeed_settings(resolved, spec):
    """The reduce bucket, ZeRO-3's live-parameter limit and overlap_comm of the resolved DeepSpeed dict (the names
    config/deepspeed.py writes every spelling as)."""
    zero = dict(resolved.get("zero_optimization") or {}) if isinstance(resolved, Mapping) else {}
    numbers = {k: int(v) for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    overlap = zero.get("overlap_comm")
    return {"reduce_bucket_size": numbers.get("reduce_bucket_size"),
            "stage3_max_live_parameters": numbers.get("stage3_max_live_parameters"),
            "overlap_comm": overlap if isinstance(overlap, bool) else spec.overlap_comm}


def without_checkpointing(values, nproc, nnodes, gpu=None):
    """(the Estimate of the run with gradient_checkpointing off, the device): what `gradient_checkpointing: auto`
    is decided by (config/resolve.py). Raises EstimateError where no estimate can be made."""
    device = resolve_device(gpu, nproc) if gpu else detect_device(nproc)
    spec = spec_from_config(dict(values, gradient_checkpointing=False), nproc, nnodes, gpu=device.name)
    return estimate(spec, calibration={}, device=device, with_alternatives=False), device


def estimate_from_config(config, nproc, nnodes, announce=False, gpu=None, calibration=None):
    """The launcher's pre-flight: an estimate for this run on this machine's device (or `gpu`), printed when
    `announce`. Returns the Estimate (.fits, .refusal) or None when no estimate can be made (said why)."""
    try:
        device = resolve_device(gpu, nproc) if gpu else detect_device(nproc)
        spec = spec_from_config(config, nproc, nnodes, gpu=device.name)
        result = estimate(spec, calibration if calibration is not None else load_calibration(), device=device)
    except EstimateError as error:
        if announce:
            print(ascii_safe(f"pre-flight: no estimate ({error})"), flush=True)
        return None
    if announce:
        print(ascii_safe(preflight_text(result)), flush=True)
    return result
