"""The DeepSpeed config of a run: the user's file (`deepspeed_config`) or the shipped one for zero_stage / offload,
its keys read in every spelling DeepSpeed accepts (deepspeed_model.py), the values the launcher reads checked against
deepspeed_schema.json, reconciled with the run config, then every "auto" filled and a user's file checked by
DeepSpeed's own config classes, so that what DeepSpeed refuses is refused here, before any rank starts.

Reconciling: a concrete value in the file (a ZeRO stage, a micro-batch, bf16 on, ...) and the run-config key it
corresponds to come from sources of a level each (defaults < YAML < command line; the file has the level of the
place that named it). The higher level decides; only values given at the same level contradict. So
`--deepspeed ds_z3.json` on the command line runs ZeRO-3 although the YAML says `zero_stage: 2`, and a YAML that
names a ZeRO-3 file and also says `zero_stage: 2` is refused."""
import json
from pathlib import Path

from finetune_launcher.config.deepspeed_model import check_with_deepspeed, one_spelling_each
from finetune_launcher.config.sources import COMMAND_LINE, LEVELS, ConfigError
from finetune_launcher.resources import resource

SCHEMA_PATH = Path(__file__).with_name("deepspeed_schema.json")
OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")


def shipped_file(zero_stage, offload):
    return resource(f"ds_configs/zero{zero_stage}{'_offload' if offload else ''}.json")


def is_shipped(path):
    return Path(path).resolve().parent == resource("ds_configs").resolve()


def read_deepspeed_file(path):
    import jsonschema

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"DeepSpeed config not found: {path} (key 'deepspeed_config'); give the path of a JSON "
                          f"file, or drop the key to use ds_configs/zero<stage>.json")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object of DeepSpeed settings")
    if not is_shipped(path):
        data = one_spelling_each(data, path)
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.path))
    if errors:
        lines = [f"key '{'.'.join(map(str, e.path)) or '(top level)'}': {e.message}" for e in errors]
        raise ConfigError(f"{path}: invalid DeepSpeed config:\n  - " + "\n  - ".join(lines))
    stage = data.get("zero_optimization", {}).get("stage", 0)
    if stage not in (2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage is {stage}; this trainer runs ZeRO-2 and ZeRO-3 (set "
                          f"\"stage\": 2 for replicated weights)")
    return data


# ---------------------------------------------------------------- what the file decides

def _concrete(value):
    return value is not None and value != "auto"


def file_choices(data):
    """{run-config key: value} for every setting the file gives a concrete value to."""
    zero = data.get("zero_optimization", {})
    params = (data.get("optimizer") or {}).get("params", {})
    choices = {"zero_stage": zero["stage"],
               "offload": any(_offload_device(zero.get(k)) for k in OFFLOAD_SECTIONS)}
    for file_key, run_key in (("train_micro_batch_size_per_gpu", "micro_batch_size"),
                              ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                              ("gradient_clipping", "max_grad_norm")):
        if _concrete(data.get(file_key)):
            choices[run_key] = data[file_key]
    if isinstance(zero.get("overlap_comm"), bool):
        choices["overlap_comm"] = zero["overlap_comm"]
    precision = _file_precision(data)
    if precision:
        choices["precision"] = precision
    for file_key, run_key in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
        if _concrete(params.get(file_key)):
            choices[run_key] = params[file_key]
    if _concrete(params.get("betas")):
        choices["adam_beta1"], choices["adam_beta2"] = params["betas"]
    return choices


def _file_precision(data):
    bf16, fp16 = data.get("bf16", {}).get("enabled"), data.get("fp16", {}).get("enabled")
    if bf16 is True:
        return "bf16"
    if fp16 is True:
        return "fp16"
    if bf16 is False and fp16 is False:
        return "fp32"
    return None


def _offload_device(section):
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def _differs(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(b)))
    return a != b


def reconcile(data, values, sources, path):
    """Settle each setting the file and the run config both give (see the module doc). Changes `values` (a plain
    dict of run-config values) and `data` (the file's dict) in place; returns the notes to print."""
    file_level = LEVELS[sources.get("deepspeed_config")]
    problems, notes = [], []
    for key, file_value in file_choices(data).items():
        run_value = values[key]
        if not _differs(file_value, run_value) or (key == "precision" and run_value == "auto"):
            values[key] = file_value
            continue
        run_level = LEVELS[sources.get(key)]
        if run_level < file_level:
            values[key] = file_value
            notes.append(f"{key} {file_value!r} from {path} "
                         f"(over {run_value!r} from {sources.get(key) or 'the defaults'})")
        elif run_level > file_level:
            _override_in_file(data, key, run_value, values)
            notes.append(f"{key} {run_value!r} from the {sources[key]} (over {file_value!r} in {path})")
        else:
            where = "the command line" if run_level == LEVELS[COMMAND_LINE] else str(values.get("config_path"))
            problems.append(f"{path} gives {key} {file_value!r} but {where} also sets {key}: {run_value!r}; drop "
                            f"one of them, or set the file's value to \"auto\"")
    if problems:
        raise ConfigError("DeepSpeed config contradicts the run config:\n  - " + "\n  - ".join(problems))
    return notes


