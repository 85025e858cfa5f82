"""The recipe table: what each recipe is, for everyone who must know it without running it -- the launcher, the
config resolution, Slurm, the forked ranks, the estimator and the after-training tools. It imports nothing of the
package and no torch; a recipe's code lives in its own package (recipes/<name>/), which the table names by string
and `part()` imports on demand.

A new recipe adds its package (docs/design.md lists the files) and one entry to RECIPES. A recipe kept outside this
repository calls `register(Recipe(...))` from a module named in the environment variable FTL_RECIPES
(comma-separated module names, imported with this table by every process of a run) or from an entry point of the
group "finetune_launcher.recipes"."""
import importlib
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

MODES = ("full", "lora", "qlora")
ENGINES = ("deepspeed", "ddp", "fsdp2")
PLUGIN_ENV = "FTL_RECIPES"
ENTRY_POINT_GROUP = "finetune_launcher.recipes"


@dataclass(frozen=True)
class Key:
    """One run-config key, declared once: its default, its JSON schema (what the YAML and the command line may
    give), whether it changes what is trained (its training identity: a checkpoint continues automatically only
    when every such key matches) and its help line."""
    name: str
    default: object
    schema: object
    help: str = ""
    identity: bool = False


@dataclass(frozen=True)
class Builtin:
    """A model the recipe builds itself, named `builtin:NAME`: `builder` ("module:function" in the recipe's
    package) is called with `args` and the target directory; a finished build holds `marker`; a new `version`
    (when the build changes) keeps a stale cache from being reused."""
    builder: str
    args: tuple = ()
    marker: str = "config.json"
    version: str = "v1"


@dataclass(frozen=True)
class ModelFacts:
    """What the config resolution reads of a model before choosing its recipe (from config.json or a diffusers
    pipeline's model_index.json)."""
    model_type: str = None
    hidden_size: int = 0
    widest: int = 0                 # the widest projection (LoRA's largest matrix side)
    vision: bool = False            # a vision tower (config.vision_config)
    pipeline: bool = False          # a diffusers pipeline directory
    experts: int = 0                # mixture of experts: experts per MoE layer


