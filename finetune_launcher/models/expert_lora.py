"""LoRA and QLoRA on a mixture of experts: the adapters on the attention's linear layers and on the experts' fused
3D weights (peft's `target_parameters`), the router and the norms frozen; and the experts' LoRA kernel.

`moe_lora_kernel: peft` is peft's own path (lora.ParamWrapper): on every forward it folds the adapter into the
weight, W' = W + s * B @ A for all experts at once -- a new tensor the size of the whole expert stack, which the
experts' grouped GEMM then saves for the backward and differentiates in full although W is frozen.
`grouped` runs the adapter on the activations instead, as LoRA on an nn.Linear does: each token's rows go through
x @ A_e^T @ B_e^T of its expert e, with the grouped GEMMs transformers runs the experts with (sorted by expert).
The adapter's parameters are peft's own (the ParamWrappers' lora_A / lora_B), so saving, loading, merging and the
values are the same either way."""
import types
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from finetune_launcher.console import say
from finetune_launcher.errors import ConfigError
from finetune_launcher.models.experts import experts_modules, lora_targets
from finetune_launcher.models.prepare import lora_config

if TYPE_CHECKING:
    from peft.tuners.lora.layer import ParamWrapper

    from finetune_launcher.config.settings import RunConfig

LoraFactors = tuple[torch.Tensor, torch.Tensor, float]  # (A, B^T, scaling): see lora_factors


def add_expert_lora(model: torch.nn.Module, cfg: "RunConfig", targets: str | Sequence[str],
                    task_type: str | None) -> torch.nn.Module:
    """get_peft_model for an MoE model: `targets` ("all-linear" or names) as linear-layer and expert-weight
    targets. peft's LoRA on the experts takes no dropout, so lora_dropout applies to the linear layers' LoRA only."""
    from peft import get_peft_model

    arguments = lora_targets(model, targets, cfg.lora_r, cfg.lora_alpha)
    experts = bool(arguments["target_parameters"])
    config = lora_config(cfg, task_type=task_type, **arguments, **({"lora_dropout": 0.0} if experts else {}))
    with warnings.catch_warnings():
        # peft checks rank_pattern against the targeted modules' names only; it does apply it to parameters
        warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
        model = get_peft_model(model, config)
    if experts and cfg.lora_dropout:
        linear_lora_dropout(model, cfg.lora_dropout)
    if experts and cfg.moe_lora_kernel == "grouped":
        say(f"moe_lora_kernel: grouped ({use_grouped_expert_lora(model)} experts modules: the experts' LoRA on "
            f"the activations through grouped GEMMs)")
    return model


def linear_lora_dropout(model: torch.nn.Module, probability: float) -> None:
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    for module in model.modules():
        if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = torch.nn.Dropout(p=probability)


