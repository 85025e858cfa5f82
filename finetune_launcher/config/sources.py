"""Where a run config comes from: the YAML file and the command line. One parser splits a command line into a
config path, launcher options and run-config overrides; the merged values are validated against the keys' declared
schemas (config/settings.py, the recipe table). Every error names the file and the key and says how to fix it;
unknown keys are errors."""
import difflib
import json
from pathlib import Path

import jsonschema
import yaml

from finetune_launcher.config.settings import run_config_schema
from finetune_launcher.errors import ConfigError  # noqa: F401 (re-exported: finetune_launcher.config.ConfigError)

YAML, COMMAND_LINE = "yaml", "command line"
LEVELS = {None: 0, YAML: 1, COMMAND_LINE: 2}  # a later source overrides an earlier one

# Launcher-friendly spellings of a few keys.
OVERRIDE_ALIASES = {"zero": "zero_stage", "lr": "learning_rate", "epochs": "num_epochs",
                    "deepspeed": "deepspeed_config", "batch_size": "micro_batch_size",
                    "grad_accum": "gradient_accumulation_steps"}
REPORT_TO_SINKS = ("tensorboard", "wandb")


def schema():
    return run_config_schema()


def known_keys():
    return sorted(schema()["properties"])


def _suggest(key, choices=None):
    close = difflib.get_close_matches(key, choices or known_keys(), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# ---------------------------------------------------------------- the command line

def parse_override_value(text):
    """`--key value` values are YAML scalars: 3 -> int, 1e-4 -> float, true -> bool, null -> None, a,b -> list."""
    value = yaml.safe_load(text) if text != "" else ""
    if isinstance(value, str) and "," in value and not value.startswith(("{", "[")):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def split_command_line(argv, value_options=(), flag_options=()):
    """(config path or None, {option: value}, {run-config key: value}) from a command line. `value_options` and
    `flag_options` are the caller's own options (e.g. --launcher, --dry-run); the first bare word is the config
    path (also `--config PATH`); every other `--key value`, `--key=value` or bare `--flag` is a run-config
    override."""
    config_path, options, overrides, i = None, {}, {}, 0
    while i < len(argv):
        arg = argv[i]
        name, has_value, inline = arg.partition("=")
        if name == "--config" or name in value_options:
            if has_value:
                value, i = inline, i + 1
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 2
            else:
                raise ConfigError(f"command line: {name} needs a value")
            if name == "--config":
                config_path = value
            else:
                options[name] = value
        elif arg in flag_options:
            options[arg], i = True, i + 1
        elif not arg.startswith("--") and config_path is None and not overrides:
            config_path, i = arg, i + 1
        else:
            key, value, i = _override_at(argv, i)
            overrides[key] = value
    return config_path, options, overrides


def _override_at(argv, i):
    arg = argv[i]
    if not arg.startswith("--") or len(arg) <= 2:
        raise ConfigError(f"command line: expected --key value, got '{arg}'")
    key = arg[2:].replace("-", "_")
    if "=" in key:
        key, raw = key.split("=", 1)
        i += 1
    elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        raw, i = argv[i + 1], i + 2
    else:
        raw, i = "true", i + 1  # a bare flag
    key = OVERRIDE_ALIASES.get(key, key)
    value = parse_override_value(raw)
    if key == "lora_target_modules" and isinstance(value, str) and value != "all-linear":
        value = [value]
    return key, value, i


def parse_overrides(args):
    """['--lora_r', '8', '--packing', 'false', '--offload'] -> {'lora_r': 8, 'packing': False, 'offload': True}"""
    overrides, i = {}, 0
    while i < len(args):
        key, value, i = _override_at(args, i)
        overrides[key] = value
    return overrides


# ---------------------------------------------------------------- the YAML file

def read_yaml(path):
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


# ---------------------------------------------------------------- merging and validating

def merged_values(path=None, overrides=None):
    """(values the user gave, {key: source}, source label) from the YAML then the command line, coerced and validated
    against the schema. Defaults are not filled in here."""
    source = str(path) if path else COMMAND_LINE
    raw, sources = {}, {}
    if path:
        raw.update(read_yaml(path))
        sources.update(dict.fromkeys(raw, YAML))
    if overrides:
        raw.update(overrides)
        sources.update(dict.fromkeys(overrides, COMMAND_LINE))
        source += " + command-line overrides" if path else ""
    coerce_values(raw, source)
    validate_schema(raw, source)
    return raw, sources, source


def coerce_values(config, source):
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
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{source}: invalid config:\n  - key 'report_to': expected a name or a list of names, "
                          f"got {value!r}; {fix}")
    names = [item.strip().lower() for item in items]
    unknown = [name for name in names if name not in REPORT_TO_SINKS + ("none",)]
    if unknown:
        raise ConfigError(f"{source}: invalid config:\n  - key 'report_to': unknown value {unknown[0]!r}"
                          f"{_suggest(unknown[0], REPORT_TO_SINKS + ('none',))}; {fix}")
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"{source}: invalid config:\n  - key 'report_to': 'none' cannot be combined with "
                              f"other values (got {value!r}); use none alone or list the sinks")
        return []
    if not names:
        return []
    return ["tensorboard"] + (["wandb"] if "wandb" in names else [])


def _coerce_numbers(config):
    # YAML 1.1 reads 2e-4 as a string; accept it as the number the user meant.
    properties = schema()["properties"]
    for key, value in config.items():
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                continue
            if "number" in json.dumps(properties.get(key, {}).get("type", "")):
                config[key] = number


def validate_schema(config, source):
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    if not errors:
        return
    lines = []
    for error in errors:
        if error.validator == "additionalProperties":
            for key in sorted(set(error.instance) - set(schema()["properties"])):
                lines.append(f"unknown key '{key}'{_suggest(key)}; remove it or fix its spelling")
            continue
        key = ".".join(str(p) for p in error.path) or "(top level)"
        if error.validator == "required":
            lines.append(f"{error.message}: add it")
        elif key == "recipe":
            hint = _suggest(str(error.instance), error.validator_value)
            lines.append(f"key 'recipe': unknown recipe {error.instance!r}{hint}; "
                         f"known: {', '.join(error.validator_value)} (a recipe kept outside the package is registered "
                         f"with FTL_RECIPES=<module>)")
        else:
            lines.append(f"key '{key}': {error.message} (got {error.instance!r})")
    raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(lines))
