"""The causal-LM recipe's part of the estimator (estimate/estimator.py lists what a part gives): rows of text,
packed or not as the run config says, sized from a local JSONL; the language model's estimate."""
from finetune_launcher.estimate.dataset_size import text_dataset_size
from finetune_launcher.estimate.language import estimate_language_model


def spec_fields(config):
    return text_dataset_size(config)


def estimate(spec, calibration=None, device=None):
    return estimate_language_model(spec, calibration, device)
