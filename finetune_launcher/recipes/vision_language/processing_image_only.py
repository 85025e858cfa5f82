"""Builds the processor saved in this directory where torchvision is not installed (written by finetune-launcher).

transformers builds a Qwen-VL processor together with its video processor, and every video processor needs
torchvision: without it, AutoProcessor.from_pretrained fails for any Qwen-VL checkpoint, whatever its files say.
processor_config.json names this module in its auto_map, so that

    AutoProcessor.from_pretrained(directory, trust_remote_code=True)

builds the processor named by processor_class without its video processor where torchvision is missing (images and
text work; videos need torchvision), and the whole processor where torchvision is installed. Without
trust_remote_code, AutoProcessor builds processor_class itself, as for any checkpoint. This module imports
transformers only: it is loaded from the saved directory."""
from transformers import ProcessorMixin
from transformers.models.auto.processing_auto import processor_class_from_name
from transformers.utils import is_torchvision_available


class ImageOnlyProcessor:
    """AutoProcessor's entry for this directory: it builds the processor class the directory names."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """AutoProcessor registers the class it loads from auto_map; the class built here is transformers' own."""

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        hub_kwargs = {key: value for key, value in kwargs.items() if key != "trust_remote_code"}
        config, _ = ProcessorMixin.get_processor_dict(path, **hub_kwargs)
        base = processor_class_from_name(config["processor_class"])
        return (base if is_torchvision_available() else without_video(base)).from_pretrained(path, **kwargs)


def without_video(base):
    """`base` (a processor class) without its video processor: its sub-processors are read from the signature of
    __init__, which here has none."""
    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # save_pretrained records the class name: the base's, so a processor saved from this one loads anywhere
    ImageOnly.__name__ = ImageOnly.__qualname__ = base.__name__
    return ImageOnly
