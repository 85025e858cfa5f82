"""The vision-language model after training (finetune_launcher/after/parts.py: LanguageModelPart):
AutoModelForImageTextToText and the processor saved beside the weights, prompts with pictures tokenised as training
tokenises them (prompts.py), the merge checked on an image row, and the eval loss and answer accuracy of
evaluation.py."""
from types import SimpleNamespace

from finetune_launcher.data.records import DataError
from finetune_launcher.recipes.vision_language.evaluation import evaluate_vl
from finetune_launcher.recipes.vision_language.prompts import (VLPrompter, check_batches, generate_vl,
                                                               is_vision_record, vl_case_from_record)

LABEL = "vision-language"
COMMANDS = ("evaluate", "generate", "merge")
WEIGHT_FILES = ()  # a peft adapter like any language model's: training_info.json or the base's config tells
PREPROCESSOR = "processor"
TAKES_IMAGES = True
DEMO_PROMPTS = "tools/demo_prompts_vl.jsonl"
MERGE_CHECK = "an image row and a text row"
PROMPT_FORMAT = "vision_language"  # the processor's chat template, as `ftl generate` reports the template

evaluate = evaluate_vl


def usage(directory):
    return f"ftl generate text --adapter {directory} --image PICTURE --prompt ... (or ftl evaluate, ftl merge)"


def auto_model_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def load_preprocessor(path, trust_remote_code=False):
    """The processor saved next to the weights, loaded as training loads it (model.load_processor: without
    torchvision, the same class without its video processor), with the run's saved pixel bounds."""
    from finetune_launcher.recipes.vision_language.model import load_processor

    return load_processor(SimpleNamespace(model=str(path), trust_remote_code=trust_remote_code, min_pixels=None,
                                          max_pixels=None))


def training_quantization(path, dtype, trust_remote_code=False):
    """The language model's linear layers in NF4 (double quant, uint8 storage), the vision tower and lm_head
    skipped, as the trainer loads a QLoRA base."""
    from finetune_launcher.dtypes import precision_of
    from finetune_launcher.recipes.vision_language.model import meta_layout, quantization_config

    settings = SimpleNamespace(precision=precision_of(dtype), bnb_4bit_quant_storage="uint8")
    return quantization_config(settings, meta_layout(str(path), trust_remote_code))


def merge_check_inputs(processor, model, scratch_dir):
    """A picture with a question and its answer through the training tokenisation and collator, and a text row."""
    return check_batches(processor, scratch_dir)


def case_from_record(record, base_dir, where):
    """A prompt case from a row of a vision-language dataset; None for any other record."""
    return vl_case_from_record(record, base_dir, where) if is_vision_record(record) else None


def prompt_format(requested, info):
    if requested not in (None, "auto", "chat"):
        raise DataError(f"--format {requested}: a vision-language model is prompted with its processor's chat "
                        f"template; drop --format")
    return PROMPT_FORMAT


def answerer(loaded, fmt, settings):
    prompter = VLPrompter(loaded.processor)
    return lambda case: generate_vl(loaded.model, prompter, case, settings)
