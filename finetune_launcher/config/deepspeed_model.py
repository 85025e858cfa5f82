"""A user's DeepSpeed file as DeepSpeed's own pydantic config model reads it: every spelling the model accepts for a
setting (a field's name, its `stage3_` alias, a deprecated name, `bfloat16` for `bf16`) turned into one, and the
resolved dict checked by DeepSpeed's config classes before any rank starts. Imports DeepSpeed (and torch): only
for a user's file; the shipped files are written in these spellings and tested against the same classes."""
import contextlib
import difflib
import logging
import typing
from functools import cache

from finetune_launcher.config.sources import ConfigError

TOP_LEVEL_SPELLINGS = {"bfloat16": "bf16"}  # deepspeed/runtime/precision_config.py: BFLOAT16_OLD


@cache
def zero_spellings():
    """{spelling: (the one spelling we write, DeepSpeed's converter for a deprecated value or None)} for every
    field of DeepSpeedZeroConfig with more than one spelling."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = DeepSpeedZeroConfig.model_fields
    spellings = {}
    for name, field in fields.items():
        if field.alias:
            spellings[name] = spellings[field.alias] = (field.alias, None)
    for name, field in fields.items():
        extra = field.json_schema_extra or {}
        target = extra.get("new_param")
        if extra.get("deprecated") and extra.get("set_new_param", True) and target in fields:
            spellings[name] = (fields[target].alias or target, extra.get("new_param_fn"))
    return spellings


def one_spelling_each(data, path):
    """The file's dict with each setting under the one name we write (see the module doc); two spellings of one
    setting in the file are refused, as DeepSpeed would refuse them in every rank."""
    data = _renamed(data, {k: (v, None) for k, v in TOP_LEVEL_SPELLINGS.items()}, path, "")
    zero = data.get("zero_optimization")
    if isinstance(zero, dict):
        data["zero_optimization"] = _renamed(zero, zero_spellings(), path, "zero_optimization.")
    return data


def _renamed(section, spellings, path, prefix):
    renamed, given_as = {}, {}
    for key, value in section.items():
        name, convert = spellings.get(key, (key, None))
        if name in given_as:
            raise ConfigError(f"{path}: key '{prefix}{given_as[name]}' and key '{prefix}{key}' are two spellings of "
                              f"DeepSpeed's '{prefix}{name}'; keep one of them")
        given_as[name] = key
        if convert is not None and isinstance(value, bool):
            value = convert(value)  # e.g. cpu_offload: true -> offload_optimizer {device: cpu}
            if value is None:
                continue
            value = value.model_dump(exclude_unset=True)
        renamed[name] = value
    return renamed


# ---------------------------------------------------------------- DeepSpeed's own check

def check_with_deepspeed(data, path):
    """Build DeepSpeed's DeepSpeedConfig from the resolved dict (every "auto" filled) as each rank will, for a world
    of one (the batch arithmetic across ranks is checked when filling); its refusal becomes one ConfigError naming
    the file and the key."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    one_rank = dict(data, train_batch_size=data["train_micro_batch_size_per_gpu"] * data["gradient_accumulation_steps"])
    try:
        with _deepspeed_quiet():
            DeepSpeedConfig(one_rank)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_describe(error, data)}") from None
    except (AssertionError, ValueError, TypeError) as error:
        raise ConfigError(f"{path}: DeepSpeed refuses this file: {str(error).splitlines()[0]}") from None


@contextlib.contextmanager
def _deepspeed_quiet():
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _describe(error, data):
    """The first pydantic error as `key 'a.b': what is wrong` with the key's full path in the file."""
    first = error.errors()[0]
    location = tuple(str(part) for part in first["loc"])
    key = _full_path(data, location)
    if first["type"] == "extra_forbidden":
        known = _known_keys(error.title, location[:-1])
        close = difflib.get_close_matches(location[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"key '{key}' is not a DeepSpeed setting{hint}; fix its spelling or remove it"
    message = first["msg"].removeprefix("Value error, ")
    return f"key '{key}': {message} (got {first.get('input')!r}); DeepSpeed refuses it"


def _full_path(data, location):
    """The dotted path in `data` that ends with `location` (a pydantic location inside one section)."""
    def paths(node, prefix):
        for key, value in node.items() if isinstance(node, dict) else ():
            path = prefix + (str(key),)
            if path[-len(location):] == location:
                yield path
            yield from paths(value, path)

    return ".".join(next(paths(data, ()), location))


def _known_keys(model_name, location):
    """The names and aliases the DeepSpeed model `model_name` accepts at `location` inside it."""
    model = _model_class(model_name)
    for part in location:
        field = _field(model, part) if model else None
        model = _nested_model(field.annotation) if field else None
    if model is None:
        return []
    return [name for field_name, field in model.model_fields.items() for name in (field_name, field.alias) if name]


def _model_class(name):
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    pending = [DeepSpeedConfigModel]
    while pending:
        model = pending.pop()
        if model.__name__ == name:
            return model
        pending += model.__subclasses__()
    return None


def _field(model, key):
    return next((f for name, f in model.model_fields.items() if key in (name, f.alias)), None)


def _nested_model(annotation):
    from pydantic import BaseModel

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
