"""Run configs: YAML file -> defaults -> command-line overrides -> jsonschema validation -> cross-field checks.

Every error names the file and the key and says how to fix it; unknown keys are errors.
"""
import difflib
import json
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config_schema.json")

DEFAULTS = {
    "run_name": None,
    "tokenizer": None,
    "trust_remote_code": False,
    "attn_implementation": "sdpa",
    "dataset_split": "train",
    "dataset_format": "auto",
    "eval_dataset": None,
    "eval_fraction": 0.05,
    "max_length": 512,
    "packing": True,
    "max_examples": None,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
    "bnb_4bit_quant_storage": "auto",
    "num_epochs": 1,
    "max_steps": None,
    "micro_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2e-4,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "max_grad_norm": 1.0,
    "lr_scheduler": "cosine",
    "warmup_steps": 0,
    "warmup_ratio": 0.0,
    "min_lr": 0.0,
    "plateau_factor": 0.5,
    "plateau_patience": 2,
    "improvement_threshold": 0.0,
    "early_stopping_patience": None,
    "min_eval_loss": None,
    "eval_steps": 50,
    "logging_steps": 10,
    "save_steps": 100,
    "save_total_limit": 2,
    "precision": "auto",
    "gradient_checkpointing": "auto",
    "zero_stage": 2,
    "offload": False,
    "deepspeed_config": None,
    "overlap_comm": False,
    "liger_kernel": "auto",
    "output_dir": "outputs",
    "seed": 42,
    "report_to": ["tensorboard"],
    "resume": "auto",
    "debug_nan_at_step": None,
    "debug_nan_grad_at_step": None,
}

# Launcher-friendly spellings of a few keys.
OVERRIDE_ALIASES = {"zero": "zero_stage", "lr": "learning_rate", "epochs": "num_epochs", "deepspeed": "deepspeed_config",
                    "batch_size": "micro_batch_size", "grad_accum": "gradient_accumulation_steps"}


class ConfigError(ValueError):
    """A config problem a user can fix; the message says where and how."""


# The 4-bit storage dtype ZeRO-3 needs for each precision (it shards parameters by dtype).
QUANT_STORAGE_FOR_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
REPORT_TO_SINKS = ("tensorboard", "wandb")


def _schema():
    return json.loads(SCHEMA_PATH.read_text())


def known_keys():
    return sorted(_schema()["properties"])


def _suggest(key):
    close = difflib.get_close_matches(key, known_keys(), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_override_value(text):
    """`--key value` values are YAML scalars: 3 -> int, 1e-4 -> float, true -> bool, null -> None, a,b -> list."""
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(value, str) and "," in value and not value.startswith(("{", "[")):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def parse_overrides(args):
    """['--lora_r', '8', '--packing', 'false', '--offload'] -> {'lora_r': 8, 'packing': False, 'offload': True}"""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"command line: expected --key value, got '{arg}'")
        key = arg[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:
            raw = "true"  # a bare flag
            i += 1
        key = OVERRIDE_ALIASES.get(key, key)
        value = parse_override_value(raw)
        if key == "lora_target_modules" and isinstance(value, str) and value != "all-linear":
            value = [value]
        overrides[key] = value
    return overrides


def _coerce_values(config, source):
    if isinstance(config.get("resume"), bool):  # a bare --resume flag
        config["resume"] = "always" if config["resume"] else "never"
    if "report_to" in config:
        config["report_to"] = normalize_report_to(config["report_to"], source)
    _coerce_numbers(config)


def normalize_report_to(value, source="config"):
    """`wandb`, `[wandb]`, `tensorboard,wandb`, `none`, `[]` -> the sinks that will log, as a list: tensorboard
    always (it is a dependency), wandb when named; `none` or an empty list turns logging to both off."""
    items = [value] if isinstance(value, str) else value
    fix = "use tensorboard, wandb, a list of them, or none"
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{source}: invalid config:\n  - key 'report_to': expected a name or a list of names, "
                          f"got {value!r}; {fix}")
    names = [item.strip().lower() for item in items]
    unknown = [name for name in names if name not in REPORT_TO_SINKS + ("none",)]
    if unknown:
        raise ConfigError(f"{source}: invalid config:\n  - key 'report_to': unknown value {unknown[0]!r}"
                          f"{_close(unknown[0])}; {fix}")
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"{source}: invalid config:\n  - key 'report_to': 'none' cannot be combined with "
                              f"other values (got {value!r}); use none alone or list the sinks")
        return []
    if not names:
        return []
    return ["tensorboard"] + (["wandb"] if "wandb" in names else [])


