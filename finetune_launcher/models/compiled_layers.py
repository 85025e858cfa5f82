"""Regional compilation (`compile_layers`): torch.compile of each transformer decoder layer, in place. The layers of
a model share their code, so dynamo compiles one graph for all of them (parameters are graph inputs) instead of one
per layer, and the step launches fused kernels instead of one Python-dispatched op at a time: what a host-bound
step (many small LoRA ops) gains from. The embeddings, the loss and DeepSpeed's or DDP's hooks stay eager, and so
do a mixture of experts' experts (see keep_experts_eager)."""
import os

import torch

from finetune_launcher.errors import ConfigError
from finetune_launcher.console import say
from finetune_launcher.models.experts import EXPERTS

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
    eager_experts = 0
    for layer in layers:
        eager_experts += keep_experts_eager(layer)
        if hooks_outside:
            layer.forward = torch.compile(layer.forward, backend=backend)
        else:
            layer.compile(backend=backend)
    experts = f"; {eager_experts} experts modules left eager" if eager_experts else ""
    say(f"compile_layers: {len(layers)} {type(layers[0]).__name__} modules compiled (torch.compile, {backend}"
        f"{experts}; the first step compiles)")
    return len(layers)


def keep_experts_eager(layer: torch.nn.Module) -> int:
    """Leave a mixture-of-experts layer's experts out of its compiled graph: torch.compiler.disable on the forward
    of the outermost `experts` module (peft's wrapper, with the grouped LoRA kernel, where there is one), a graph
    break around it. Inductor failed on their grouped GEMM on an H200 (torch 2.11, "Invalid strides/sizes" in
    _grouped_mm: docs/benchmarks.md, issue 30); attention, norms and the router compile as in a dense layer.
    Returns how many modules it left eager."""
    count = 0
    for name, module in layer.named_modules():
        path = name.split(".")
        if path[-1] == EXPERTS and EXPERTS not in path[:-1]:
            module.forward = torch.compiler.disable(module.forward)
            count += 1
    return count

