"""Exact parameter counts of a config: transformers' AutoConfig, and the model its auto class builds on the meta
device (no memory, no weights). Imports torch and transformers: only for models given by a config.json."""
from finetune_launcher.estimate.inputs import EstimateError
from finetune_launcher.estimate.parameters import BaseCounts


def load_auto_config(directory, config_file):
    """transformers' config object for a directory holding config.json (offline)."""
    try:
        from transformers import AutoConfig
    except ImportError as error:
        raise EstimateError(f"reading {config_file} needs transformers ({error}); install the project's "
                            f"requirements, or name a model of the offline table") from error
    try:
        return AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, OSError, KeyError) as error:
        raise EstimateError(f"{config_file}: transformers cannot read this config ({error}); the estimator "
                            f"supports the decoder-only and vision-language models transformers ships") from error


def build_meta_model(config, source):
    """The model transformers builds from `config`, on the meta device: the image-text-to-text auto class for
    configs with a vision tower (Qwen2.5-VL, Qwen3-VL), the causal-LM one otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto_class = AutoModelForImageTextToText if getattr(config, "vision_config", None) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto_class.from_config(config)
    except (ValueError, KeyError) as error:
        raise EstimateError(f"{source}: transformers has no {auto_class.__name__} for model_type "
                            f"'{config.model_type}' ({error})") from error


def decoder_layers(model, count):
    """(the decoder, its layer list): the language model's, beside a vision tower's blocks."""
    from torch import nn

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    candidates = [("", decoder)] if decoder is not None else []
    candidates += [(name, module) for name, module in model.named_modules() if "vis" not in name]
    for _, module in candidates:
        layers = getattr(module, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) == count:
            return module, layers
    raise EstimateError(f"cannot find the {count} decoder layers of {type(model).__name__}; the estimator supports "
                        f"decoder-only transformers (Llama, Qwen, Mistral, Gemma, Qwen-VL, ...)")


def unique_numel(parameters):
    return sum({id(p): p.numel() for p in parameters}.values())


def output_head(model):
    """(lm_head numel, whether it is the input embedding's tensor)."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None:
        return 0, True
    tied = outputs.weight is inputs.weight
    return (0 if tied else outputs.weight.numel()), tied


def layer_matmul_params(layer, arch):
    """Weights one token multiplies in a layer: 2D weights (projections, router), the active experts' share of
    3D expert weights (experts first); vectors (norms, biases) are not matmuls."""
    total = 0
    for p in layer.parameters():
        if p.dim() == 2:
            total += p.numel()
        elif p.dim() >= 3:
            total += p.numel() // p.shape[0] * (arch.num_experts_per_tok or p.shape[0])
    return total


def quantizable_linear_sizes(decoder):
    """numel of every nn.Linear weight of the language model: what BitsAndBytesConfig(load_in_4bit) converts (the
    output head and a vision tower are in its skip list: finetune_launcher/recipes/vision_language/model.py)."""
    from torch import nn

    return tuple(m.weight.numel() for m in decoder.modules() if isinstance(m, nn.Linear))


def norms_of(layer):
    """Norm modules that are direct children of a decoder layer (Gemma-2 has four, Llama two)."""
    return sum(1 for child in layer.children() if "norm" in type(child).__name__.lower())


def describe_meta_model(config, arch, source):
    """Architecture fields from the meta-device model: exact counts and what the modeling code adds."""
    model = build_meta_model(config, source)
    decoder, layers = decoder_layers(model, arch.num_hidden_layers)
    lm_head, tied = output_head(model)
    total = unique_numel(model.parameters())
    first = layers[0]
    attention = getattr(first, "self_attn", None)
    counts = BaseCounts(
        total=total, embedding=model.get_input_embeddings().weight.numel(), lm_head=lm_head,
        linear_sizes=quantizable_linear_sizes(decoder),
        matmul_per_token=sum(layer_matmul_params(layer, arch) for layer in layers) + arch.vocab_size * arch.hidden_size,
        largest_module=max(unique_numel(m.parameters(recurse=False)) for m in model.modules()),
        vision=total - unique_numel(decoder.parameters()) - lm_head, source="meta-device model")
    fields = {"counts": counts, "tie_word_embeddings": tied, "norms_per_layer": norms_of(first) or arch.norms_per_layer}
    if attention is not None and getattr(attention, "q_proj", None) is not None:
        fields["qkv_bias"] = attention.q_proj.bias is not None
        fields["qk_norm"] = getattr(attention, "q_norm", None) is not None
    return fields