@dataclass(frozen=True)
class Recipe:
    """One recipe. `modules` name its parts by role, each "module" or "module:function" relative to `package`:
      train           the rank's entry, run(cfg, ctx, watch) -> the loop's Outcome
      rows            prepare_rows(cfg) -> the launch's prepared data (the launcher calls it once per launch)
      estimate        estimate_part: the estimator's RunSpec fields and model of this recipe
      model_facts     facts(values) -> ModelFacts or None: claims a model only this recipe trains (optional)
      random          a module with SHAPES (random:<shape> names) and build(shape, target) (optional)
      after           the after-training tools' loaders and checks for this recipe's artefacts (optional;
                      finetune_launcher/after/parts.py lists what it provides)
      command         a module adding a command of its own to `ftl` (NAME, SUMMARY, main(argv)) (optional)"""
    name: str
    package: str
    summary: str
    detect: object = None           # ModelFacts -> bool: chosen by `recipe: auto` (tried in table order)
    modes: tuple = MODES
    engines: tuple = ENGINES        # the engines it can run on
    compile_layers: str = None      # why layers cannot be compiled (no decoder layers), or None
    unit: str = "token"             # what the loss averages over: token | sample
    experts: bool = False           # trains mixtures of experts as such (LoRA on the experts, the router's balance)
    launcher: str = None            # its shell launcher; None: launch/train_<mode>.sh
    embedded: object = field(default_factory=dict)  # mode -> the embedded default config (configs/...)
    keys: tuple = ()                # the run-config keys only this recipe reads
    defaults: object = field(default_factory=dict)  # shared keys whose default differs for this recipe
    builtins: object = field(default_factory=dict)  # name -> Builtin: the models it builds itself (builtin:NAME)
    modules: object = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("embedded", "defaults", "builtins", "modules"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    def launcher_for(self, mode: str) -> str:
        return self.launcher or f"train_{mode}.sh"

    def key_names(self) -> tuple[str, ...]:
        return tuple(key.name for key in self.keys)


def _causal_lm() -> Recipe:
    return Recipe(
        name="causal_lm", package="finetune_launcher.recipes.causal_lm",
        summary="causal language models (full, LoRA, QLoRA) on instruction, chat or text data",
        detect=lambda facts: not facts.vision and not facts.pipeline,
        experts=True,
        embedded={"lora": "configs/tiny_lora.yaml", "qlora": "configs/tiny_qlora.yaml",
                  "full": "configs/tiny_full.yaml"},
        builtins={"tiny-llama": Builtin("tiny:build_tiny_model", ("tiny-llama",), version="v2"),
                  "small-llama": Builtin("tiny:build_tiny_model", ("small-llama",), version="v2"),
                  "tiny-qwen3-moe": Builtin("tiny:build_tiny_model", ("tiny-qwen3-moe",), version="moe-v2")},
        modules={"train": "recipe:run", "rows": "data:prepare_rows", "estimate": "estimate", "after": "after"})


def _vision_language() -> Recipe:
    return Recipe(
        name="vision_language", package="finetune_launcher.recipes.vision_language",
        summary="image-text-to-text models (Qwen3-VL, Qwen2.5-VL) on image + text conversations",
        detect=lambda facts: facts.vision,
        embedded={"lora": "configs/tiny_vl_lora.yaml", "qlora": "configs/tiny_vl_qlora.yaml"},
        builtins={"tiny-qwen3-vl": Builtin("tiny:build_tiny_vl", ("qwen3-vl",), version="vl-v1"),
                  "tiny-qwen2.5-vl": Builtin("tiny:build_tiny_vl", ("qwen2.5-vl",), version="vl-v1")},
        keys=(
            Key("max_pixels", None, {"type": ["integer", "null"], "minimum": 1}, identity=True,
                help="upper bound of an image's pixels (bounds its image tokens); null: the processor's"),
            Key("min_pixels", None, {"type": ["integer", "null"], "minimum": 1}, identity=True,
                help="lower bound of an image's pixels; null: the processor's"),
            Key("image_overflow", "drop", {"enum": ["drop", "error"]}, identity=True,
                help="a row whose image tokens max_length would cut is dropped and counted, or an error"),
            Key("train_merger", False, {"type": "boolean"}, identity=True,
                help="train the vision merger (projector) too"),
            Key("lora_vision", False, {"type": "boolean"}, identity=True,
                help="LoRA on the vision tower's linear layers too"),
        ),
        modules={"train": "recipe:run", "rows": "data:prepare_rows", "estimate": "estimate",
                 "after": "after", "random": "tiny"})


def _diffusion() -> Recipe:
    return Recipe(
        name="diffusion", package="finetune_launcher.recipes.diffusion",
        summary="Stable Diffusion UNets (LoRA, QLoRA, full) on captioned pictures, VAE and text encoder frozen",
        detect=lambda facts: facts.pipeline,
        engines=("deepspeed", "fsdp2"), compile_layers="a UNet has no decoder layers", unit="sample",
        launcher="train_diffusion.sh",
        embedded={"lora": "configs/tiny_sd_lora.yaml", "qlora": "configs/tiny_sd_qlora.yaml",
                  "full": "configs/tiny_sd_full.yaml"},
        defaults={"lora_target_modules": ("to_k", "to_q", "to_v", "to_out.0")},
        builtins={"tiny-sd": Builtin("tiny:build_tiny_sd", marker="model_index.json")},
        keys=(
            Key("resolution", 512, {"type": "integer", "minimum": 8}, identity=True,
                help="pictures are resized and cropped to this square size"),
            Key("center_crop", True, {"type": "boolean"}, identity=True,
                help="centre crop (true) or random crop (false)"),
            Key("random_flip", False, {"type": "boolean"}, identity=True,
                help="flip half of the pictures horizontally"),
            Key("image_column", None, {"type": ["string", "null"]}, identity=True,
                help="the image column (file_name in an image folder, image in a hub dataset)"),
            Key("caption_column", "text", {"type": "string"}, identity=True, help="the caption column"),
            Key("snr_gamma", None, {"type": ["number", "null"], "exclusiveMinimum": 0}, identity=True,
                help="min-SNR loss weighting (5.0 is the paper's); null: plain MSE"),
            Key("noise_offset", 0.0, {"type": "number", "minimum": 0}, identity=True,
                help="offset noise strength (0.05-0.1 typical); 0: off"),
            Key("cache_latents", False, {"type": "boolean"},
                help="encode each picture with the VAE once and keep the latent distribution on disk"),
            Key("text_encoder_lora", False, {"type": "boolean"}, identity=True,
                help="LoRA on the CLIP text encoder too"),
            Key("validation_prompts", (), {"type": "array", "items": {"type": "string"}},
                help="prompts sampled at every eval into samples/"),
            Key("sample_seeds", (0,), {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                help="one sample per prompt and seed"),
            Key("sample_steps", 20, {"type": "integer", "minimum": 1}, help="sampler steps per validation image"),
            Key("guidance_scale", 7.5, {"type": "number", "minimum": 0}, help="classifier-free guidance scale"),
        ),
        modules={"train": "recipe:run", "rows": "data:prepare_rows", "estimate": "estimate",
                 "model_facts": "facts:pipeline_facts", "after": "after", "command": "generate_images"})


# Table order is the order `recipe: auto` asks: the most specific model first, the causal LM (any model) last.
RECIPES = {recipe.name: recipe for recipe in (_diffusion(), _vision_language(), _causal_lm())}
DEFAULT = "causal_lm"
_plugins_loaded = False


class UnknownRecipe(ValueError):
    """A recipe name the table does not list."""


def register(recipe: Recipe) -> Recipe:
    """Add (or replace) a recipe; for recipes kept outside this repository (see the module doc)."""
    RECIPES[recipe.name] = recipe
    return recipe


def load_plugins() -> None:
    """Import the modules that register recipes from outside the repository (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGIN_ENV, "").split(","))):
        importlib.import_module(name)
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def recipes() -> tuple[Recipe, ...]:
    """Every recipe, in the order `recipe: auto` asks them."""
    load_plugins()
    return tuple(RECIPES.values())


def names() -> tuple[str, ...]:
    return tuple(recipe.name for recipe in recipes())


def get(name: str) -> Recipe:
    load_plugins()
    if name not in RECIPES:
        raise UnknownRecipe(f"unknown recipe '{name}'; known: {', '.join(RECIPES)}")
    return RECIPES[name]


def detect(facts: ModelFacts) -> Recipe:
    """The recipe `recipe: auto` picks for a model with these ModelFacts."""
    for recipe in recipes():
        if recipe.detect is not None and recipe.detect(facts):
            return recipe
    return get(DEFAULT)


def owner_of(key: str) -> Recipe | None:
    """The recipe that declares run-config key `key`, or None for a shared key."""
    return next((recipe for recipe in recipes() if key in recipe.key_names()), None)


def recipe_keys() -> dict[str, Key]:
    """Every recipe's own keys: name -> Key."""
    return {key.name: key for recipe in recipes() for key in recipe.keys}


def builtins() -> dict[str, tuple[Recipe, Builtin]]:
    """Every recipe's own models: name -> (recipe, Builtin)."""
    return {name: (recipe, builtin) for recipe in recipes() for name, builtin in recipe.builtins.items()}


def with_launcher(launcher: str) -> tuple[Recipe, ...]:
    """The recipes a shell launcher (launch/<launcher>) starts."""
    return tuple(recipe for recipe in recipes() if recipe.launcher == launcher)


def part(recipe: str | Recipe, role: str) -> Any:
    """Import the recipe's module for `role` (see Recipe); "module:function" gives the function; None when the
    recipe has no such part."""
    recipe = get(recipe) if isinstance(recipe, str) else recipe
    if role not in recipe.modules:
        return None
    module, _, attribute = recipe.modules[role].partition(":")
    loaded = importlib.import_module(f"{recipe.package}.{module}")
    return getattr(loaded, attribute) if attribute else loaded
