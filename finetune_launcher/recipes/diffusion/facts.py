"""The diffusion recipe's claim on a model (the recipe table's `model_facts` part): a diffusers pipeline directory."""
import json
from pathlib import Path

from finetune_launcher.errors import ConfigError
from finetune_launcher.models.references import ModelReferenceError, resolve_model_path
from finetune_launcher.recipe_table import ModelFacts


def pipeline_facts(values, require_model=True):
    """ModelFacts of a diffusers pipeline (builtin:tiny-sd or a local directory with model_index.json), from
    unet/config.json: bucket sizes follow its widest block, the LoRA persistence threshold its widest projection
    (the GEGLU feed-forward's 8 x width). None for any other model, unless the run names the diffusion recipe, which
    then must be given a pipeline."""
    reference, named = values["model"], values["recipe"] == "diffusion"
    if reference == "builtin:tiny-sd" or (named and Path(reference).is_dir()):
        try:
            path = Path(resolve_model_path(reference))
        except ModelReferenceError as error:
            raise ConfigError(f"key 'model': {error}") from None
        if (path / "model_index.json").is_file():
            width = max(json.loads((path / "unet" / "config.json").read_text())["block_out_channels"])
            return ModelFacts(model_type="unet", hidden_size=width, widest=8 * width, pipeline=True)
    if not named:
        return None
    if require_model:
        raise ConfigError(f"key 'model': {reference} is not a diffusers pipeline directory (model_index.json with "
                          f"unet/, vae/, text_encoder/, tokenizer/, scheduler/) nor builtin:tiny-sd")
    return ModelFacts(model_type="unet", hidden_size=1280, widest=10240, pipeline=True)
