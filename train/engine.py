"""DeepSpeed configs (file choice, "auto" filling, contradiction checks), precision, and distributed helpers."""
import json
import os
from pathlib import Path

import torch

from train import REPO_ROOT
from train.config import ConfigError

DS_CONFIG_DIR = REPO_ROOT / "ds_configs"
DS_SCHEMA_PATH = Path(__file__).with_name("ds_config_schema.json")


# ---------------------------------------------------------------- distributed

def dist_env():
    """(rank, world_size, local_rank) from the launcher's environment (torchrun, deepspeed, accelerate, srun)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    return rank, world, local


def init_distributed():
    """Start the process group: NCCL on GPUs, gloo on CPU. Works for a single process too."""
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env()[2])
    if "MASTER_ADDR" not in os.environ:  # plain `python -m train`: a world of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)
    return dist_env()


def shutdown_distributed():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(local_rank):
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _all_reduce(values, device, op):
    """Floats or 0-d tensors (left on the device until here) reduced over all ranks, in float64 so token counts
    stay exact."""
    import torch.distributed as dist

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def all_reduce_sum(values, device):
    return _all_reduce(values, device, "SUM")


def all_reduce_max(values, device):
    return _all_reduce(values, device, "MAX")


def barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------- precision

def resolve_precision(requested):
    """auto -> bf16 on GPUs that have it, fp16 on older GPUs (V100), fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise ConfigError("precision fp16 needs a GPU (DeepSpeed refuses fp16 on the CPU); use precision: auto or fp32")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU has no bf16 support (V100-class); use precision: fp16 or auto")
    return requested


def torch_dtype(precision):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


# ---------------------------------------------------------------- DeepSpeed config files

def ds_config_path(config):
    if config["deepspeed_config"]:
        return Path(config["deepspeed_config"])
    suffix = "_offload" if config["offload"] else ""
    return DS_CONFIG_DIR / f"zero{config['zero_stage']}{suffix}.json"


def load_ds_file(path):
    import jsonschema

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    validator = jsonschema.Draft202012Validator(json.loads(DS_SCHEMA_PATH.read_text()))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    if errors:
        lines = [f"key '{'.'.join(map(str, e.path)) or '(top level)'}': {e.message}" for e in errors]
        raise ConfigError(f"{path}: invalid DeepSpeed config:\n  - " + "\n  - ".join(lines))
    return data


def file_zero_settings(data):
    """(stage, offload) a DeepSpeed file asks for."""
    zero = data.get("zero_optimization", {})
    offload = any(_offload_device(zero.get(k)) for k in ("offload_optimizer", "offload_param"))
    return zero.get("stage", 0), offload


def _offload_device(section):
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def _fill(section, key, value, run_key, source, problems, config=None):
    """Set an "auto" value. A concrete value that differs from the run config is adopted when the user left that
    run-config key at its default (pass `config`), and reported as a contradiction otherwise."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif _differs(current, value):
        if config is not None and run_key not in config["_explicit"]:
            config[run_key] = current
            return
        problems.append(f"'{key}' is {current!r} in {source} but the run config gives {value!r} ({run_key}); "
                        f"set it to \"auto\" in the JSON or change {run_key}")


def _fill_tuning(section, key, value):
    """A DeepSpeed tuning value with no run-config key (bucket sizes, thresholds): "auto" gets our default, a
    concrete value in the file is the user's choice and stays."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def _differs(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(b)))
    return a != b


