"""What the config resolution reads of the run's model before choosing its recipe and sizing its DeepSpeed
buckets: a recipe-table ModelFacts from transformers' AutoConfig (the model's config.json; nothing else is read),
from a recipe that claims the model itself (a diffusers pipeline), or from the estimator's offline table when the
model is not available here (a pre-flight for another machine)."""
from pathlib import Path

from finetune_launcher import recipe_table
from finetune_launcher.errors import ConfigError
from finetune_launcher.models.references import ModelReferenceError, resolve_model_path


def model_facts(values, require_model=True):
    """ModelFacts of `values["model"]`. Refuses a model that cannot be found, naming the key and the fix."""
    for recipe in recipe_table.recipes():
        claim = recipe_table.part(recipe, "model_facts")
        facts = claim(values, require_model) if claim else None
        if facts is not None:
            return facts
    try:
        config = auto_config(values["model"], values["trust_remote_code"], local_only=not require_model)
    except ConfigError:
        if require_model:
            raise
        return facts_from_table(values["model"])
    return facts_from_config(config)


def facts_from_config(config):
    text = getattr(config, "text_config", None) or config
    widths = [getattr(text, name, 0) or 0 for name in ("hidden_size", "intermediate_size", "moe_intermediate_size")]
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0
    return recipe_table.ModelFacts(model_type=config.model_type, hidden_size=int(text.hidden_size),
                                   widest=max(widths), vision=hasattr(config, "vision_config"), experts=int(experts))


def auto_config(reference, trust_remote_code=False, local_only=False):
    """The model's transformers config (local directory, builtin/random name, or hub id; `local_only`: from the
    local Hugging Face cache only, no network)."""
    try:
        path = resolve_model_path(reference)
    except ModelReferenceError as error:
        raise ConfigError(f"key 'model': {error}") from None
    local = Path(path).expanduser()
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(f"key 'model': {reference} is a directory without config.json; point it at the directory "
                          f"that holds the model's config.json and weights")
    if str(reference).startswith(("/", "./", "../", "~")) and not local.exists():
        raise ConfigError(f"key 'model': {reference} does not exist; give a local model directory, a hub id or "
                          f"builtin:tiny-llama")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except (OSError, ValueError) as error:
        raise ConfigError(f"key 'model': cannot read the config of '{reference}' ({str(error).splitlines()[0][:200]}). "
                          f"Give a local directory with config.json, a hub id that is in the local Hugging Face cache "
                          f"or reachable, or builtin:tiny-llama") from None


def facts_from_table(reference):
    from finetune_launcher.estimate import EstimateError, load_architecture

    try:
        arch = load_architecture(reference)
    except EstimateError as error:
        raise ConfigError(f"key 'model': {error}") from None
    return recipe_table.ModelFacts(hidden_size=arch.hidden_size, vision=bool(getattr(arch, "vision_params", 0)),
                                   widest=max(arch.hidden_size, arch.intermediate_size, arch.moe_intermediate_size),
                                   experts=int(getattr(arch, "num_experts", 0) or 0))


def resolve_recipe(values, facts):
    """What is trained: as named, else the recipe the table detects for the model; a named recipe that does not fit
    the model is refused here."""
    detected = recipe_table.detect(facts)
    if values["recipe"] == "auto":
        return detected.name, f"auto: {detected.summary}"
    try:
        named = recipe_table.get(values["recipe"])
    except recipe_table.UnknownRecipe as error:
        raise ConfigError(f"key 'recipe': {error}") from None
    known_model = facts.model_type is not None or facts.pipeline
    if named is not detected and named.detect is not None and known_model:
        raise ConfigError(f"key 'recipe': {named.name}, but {values['model']} is a model for the {detected.name} "
                          f"recipe ({detected.summary}); use recipe: auto or {detected.name}")
    return named.name, "set in the run config"
