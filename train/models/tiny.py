"""Models the project makes itself, so nothing is downloaded:

- `builtin:tiny-llama` (and `builtin:small-llama`): a tiny Llama-architecture causal LM with random weights and a BPE
  tokenizer trained on the shipped data, saved like any hub checkpoint (config.json, safetensors, tokenizer files)
  so the real `from_pretrained` path loads it.
- `random:<architecture>` (e.g. `random:qwen2.5-1.5b`, `random:llama-3-8b`, `random:qwen2.5-32b`, and the
  vision-language `random:qwen3-vl-32b`): the exact shape of a real model from train/models/arch_table.py
  (vision-language ones from train/estimate/vision_table.py), randomly initialised where it is trained (on the GPUs,
  under zero.Init for ZeRO-3), for benchmarks; only config.json and the tiny tokenizer (and a VL model's processor
  files) are written, never weights. QLoRA quantises each decoder layer as it is made (train/models/causal_lm.py:
  random_4bit_model).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from train.data.prompts import TINY_CHAT_TEMPLATE, render_instruction_prompt
from train.errors import ConfigError
from train.fsutil import apply_umask, built_into
from train.resources import PACKAGE_DIR, resource

BUILTIN_PREFIX = "builtin:"
RANDOM_PREFIX = "random:"
MODEL_TYPES = (("qwen3-30b-a3b", "qwen3_moe"), ("qwen2.5", "qwen2"), ("qwen3", "qwen3"), ("llama", "llama"),
               ("gemma-2", "gemma2"), ("mistral", "mistral"))
TINY_SPECS = {
    # ~2M parameters: big enough to learn the synthetic task, small enough for 2 CPU processes.
    "tiny-llama": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024),
    # Hidden 512: the "mid-size" shape the activation-memory checks use.
    "small-llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048),
}
BUILD_VERSION = "v2"  # bump when the build recipe changes, so stale caches are not reused
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TOKENIZER_CORPUS = "data/tiny_instruct.jsonl"


class ModelReferenceError(ConfigError):
    """A `builtin:` or `random:` name that does not exist; the message lists the known ones."""


def cache_root():
    """FTL_CACHE_DIR, else .cache/ in the checkout, else ~/.cache/finetune-launcher for an installed package."""
    if os.environ.get("FTL_CACHE_DIR"):
        return Path(os.environ["FTL_CACHE_DIR"]).expanduser()
    checkout = PACKAGE_DIR.parent
    if (checkout / "ds_configs").is_dir() and os.access(checkout, os.W_OK):
        return checkout / ".cache"
    return Path("~/.cache/finetune-launcher").expanduser()


def is_builtin(model_ref):
    return isinstance(model_ref, str) and model_ref.startswith(BUILTIN_PREFIX)


def is_random(model_ref):
    return isinstance(model_ref, str) and model_ref.startswith(RANDOM_PREFIX)


# builtin:NAME -> (module, builder, its arguments before the target directory, the file a finished build has)
BUILTINS = {
    "tiny-llama": ("train.models.tiny", "build_tiny_model", ("tiny-llama",), "config.json"),
    "small-llama": ("train.models.tiny", "build_tiny_model", ("small-llama",), "config.json"),
    "tiny-qwen3-vl": ("train.models.tiny_vl", "build_tiny_vl", ("qwen3-vl",), "config.json"),
    "tiny-qwen2.5-vl": ("train.models.tiny_vl", "build_tiny_vl", ("qwen2.5-vl",), "config.json"),
    "tiny-sd": ("train.models.tiny_sd", "build_tiny_sd", (), "model_index.json"),
}
BUILD_VERSIONS = {"train.models.tiny": BUILD_VERSION, "train.models.tiny_vl": "vl-v1", "train.models.tiny_sd": "v1"}


def resolve_model_path(model_ref):
    """Map `builtin:NAME` and `random:ARCH` to their built directories (building them once, under a lock all ranks
    share); return anything else unchanged."""
    if is_random(model_ref):
        return str(build_random_shape(model_ref[len(RANDOM_PREFIX):]))
    if not is_builtin(model_ref):
        return model_ref
    name = model_ref[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
        raise ModelReferenceError(f"unknown builtin model '{name}'; known: "
                                  f"{', '.join(BUILTIN_PREFIX + n for n in sorted(BUILTINS))}")
    module, builder, args, marker = BUILTINS[name]
    target = cache_root() / "models" / f"{name}-{BUILD_VERSIONS[module]}"
    if not (target / marker).exists():
        with _locked(target):  # one builder; other ranks wait, then load
            if not (target / marker).exists():
                _build_outside_process_group(builder, *args, str(target), module=module)
    return str(target)


def _build_outside_process_group(builder, *args, module=__name__):
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


def _corpus_lines():
    with open(resource(TOKENIZER_CORPUS), encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            yield render_instruction_prompt(example["instruction"], example["context"]) + example["response"]
    yield "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9"


def train_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(name, target):
    """Write config, random weights (safetensors) and tokenizer into `target`, atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = TINY_SPECS[name]
    with built_into(target) as tmp:
        tokenizer = train_tokenizer(spec["vocab_size"])
        config = LlamaConfig(**spec, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None, tie_word_embeddings=False, rope_theta=10000.0,
                             torch_dtype="float32")
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            # A pretrained LM head has a large norm; at the default init (std 0.02) the frozen head caps the logit
            # range so low that LoRA cannot fit anything. std 0.1 behaves like a real head.
            model.lm_head.weight.mul_(5.0)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(target)


def _locked(path):
    """An exclusive lock beside `path` (a file object: use with `with`; closing it releases the lock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.parent / f".{path.name}.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def random_shape_config(arch_key):
    """A transformers config of the exact shape of a real architecture (from the estimator's offline table)."""
    from transformers import AutoConfig

    from train.estimate.vision_table import VL_ARCHITECTURES
    from train.models.arch_table import ARCHITECTURES

    if arch_key not in ARCHITECTURES:
        known = sorted([*ARCHITECTURES, *VL_ARCHITECTURES])
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
    return AutoConfig.for_model(model_type, **fields, max_position_embeddings=32768, eos_token_id=0,
                                pad_token_id=0, bos_token_id=None, use_cache=False)


def build_random_shape(arch_key):
    """config.json + the tiny tokenizer (ids < 1024 are valid in every real vocabulary); no weights. A
    vision-language shape also gets the tiny VL tokenizer, chat template and processor files (train/models/tiny_vl.py)
    with the model's own patch size and pixel bounds."""
    from train.estimate.vision_table import VL_ARCHITECTURES

    target = cache_root() / "models" / f"random-{arch_key}-{BUILD_VERSION}"
    if (target / "config.json").exists():
        return target
    with _locked(target):
        if not (target / "config.json").exists() and arch_key in VL_ARCHITECTURES:
            from train.models.tiny_vl import build_random_vl_directory

            build_random_vl_directory(arch_key, target)
        if not (target / "config.json").exists():
            tiny = Path(resolve_model_path("builtin:tiny-llama"))
            with built_into(target) as tmp:
                random_shape_config(arch_key).save_pretrained(tmp)
                for name in os.listdir(tiny):
                    if name.startswith(("tokenizer", "chat_template")):
                        shutil.copy(tiny / name, tmp / name)
    return target
