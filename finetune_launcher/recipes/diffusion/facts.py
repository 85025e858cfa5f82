"""The diffusion recipe's claim on a model (the recipe table's `model_facts` part): a diffusers pipeline."""
import json

from finetune_launcher.errors import ConfigError
from finetune_launcher.models.references import ModelReferenceError
from finetune_launcher.recipe_table import ModelFacts
from finetune_launcher.recipes.diffusion.estimate import local_pipeline_dir, table_key
from finetune_launcher.recipes.diffusion.estimate_table import PIPELINES


def pipeline_facts(values, require_model=True):
    """ModelFacts of a diffusers pipeline -- builtin:tiny-sd, a local directory with model_index.json or a hub id in
    the local Hugging Face cache (its unet/config.json), or for a pre-flight of another machine (`require_model`
    false) a pipeline of the estimator's offline table: bucket sizes follow the UNet's widest block, the LoRA
    persistence threshold its widest projection (the GEGLU feed-forward's 8 x width). None for any other model,
    unless the run names the diffusion recipe, which then must be given a pipeline."""
    reference, named = values["model"], values["recipe"] == "diffusion"
    try:
        path = local_pipeline_dir(reference)
    except ModelReferenceError as error:
        raise ConfigError(f"key 'model': {error}") from None
    key = None if path or require_model else table_key(reference)
    if path or key:
        unet = json.loads((path / "unet" / "config.json").read_text()) if path else PIPELINES[key]["unet"]
        width = max(unet["block_out_channels"])
        return ModelFacts(model_type="unet", hidden_size=width, widest=8 * width, pipeline=True)
    if not named:
        return None
    if require_model:
        raise ConfigError(f"key 'model': {reference} is not a diffusers pipeline directory (model_index.json with "
                          f"unet/, vae/, text_encoder/, tokenizer/, scheduler/) nor builtin:tiny-sd")
    return ModelFacts(model_type="unet", hidden_size=1280, widest=10240, pipeline=True)
