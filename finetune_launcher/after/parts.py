"""What the tools after training ask of a recipe, and how they find the recipe of a run or a model: through the
recipe table, never by a recipe's name. A recipe's after-training part is the module its table entry names under
`modules["after"]` (recipe_table.part(recipe, "after")); it may import the shared after/ modules, which reach it only
through the table.

Every after part has the members of AfterPart. The language-model tools (evaluate, generate, merge) work on the
recipes whose part lists them in COMMANDS, and use the members of LanguageModelPart: the causal LM's and the
vision-language model's parts. A diffusion run has its own command (generate-images, which its recipe adds to `ftl`
through `modules["command"]`)."""
from pathlib import Path
from typing import Protocol

from finetune_launcher import recipe_table
from finetune_launcher.after.run_files import AdapterError, read_training_info
from finetune_launcher.config.model_facts import model_facts

LANGUAGE_MODEL_COMMANDS = ("evaluate", "generate", "merge")


class AfterPart(Protocol):
    LABEL: str           # how messages name the recipe's runs: "causal-LM", "vision-language", ...
    COMMANDS: tuple      # the ftl commands that read its runs
    WEIGHT_FILES: tuple  # files that mark a directory as its run's weights when training_info.json is missing

    def usage(self, directory) -> str:
        """The command line that reads `directory` (a run's best/ or final/), for messages."""


class LanguageModelPart(AfterPart, Protocol):
    PREPROCESSOR: str    # what is saved beside the weights: "tokenizer" or "processor"
    TAKES_IMAGES: bool   # prompts may carry pictures
    DEMO_PROMPTS: str    # the shipped prompts of `ftl generate demo` (a resources path)
    MERGE_CHECK: str     # what the merge check compares the logits on, for its report

    def auto_model_class(self): ...

    def load_preprocessor(self, path, trust_remote_code=False): ...

    def training_quantization(self, path, dtype, trust_remote_code=False):
        """The BitsAndBytesConfig training loads the base with, for the de-quantized QLoRA base."""

    def merge_check_inputs(self, preprocessor, model, scratch_dir) -> list:
        """forward() inputs on which merged and unmerged logits must agree."""

    def case_from_record(self, record, base_dir, where):
        """A generation.PromptCase from a prompt-file line or dataset record, or None for one it does not read."""

    def prompt_format(self, requested, info) -> str: ...

    def answerer(self, loaded, fmt, settings):
        """case -> generated text, for a loading.LoadedModel of this recipe."""

    def evaluate(self, options, log):
        """The report.Report of every model options names, on options.data."""


def after_part(recipe):
    """The after-training part of `recipe` (a name or a recipe_table.Recipe)."""
    part = recipe_table.part(recipe, "after")
    if part is None:
        name = recipe if isinstance(recipe, str) else recipe.name
        raise AdapterError(f"the {name} recipe has no tools after training")
    return part


def after_parts():
    """{recipe name: its after part}, in table order (the most specific recipe first)."""
    return {recipe.name: recipe_table.part(recipe, "after") for recipe in recipe_table.recipes()
            if "after" in recipe.modules}


def is_language_model(part):
    return set(LANGUAGE_MODEL_COMMANDS) <= set(part.COMMANDS)


def language_model_part(recipe, source):
    """The part of a language-model recipe; AdapterError naming the command that reads `source` otherwise."""
    part = after_part(recipe)
    if not is_language_model(part):
        raise AdapterError(f"{source} holds a {part.LABEL} run's weights, not a language-model adapter; use "
                           f"{part.usage(source)}")
    return part


def language_model_parts():
    return [part for part in after_parts().values() if is_language_model(part)]


# ---------------------------------------------------------------- which recipe

def recorded_recipe(directory):
    """The recipe whose run wrote `directory`: training_info.json's, else the one whose weight files it holds;
    None when neither tells."""
    recipe = read_training_info(directory).get("recipe")
    if recipe:
        return recipe
    for name, part in after_parts().items():
        if any((Path(directory) / file).is_file() for file in part.WEIGHT_FILES):
            return name
    return None


def model_recipe(path, trust_remote_code=False):
    """The recipe `recipe: auto` trains the model at `path` with (a vision tower: vision-language, a diffusers
    pipeline: diffusion, ...), by the config resolution's own reading of the model."""
    facts = model_facts({"model": str(path), "trust_remote_code": trust_remote_code, "recipe": "auto"})
    return recipe_table.detect(facts).name