def prepare_kbit_keeping_experts(model: torch.nn.Module, use_gradient_checkpointing: bool,
                                 gradient_checkpointing_kwargs: dict[str, Any] | None) -> torch.nn.Module:
    """peft's prepare_model_for_kbit_training for an MoE model, except that the experts' fused weights stay in the
    compute dtype: bitsandbytes leaves them 16-bit (it quantizes nn.Linear only), and peft's upcast of every 16-bit
    parameter to fp32 would double the largest part of the model. Norms, embeddings and the head go to fp32 as
    peft does."""
    kept = {id(p) for _, module in experts_modules(model) for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in kept and type(p).__name__ != "Params4bit":
            p.data = p.data.float()
    if use_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
    return model


# ---------------------------------------------------------------- moe_lora_kernel: grouped

def use_grouped_expert_lora(model: torch.nn.Module) -> int:
    """Route the LoRA of every experts module through grouped GEMMs on the activations; returns how many. Each
    experts module's outermost ParamWrapper gets the forward below; the nested ones (one per fused weight) and the
    experts module are then only read."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    outermost = [w for w in wrappers if id(w) not in inner]
    for wrapper in outermost:
        check_supported(wrapper.get_base_layer())
        wrapper.forward = types.MethodType(grouped_lora_forward, wrapper)
    return len(outermost)


def check_supported(experts: torch.nn.Module) -> None:
    layout = {"has_gate": True, "has_bias": False, "is_transposed": False}
    differs = [name for name, value in layout.items() if getattr(experts, name, None) is not value]
    if differs or getattr(experts, "has_post_expert_norm", False) or getattr(experts, "_is_expert_parallel", False):
        raise ConfigError(f"key 'moe_lora_kernel': grouped runs experts with fused gate_up_proj and down_proj "
                          f"weights, no biases, not transposed; {type(experts).__name__} differs "
                          f"({', '.join(differs) or 'expert norm or expert parallel'}); use moe_lora_kernel: peft")


def grouped_lora_forward(self: "ParamWrapper", hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The forward of an experts module's outermost peft ParamWrapper under `moe_lora_kernel: grouped`."""
    chain = [self]
    while type(chain[-1].base_layer) is type(self):
        chain.append(chain[-1].base_layer)
    experts = chain[-1].base_layer
    if any(w.disable_adapters or w.merged or len(w.active_adapters) != 1 for w in chain):
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights, **kwargs)  # peft's path
    adapters = {w.parameter_name: lora_factors(w) for w in chain if w.active_adapters[0] in w.lora_A}
    return grouped_experts(experts, adapters, hidden_states, top_k_index, top_k_weights)


def lora_factors(wrapper: "ParamWrapper") -> LoraFactors:
    """(A [experts, r, in], B^T [experts, r, out], scaling) of a ParamWrapper's active adapter (peft's layout:
    lora_A.weight [experts * r, in], expert-major; lora_B.weight [out, r * experts], expert-minor)."""
    adapter = wrapper.active_adapters[0]
    a, b = wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight
    e = wrapper.num_experts
    return (a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 1, 0).contiguous(),
            wrapper.scaling[adapter])


def grouped_experts(experts: torch.nn.Module, adapters: Mapping[str, LoraFactors], hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' grouped_mm experts forward (integrations/moe.py) with each fused weight's LoRA added on the
    activations: rows sorted by expert, one grouped GEMM per weight and two per adapter."""
    num_top_k, (num_tokens, hidden_dim) = top_k_index.size(-1), hidden_states.shape
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    rows = hidden_states[perm // num_top_k]
    counted = expert_ids.float() if expert_ids.device.type in ("cpu", "mps") else expert_ids.int()
    tokens_per_expert = torch.histc(counted, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
    hidden = lora_linear(rows, experts.gate_up_proj, adapters.get("gate_up_proj"), offsets)
    hidden = experts._apply_gate(hidden)
    out = lora_linear(hidden, experts.down_proj, adapters.get("down_proj"), offsets)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    order = torch.empty_like(perm)
    order[perm] = torch.arange(perm.size(0), device=perm.device)
    return out[order].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def lora_linear(rows: torch.Tensor, weight: torch.Tensor, adapter: LoraFactors | None,
                offsets: torch.Tensor) -> torch.Tensor:
    """rows @ W_e^T (+ scaling * rows @ A_e^T @ B_e^T) for each row's expert e; W: [experts, out, in]."""
    from transformers.integrations.moe import _grouped_mm

    out = _grouped_mm(rows, weight.transpose(-2, -1), offs=offsets)
    if adapter is None:
        return out
    a, b_t, scaling = adapter
    low = grouped_mm(rows, a.to(weight.dtype).transpose(-2, -1), offsets)
    return out + scaling * grouped_mm(low, b_t.to(weight.dtype), offsets)


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """transformers' grouped GEMM; its loop over experts where a row is not a multiple of 16 bytes (a LoRA rank
    below 8 in bf16), which the CUDA kernel refuses."""
    from transformers.integrations.moe import _grouped_mm

    if rows.shape[-1] * weight.element_size() % 16 == 0:
        return _grouped_mm(rows, weight, offs=offsets)
    return torch.ops.transformers.grouped_mm_fallback(rows.to(weight.dtype), weight, offs=offsets)
