"""The shapes of a model: from its config.json through transformers' AutoConfig (parameter totals exactly, from the
model built on the meta device), or from the offline table (no config, no torch: the fast path). A recipe's estimate
part may add to both (recipe_table.part(name, "estimate")): OFFLINE_MODELS, entries of its own shape it builds a
tower for (tower_from_entry), and tower_of(config, directory), the tower of a transformers config it knows (a
vision-language model's vision tower, whose terms the language model's estimate adds: estimate/language.py)."""
import os
from dataclasses import dataclass, replace
from pathlib import Path

from finetune_launcher import recipe_table
from finetune_launcher.models.arch_table import ARCHITECTURES
from finetune_launcher.estimate.inputs import EstimateError
from finetune_launcher.estimate.meta_model import describe_meta_model, load_auto_config
from finetune_launcher.estimate.parameters import BaseCounts
from finetune_launcher.models.references import RANDOM_PREFIX, is_builtin, is_random, resolve_model_path


@dataclass(frozen=True)
class Architecture:
    """Per-layer shapes the memory and time formulas need; `counts` holds exact totals when a model was built."""
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = None
    qkv_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    final_logit_softcap: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    source: str = "table"
    counts: BaseCounts = None
    vision: object = None  # a tower beside the language model (a VL model's, from its recipe's estimate part)

    @property
    def hd(self):
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self):
        return self.num_attention_heads * self.hd

    @property
    def kv_width(self):
        return self.num_key_value_heads * self.hd

    @property
    def is_moe(self):
        return self.num_experts > 0

    @property
    def vision_params(self):
        """Parameters of the vision tower and its projector (0 for text-only models)."""
        if self.counts:
            return self.counts.vision
        return self.vision.params if self.vision else 0


def _normalise_name(name):
    name = name.strip().lower().rstrip("/")
    return name.split("/")[-1]


def _estimate_parts():
    parts = (recipe_table.part(recipe, "estimate") for recipe in recipe_table.recipes())
    return [part for part in parts if part is not None]


def _added_models():
    """{key: (entry, the estimate part that adds it)} of the offline models the recipes add."""
    added = {}
    for part in _estimate_parts():
        added.update({key: (entry, part) for key, entry in getattr(part, "OFFLINE_MODELS", {}).items()})
    return added


def _table_index():
    index = {}
    for key, entry in {**ARCHITECTURES, **{k: e for k, (e, _) in _added_models().items()}}.items():
        index[_normalise_name(key)] = key
        for alias in entry["names"]:
            index[_normalise_name(alias)] = key
            index[alias.lower()] = key
    return index


def known_models():
    return sorted(ARCHITECTURES) + sorted(_added_models())


def architecture_from_table(key, source="table"):
    added = _added_models()
    if key in added:
        entry, part = added[key]
        return Architecture(name=key, source=source, vision=part.tower_from_entry(entry), **entry["text"])
    if key not in ARCHITECTURES:
        raise EstimateError(f"unknown architecture '{key}'; known architectures: {', '.join(known_models())}")
    entry = {k: v for k, v in ARCHITECTURES[key].items() if k != "names"}
    return Architecture(name=key, source=source, **entry)


def architecture_from_config(config, name, source, directory=None):
    """Shapes from a transformers config object (vision-language configs keep the LM's in text_config, the vision
    tower's in vision_config; `directory`: the model's, whose processor files a tower may read), with transformers'
    own defaults for what the file leaves out."""
    text = config.get_text_config()
    model_type = getattr(text, "model_type", "") or getattr(config, "model_type", "")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
               if getattr(text, k, None) is None]
    if missing:
        raise EstimateError(f"{source}: the {model_type or 'model'} config has no {', '.join(missing)}; the estimator "
                            f"supports decoder-only transformers (Llama, Qwen, Mistral, Gemma, Qwen-VL, ...)")
    h, heads = int(text.hidden_size), int(text.num_attention_heads)
    experts = int(getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0)
    inter = int(getattr(text, "intermediate_size", None) or 4 * h)
    bias = getattr(text, "attention_bias", None)
    tower = next(filter(None, (part.tower_of(config, directory) for part in _estimate_parts()
                               if hasattr(part, "tower_of"))), None)
    return Architecture(
        vision=tower,
        name=name, source=source, hidden_size=h, intermediate_size=inter,
        num_hidden_layers=int(text.num_hidden_layers), num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        vocab_size=int(text.vocab_size), tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        head_dim=int(getattr(text, "head_dim", None) or h // heads),
        qkv_bias=bool(model_type.startswith("qwen2") if bias is None else bias),
        qk_norm=model_type.startswith("qwen3"),
        norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
        final_logit_softcap=bool(getattr(text, "final_logit_softcapping", None)),
        num_experts=experts,
        num_experts_per_tok=int(getattr(text, "num_experts_per_tok", None) or 0) if experts else 0,
        moe_intermediate_size=int(getattr(text, "moe_intermediate_size", None) or inter) if experts else 0)


def architecture_from_config_dir(directory, name):
    """AutoConfig of a directory holding config.json, refined by the model transformers builds from it on the meta
    device (exact totals, tied embeddings, biases and norms as the modeling code has them)."""
    config_file = Path(directory) / "config.json"
    config = load_auto_config(directory, config_file)
    arch = architecture_from_config(config, name, str(config_file), directory)
    return replace(arch, **describe_meta_model(config, arch, str(config_file)))


def _hub_cache_snapshot(model_ref):
    """The snapshot directory of a hub id already in the local Hugging Face cache (no network)."""
    if "/" not in model_ref or os.path.isabs(model_ref):
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{model_ref.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1].parent if found else None


def load_architecture(model_ref):
    """The shapes of `model_ref`: builtin:NAME, random:ARCH, a local directory with config.json, a hub id in the
    offline table, or a hub id already in the local Hugging Face cache. Never loads weights, never downloads."""
    if is_random(model_ref):
        key = model_ref[len(RANDOM_PREFIX):]
        return architecture_from_table(key, source=f"offline table ({model_ref})")
    path = Path(resolve_model_path(model_ref)) if is_builtin(model_ref) else Path(os.path.expanduser(model_ref))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise EstimateError(f"model directory {path} has no config.json; point --model at the directory that "
                                f"holds config.json (weights are not needed)")
        return architecture_from_config_dir(path, model_ref)
    key = _table_index().get(model_ref.lower()) or _table_index().get(_normalise_name(model_ref))
    if key:
        return architecture_from_table(key, source=f"offline table ({key})")
    cached = _hub_cache_snapshot(model_ref)
    if cached:
        return architecture_from_config_dir(cached, model_ref)
    raise EstimateError(
        f"unknown model '{model_ref}': not a local directory with a config.json, not in the offline table and not in "
        f"the local Hugging Face cache. Known models: {', '.join(known_models())} (hub ids such as "
        f"Qwen/Qwen2.5-7B-Instruct work too). For another model, pass the directory holding its config.json")