def resolve_ds_config(config, world_size, hidden_size, precision, on_gpu=None, largest_adapter=0):
    """The DeepSpeed config dict for this run: the chosen file with every "auto" filled from the run config."""
    path = ds_config_path(config)
    data = load_ds_file(path)
    source = str(path)
    problems = []
    micro, accum = config["micro_batch_size"], config["gradient_accumulation_steps"]
    _fill(data, "train_micro_batch_size_per_gpu", micro, "micro_batch_size", source, problems, config)
    _fill(data, "gradient_accumulation_steps", accum, "gradient_accumulation_steps", source, problems, config)
    micro, accum = config["micro_batch_size"], config["gradient_accumulation_steps"]
    _fill(data, "train_batch_size", micro * accum * world_size,
          "micro_batch_size x gradient_accumulation_steps x world size", source, problems)
    _fill(data, "gradient_clipping", config["max_grad_norm"], "max_grad_norm", source, problems, config)
    for name in ("bf16", "fp16"):
        section = data.setdefault(name, {})
        _fill(section, "enabled", precision == name, "precision", source, problems)
    zero = data.setdefault("zero_optimization", {})
    stage, offload = file_zero_settings(data)
    if config["deepspeed_config"]:  # the file decides what the user did not set
        for key, value in (("zero_stage", stage), ("offload", offload)):
            if key not in config["_explicit"]:
                config[key] = value
    if stage != config["zero_stage"]:
        problems.append(f"'zero_optimization.stage' is {stage} in {source} but the run config gives zero_stage "
                        f"{config['zero_stage']}; make them agree")
    if offload != config["offload"]:
        problems.append(f"{source} {'offloads' if offload else 'does not offload'} to CPU but the run config has "
                        f"offload: {str(config['offload']).lower()}; make them agree")
    users_overlap = zero.get("overlap_comm", "auto")
    _fill(zero, "overlap_comm", config["overlap_comm"], "overlap_comm", source, problems, config)
    risky_pair = (config["deepspeed_config"] and users_overlap is True
                  and zero.get("contiguous_gradients", True) is True)  # DeepSpeed's default is true
    _fill_tuning(zero, "reduce_bucket_size", hidden_size * hidden_size)
    if stage == 3:
        _fill_tuning(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        # LoRA matrices stay whole on every rank: partitioned, each would be gathered and released on every pass
        # (14 extra fetches per layer for all-linear); LoRA ZeRO-3 measured 3.4x ZeRO-2's step time on one H200.
        _fill_tuning(zero, "stage3_param_persistence_threshold", max(10 * hidden_size, largest_adapter))
    _check_optimizer_section(data, config, source, problems)
    if problems:
        raise ConfigError("DeepSpeed config contradicts the run config:\n  - " + "\n  - ".join(problems))
    if risky_pair:
        _warn_overlap_with_contiguous(source)
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if offload and not on_gpu:
        data["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU instead of compiling cpu_adam
    leftover = [k for k, v in _walk(data) if v == "auto"]
    if leftover:
        raise ConfigError(f"{source}: cannot fill \"auto\" for {', '.join(leftover)}; give concrete values")
    return data


def _warn_overlap_with_contiguous(source):
    """The user's own file asks for overlap_comm with contiguous_gradients (DeepSpeed's default when the key is
    absent): kept, but said once, since that pair has produced NaN grad norms in DeepSpeed."""
    from train.console import warn

    warn(f"{source} sets zero_optimization.overlap_comm true with contiguous_gradients on; DeepSpeed has produced "
         f"NaN grad norms with that pair. Kept as set; to turn it off set \"overlap_comm\": false in that file "
         f"(or \"auto\": it then follows --overlap_comm, off by default)")


def _check_optimizer_section(data, config, source, problems):
    """The trainer builds the optimizer and LR schedule itself; a file's own sections must agree, then are dropped."""
    optimizer = data.pop("optimizer", None)
    data.pop("scheduler", None)
    if not optimizer:
        return
    params = optimizer.get("params", {})
    expected = {"lr": config["learning_rate"], "weight_decay": config["weight_decay"],
                "betas": [config["adam_beta1"], config["adam_beta2"]]}
    for key, value in expected.items():
        current = params.get(key, "auto")
        if current != "auto" and (list(current) != value if key == "betas" else _differs(current, value)):
            problems.append(f"'optimizer.params.{key}' is {current!r} in {source} but the run config gives "
                            f"{value!r}; set it to \"auto\" or change the run config")


def _walk(data, prefix=""):
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, name + ".")
        else:
            yield name, value
