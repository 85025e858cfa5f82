"""Regional compilation (`compile_layers`): torch.compile of each transformer decoder layer, in place. The layers of
a model share their code, so dynamo compiles one graph for all of them (parameters are graph inputs) instead of one
per layer, and the step launches fused kernels instead of one Python-dispatched op at a time: what a host-bound
step (many small LoRA ops) gains from. The embeddings, the loss and DeepSpeed's or DDP's hooks stay eager."""
import os

import torch

from finetune_launcher.errors import ConfigError
from finetune_launcher.console import say

BACKEND_ENV = "FTL_COMPILE_BACKEND"  # inductor unless set (the CPU tests use aot_eager: same graphs, no codegen)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers: transformers' GradientCheckpointingLayer modules, outermost only."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, GradientCheckpointingLayer):
            continue
        if not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def compile_decoder_layers(model: torch.nn.Module, hooks_outside: bool = False) -> int:
    """Compile every decoder layer of `model` (a whole model, or a VL model's language model) in place
    (`nn.Module.compile`: modules, parameter names and state_dict keys stay as they are); returns how many. Call it
    after LoRA is added, so the adapters are inside the compiled graph. `hooks_outside` (ZeRO-3, whose hooks on the
    layer gather and release its parameters): only the layer's forward is compiled; its hooks stay eager."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"key 'compile_layers': no decoder layers found in {type(model).__name__}; set "
                          f"compile_layers: false")
    backend = os.environ.get(BACKEND_ENV, "inductor")
    for layer in layers:
        if hooks_outside:
            layer.forward = torch.compile(layer.forward, backend=backend)
        else:
            layer.compile(backend=backend)
    say(f"compile_layers: {len(layers)} {type(layers[0]).__name__} modules compiled (torch.compile, {backend}; "
        f"the first step compiles)")
    return len(layers)