def _override_in_file(data, key, value, values):
    zero = data.setdefault("zero_optimization", {})
    if key == "zero_stage":
        zero["stage"] = value
    elif key == "offload":
        for section in OFFLOAD_SECTIONS:
            zero.pop(section, None)
        if value:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if values["zero_stage"] == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif key == "micro_batch_size":
        data["train_micro_batch_size_per_gpu"] = value
    elif key == "gradient_accumulation_steps":
        data["gradient_accumulation_steps"] = value
    elif key == "max_grad_norm":
        data["gradient_clipping"] = value
    elif key == "overlap_comm":
        zero["overlap_comm"] = value
    elif key == "precision":
        data.setdefault("bf16", {})["enabled"] = value == "bf16"
        data.setdefault("fp16", {})["enabled"] = value == "fp16"
    # optimizer values: the section is dropped when filling (the trainer builds the optimizer from the run config)


# ---------------------------------------------------------------- filling "auto"

def fill_auto(data, values, world_size, hidden_size, largest_adapter, on_gpu):
    """The dict the engine gets: every "auto" filled from the resolved run-config `values`."""
    micro, accum = values["micro_batch_size"], values["gradient_accumulation_steps"]
    _set_auto(data, "train_micro_batch_size_per_gpu", micro)
    _set_auto(data, "gradient_accumulation_steps", accum)
    _set_auto(data, "train_batch_size", micro * accum * world_size)
    if data["train_batch_size"] != micro * accum * world_size:
        raise ConfigError(f"train_batch_size is {data['train_batch_size']} in the DeepSpeed config but "
                          f"micro_batch_size {micro} x gradient_accumulation_steps {accum} x {world_size} processes is "
                          f"{micro * accum * world_size}; set it to \"auto\"")
    _set_auto(data, "gradient_clipping", values["max_grad_norm"])
    for name in ("bf16", "fp16"):
        _set_auto(data.setdefault(name, {}), "enabled", values["precision"] == name)
    zero = data["zero_optimization"]
    _set_auto(zero, "overlap_comm", values["overlap_comm"])
    _set_auto(zero, "reduce_bucket_size", hidden_size * hidden_size)
    if zero["stage"] == 3 or any(key.startswith("stage3_") for key in zero):  # (a ZeRO-3 file run at stage 2 too)
        _set_auto(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        # LoRA matrices stay whole on every rank: partitioned, each would be gathered and released on every pass
        # (14 extra fetches per layer for all-linear); LoRA ZeRO-3 measured 3.4x ZeRO-2's step time on one H200.
        _set_auto(zero, "stage3_param_persistence_threshold", max(10 * hidden_size, largest_adapter))
        _set_auto(zero, "stage3_gather_16bit_weights_on_model_save", True)
        if values["compile_layers"]:  # DeepSpeed's own linear is an autograd Function dynamo cannot trace: every
            zero.setdefault("memory_efficient_linear", False)  # linear would break the compiled layer's graph
    data.pop("optimizer", None)  # the trainer builds the optimizer and the LR schedule from the run config
    data.pop("scheduler", None)
    if values["offload"] and not on_gpu:
        data["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the CPU instead of compiling cpu_adam
    leftover = [k for k, v in _walk(data) if v == "auto"]
    if leftover:
        raise ConfigError(f"the DeepSpeed config has \"auto\" for {', '.join(leftover)}, which the run config does "
                          f"not decide; give concrete values")
    if values["deepspeed_config"]:
        check_with_deepspeed(data, values["deepspeed_config"])
    return data


def _set_auto(section, key, value):
    if section.get(key, "auto") == "auto":
        section[key] = value


def risky_overlap(data, sources):
    """A user's file asks for overlap_comm with contiguous_gradients (DeepSpeed's default when the key is absent): kept,
    but said, since that pair has produced NaN grad norms in DeepSpeed."""
    zero = data.get("zero_optimization", {})
    return bool(sources.get("deepspeed_config")) and zero.get("overlap_comm") is True and \
        zero.get("contiguous_gradients", True) is True


def _walk(data, prefix=""):
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, name + ".")
        else:
            yield name, value
