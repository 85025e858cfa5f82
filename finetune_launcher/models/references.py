"""Model references a run may name besides a hub id or a local directory, resolved to directories in the model
cache (`.cache/models/`, FTL_CACHE_DIR) so nothing is downloaded:

- `builtin:NAME`: a model a recipe builds itself (its recipe-table entry lists them: tiny-llama, tiny-qwen3-vl,
  tiny-sd, ...), built once under a lock all ranks share, saved like any hub checkpoint so the real
  `from_pretrained` path loads it;
- `random:<architecture>` (e.g. `random:qwen2.5-1.5b`, `random:llama-3-8b`, `random:qwen2.5-32b`, and the shapes a
  recipe adds through its `random` part, such as the vision-language `random:qwen3-vl-32b`): the exact shape of a
  real model from models/arch_table.py, randomly initialised where it is trained (on the GPUs, under zero.Init for
  ZeRO-3), for benchmarks; only config.json and the tiny tokenizer (and a VL model's processor files) are written,
  never weights. QLoRA quantises each decoder layer as it is made (recipes/causal_lm/model.py: random_4bit_model).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, TextIO

from finetune_launcher import recipe_table
from finetune_launcher.errors import ConfigError
from finetune_launcher.fsutil import built_into
from finetune_launcher.resources import PACKAGE_DIR

if TYPE_CHECKING:
    from transformers import PretrainedConfig

BUILTIN_PREFIX = "builtin:"
RANDOM_PREFIX = "random:"
MODEL_TYPES = (("qwen3-30b-a3b", "qwen3_moe"), ("qwen2.5", "qwen2"), ("qwen3", "qwen3"), ("llama", "llama"),
               ("gemma-2", "gemma2"), ("mistral", "mistral"))
RANDOM_VERSION = "v3"  # bump when the random shapes' recipe changes, so stale caches are not reused


class ModelReferenceError(ConfigError):
    """A `builtin:` or `random:` name that does not exist; the message lists the known ones."""


def cache_root() -> Path:
    """FTL_CACHE_DIR, else .cache/ in the checkout, else ~/.cache/finetune-launcher for an installed package."""
    if os.environ.get("FTL_CACHE_DIR"):
        return Path(os.environ["FTL_CACHE_DIR"]).expanduser()
    checkout = PACKAGE_DIR.parent
    if (checkout / "ds_configs").is_dir() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path("~/.cache/finetune-launcher").expanduser()


def is_builtin(model_ref: object) -> bool:
    return isinstance(model_ref, str) and model_ref.startswith(BUILTIN_PREFIX)


def is_random(model_ref: object) -> bool:
    return isinstance(model_ref, str) and model_ref.startswith(RANDOM_PREFIX)


def loads_on_rank0(run: object) -> bool:
    """Whether a run (a RunConfig, or the estimator's RunSpec: engine, mode, world_size) is FSDP2 over several
    processes with 16-bit weights: rank 0 loads the weights (or builds the `random:` shape), the other ranks build
    the model from its config on the meta device (no memory, no reading of the checkpoint), and FSDP2Engine gives
    them every buffer and each unit's weights by broadcast from rank 0 as it shards the unit. The first node's host
    memory then holds the model once, the others' not at all, instead of once per rank (a 32B model: 65 GB, not
    8 x 65 GB on an 8-GPU node)."""
    return run.engine == "fsdp2" and run.mode != "qlora" and run.world_size > 1




def resolve_model_path(model_ref: str) -> str:
    """Map `builtin:NAME` and `random:ARCH` to their built directories (building them once, under a lock all ranks
    share); return anything else unchanged."""
    if is_random(model_ref):
        return str(build_random_shape(model_ref[len(RANDOM_PREFIX):]))
    if not is_builtin(model_ref):
        return model_ref
    name = model_ref[len(BUILTIN_PREFIX):]
    builtins = recipe_table.builtins()
    if name not in builtins:
        raise ModelReferenceError(f"unknown builtin model '{name}'; known: "
                                  f"{', '.join(BUILTIN_PREFIX + n for n in sorted(builtins))}")
    recipe, builtin = builtins[name]
    module, _, builder = f"{recipe.package}.{builtin.builder}".partition(":")
    target = cache_root() / "models" / f"{name}-{builtin.version}"
    if not (target / builtin.marker).exists():
        with _locked(target):  # one builder; other ranks wait, then load
            if not (target / builtin.marker).exists():
                _build_outside_process_group(builder, *builtin.args, str(target), module=module)
    return str(target)


def _build_outside_process_group(builder: str, *args: str,
                                 module: str = "finetune_launcher.models.references") -> None:
    """Run `builder(*args)` from `module` in a fresh Python when torch.distributed is up. Whichever rank holds the
    cache lock builds, but transformers' save_pretrained silently skips the weights and config.json on every rank
    but 0 once a process group exists, which left a cache entry with only tokenizer files."""
    import importlib

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return getattr(importlib.import_module(module), builder)(*args)
    code = f"import sys; from {module} import {builder}; {builder}(*sys.argv[1:])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_DIR.parent),
                                                                     os.environ.get("PYTHONPATH")])))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building {args[-1]} into the model cache failed:\n{proc.stderr[-4000:]}")


def _locked(path: Path) -> TextIO:
    """An exclusive lock beside `path` (a file object: use with `with`; closing it releases the lock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.parent / f".{path.name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def random_shape_config(arch_key: str) -> "PretrainedConfig":
    """A transformers config of the exact shape of a real architecture (from the estimator's offline table)."""
    from transformers import AutoConfig

    from finetune_launcher.models.arch_table import ARCHITECTURES, CONFIG_VALUES

    if arch_key not in ARCHITECTURES:
        known = sorted([*ARCHITECTURES, *recipe_random_shapes()])
        raise ModelReferenceError(f"unknown architecture '{arch_key}' for random:; known: "
                                  f"{', '.join(RANDOM_PREFIX + k for k in known)}")
    spec = dict(ARCHITECTURES[arch_key])
    model_type = next(t for prefix, t in MODEL_TYPES if arch_key.startswith(prefix))
    fields = {k: spec[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "vocab_size", "tie_word_embeddings") if k in spec}
    if "head_dim" in spec:
        fields["head_dim"] = spec["head_dim"]
    if "num_experts" in spec:
        fields.update(num_experts=spec["num_experts"], num_experts_per_tok=spec["num_experts_per_tok"],
                      moe_intermediate_size=spec["moe_intermediate_size"])
    values = dict(max_position_embeddings=32768, eos_token_id=0, pad_token_id=0, bos_token_id=None, use_cache=False)
    return AutoConfig.for_model(model_type, **{**values, **fields, **CONFIG_VALUES.get(arch_key, {})})


def recipe_random_shapes() -> dict[str, ModuleType]:
    """{architecture: the recipe's `random` part that builds it} (recipe table)."""
    found = {}
    for recipe in recipe_table.recipes():
        part = recipe_table.part(recipe, "random")
        found.update(dict.fromkeys(part.SHAPES, part) if part else {})
    return found


def build_random_shape(arch_key: str) -> Path:
    """config.json + the tiny tokenizer (ids < 1024 are valid in every real vocabulary); no weights. A shape a
    recipe adds (its `random` part, e.g. a vision-language model's) is built by that recipe's part."""
    target = cache_root() / "models" / f"random-{arch_key}-{RANDOM_VERSION}"
    if (target / "config.json").exists():
        return target
    with _locked(target):
        builder = recipe_random_shapes().get(arch_key)
        if not (target / "config.json").exists() and builder is not None:
            builder.build(arch_key, target)
        if not (target / "config.json").exists():
            tiny = Path(resolve_model_path("builtin:tiny-llama"))
            with built_into(target) as tmp:
                random_shape_config(arch_key).save_pretrained(tmp)
                for name in os.listdir(tiny):
                    if name.startswith(("tokenizer", "chat_template")):
                        shutil.copy(tiny / name, tmp / name)
    return target