def _close(word):
    close = difflib.get_close_matches(word, REPORT_TO_SINKS + ("none",), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce_numbers(config):
    # YAML 1.1 reads 2e-4 as a string; accept it as the number the user meant.
    for key, value in config.items():
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            expected = _schema()["properties"].get(key, {})
            if "number" in json.dumps(expected.get("type", "")):
                config[key] = number


def _validate_schema(config, source):
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    if not errors:
        return
    lines = []
    for error in errors:
        if error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(_schema()["properties"]))
            for key in extra:
                lines.append(f"unknown key '{key}'{_suggest(key)}; remove it or fix its spelling")
            continue
        key = ".".join(str(p) for p in error.path) or "(top level)"
        if error.validator == "required":
            lines.append(f"{error.message}: add it")
        else:
            lines.append(f"key '{key}': {error.message} (got {error.instance!r})")
    raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(lines))


def quant_storage_problem(storage, computes):
    """What is wrong with a QLoRA + ZeRO-3 bnb_4bit_quant_storage, and the fix (`computes`: what the compute dtype
    is); checked here for an explicit precision and at load time for precision auto."""
    return (f"mode qlora with zero_stage 3 needs bnb_4bit_quant_storage equal to the compute dtype so DeepSpeed can "
            f"shard the 4-bit weights; got bnb_4bit_quant_storage '{storage}' but {computes}. Set "
            f"bnb_4bit_quant_storage: auto (it follows the precision), or use zero_stage: 2")


def _check_cross_fields(config, source):
    problems = []
    if config["mode"] == "qlora" and config["zero_stage"] == 3:
        storage = config["bnb_4bit_quant_storage"]
        wanted = QUANT_STORAGE_FOR_PRECISION.get(config["precision"])  # None for precision auto: checked at load
        if storage != "auto" and (storage != wanted if wanted else storage == "uint8"):
            computes = (f"precision {config['precision']} computes in {wanted}" if wanted else
                        "the compute dtype is bfloat16, float16 or float32")
            problems.append(quant_storage_problem(storage, computes))
        if config["offload"]:
            problems.append("mode qlora does not support offload (bitsandbytes 4-bit weights stay on the GPU); "
                            "set offload: false")
    if config["eval_dataset"] is None and config["eval_fraction"] == 0 and config["lr_scheduler"] == "plateau":
        problems.append("lr_scheduler plateau needs evaluations: set eval_fraction > 0 or eval_dataset")
    if config["warmup_steps"] and config["warmup_ratio"]:
        problems.append("set warmup_steps or warmup_ratio, not both")
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(problems))


def load_yaml(path):
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value")
    return data


def load_config(path=None, overrides=None, base=None):
    """Return a validated, complete run config (a plain dict)."""
    source = str(path) if path else "command line"
    raw = dict(base or {})
    if path:
        raw.update(load_yaml(path))
    if overrides:
        source += " + command-line overrides" if path else ""
        raw.update(overrides)
    _coerce_values(raw, source)
    _validate_schema(raw, source)
    config = {**DEFAULTS, **raw}
    config["_explicit"] = sorted(raw)  # keys the user set: a DeepSpeed file may fill the others
    if config["run_name"] is None:
        config["run_name"] = Path(path).stem if path else f"{config['mode']}-run"
    if path:
        config["_config_path"] = str(Path(path).resolve())
    _check_cross_fields(config, source)
    return config


def public_config(config):
    """The config as written to the history and checkpoints (no private keys)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}
