"""Mixture-of-experts models as transformers 5 builds them (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, ...): each sparse
MoE block holds a router (`mlp.gate`) and an experts module whose weights are fused 3D parameters
(`mlp.experts.gate_up_proj` [experts, 2 x intermediate, hidden], `mlp.experts.down_proj` [experts, hidden,
intermediate]). What a run needs to know of them: which modules are the experts and the MoE blocks, and which LoRA
targets reach the experts (peft's `target_parameters`: `target_modules` reaches nn.Linear layers only).

The launcher's part (`resolve_experts`) imports no torch; the rest runs on the ranks."""
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from finetune_launcher.errors import ConfigError

if TYPE_CHECKING:
    import torch

EXPERTS = "experts"          # the module that holds the experts' fused weights, in every MoE block
ROUTER = "gate"              # the router's module name in Qwen/Mixtral MoE blocks
GATE_UP = "gate_up_proj"     # the gate and up projections side by side (2 x intermediate rows)
FUSED = (GATE_UP, "down_proj")  # the fused 3D weights of an experts module, in transformers' order
# LoRA target names that mean the experts: the module, its fused parameters, and the per-projection names of the
# transformers-4 checkpoints (gate_proj + up_proj are gate_up_proj now, as peft converts such adapters).
EXPERT_TARGETS = {"experts": FUSED, "gate_up_proj": (GATE_UP,), "down_proj": ("down_proj",),
                  "gate_proj": (GATE_UP,), "up_proj": (GATE_UP,)}


# ---------------------------------------------------------------- before launch (no torch)

def resolve_experts(values: Mapping[str, Any], experts: int) -> str:
    """The launcher's header line for a model with `experts` experts per MoE block (what trains, what is stored
    how); refuses the router as a LoRA target."""
    lora = values["mode"] in ("lora", "qlora")
    targets = values["lora_target_modules"]
    if lora and targets != "all-linear" and any(is_router(t) for t in targets):
        raise ConfigError(router_refusal(values["model"]))
    head = f"mixture of experts ({experts} experts per block); "
    if not lora:
        return head + "every weight trains, the router with its load-balancing loss in the training loss"
    reached = "the linear layers and the experts' fused 3D weights" if reaches_experts(targets) else \
        "the named linear layers (not the experts)"
    line = head + f"LoRA on {reached}; router and norms frozen; the router's load-balancing loss in the loss"
    if values["mode"] == "qlora":
        line += ("; 4-bit NF4: the nn.Linear layers (attention); 16-bit: the fused expert weights (most of the "
                 "model: bitsandbytes quantizes nn.Linear only) and the router, so 4 bits save little over lora")
    return line


def reaches_experts(targets: str | Sequence[str]) -> bool:
    """Whether `lora_target_modules` puts LoRA on the experts of an MoE model."""
    return targets == "all-linear" or any(expert_weights(t) for t in targets)


def expert_weights(target: str) -> tuple[str, ...]:
    """The fused expert weights a LoRA target name means (e.g. gate_proj -> gate_up_proj), () for other names."""
    return EXPERT_TARGETS.get(_short(target), ())


def router_refusal(model: str) -> str:
    return (f"key 'lora_target_modules': '{ROUTER}' is the router of {model}'s MoE blocks (mlp.gate): it stays "
            f"frozen, as the norms do (a trained router sends tokens to experts the adapter was not trained "
            f"with); remove it, or train every weight with mode: full")


def is_router(target: str) -> bool:
    return target.rsplit(".", 1)[-1] == ROUTER


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1] if name.startswith(EXPERTS + ".") else name


# ---------------------------------------------------------------- on the ranks

def experts_modules(model: "torch.nn.Module") -> list[tuple[str, "torch.nn.Module"]]:
    """(name, module) of each experts module: a module named `experts` that holds 3D parameters itself."""
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != EXPERTS:
            continue
        if any(len(getattr(p, "ds_shape", p.shape)) == 3 for p in module.parameters(recurse=False)):
            found.append((name, module))
    return found


def is_moe(model: "torch.nn.Module") -> bool:
    return bool(experts_modules(model))


def moe_blocks(model: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The sparse MoE blocks (router + experts): the parents of the experts modules."""
    names = {name.rpartition(".")[0] for name, _ in experts_modules(model)}
    return [module for name, module in model.named_modules() if name in names]


def expert_parameters(model: "torch.nn.Module") -> list[str]:
    """The names of the experts' 3D parameters (e.g. gate_up_proj, down_proj), in the model's order."""
    names = []
    for _, module in experts_modules(model):
        for name, p in module.named_parameters(recurse=False):
            if len(getattr(p, "ds_shape", p.shape)) == 3 and name not in names:
                names.append(name)
    return names


def linear_names(model: "torch.nn.Module") -> list[str]:
    """The leaf names of the nn.Linear layers outside the experts and routers (peft's "all-linear", which also leaves
    the output layer out)."""
    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, torch.nn.Linear) and module is not output and EXPERTS not in parts[:-1] \
                and parts[-1] != ROUTER:
            names.add(parts[-1])
    return sorted(names)


def lora_targets(model: "torch.nn.Module", requested: str | Sequence[str], rank: int, alpha: float) -> dict[str, Any]:
    """peft LoraConfig arguments for `requested` ("all-linear" or a list of names) on an MoE model: target_modules
    for the nn.Linear layers, target_parameters for the experts' fused weights. gate_up_proj holds two projections
    side by side: its LoRA gets rank 2r and alpha 2 alpha (rank_pattern / alpha_pattern), so each projection keeps
    rank r and the scale alpha / r, as peft converts a transformers-4 adapter of gate_proj + up_proj."""
    fused = expert_parameters(model)
    if requested == "all-linear":
        modules, params = linear_names(model), list(fused)
    else:
        modules, params = [], []
        for name in requested:
            if is_router(name):
                raise ConfigError(router_refusal(getattr(model.config, "name_or_path", "the model")))
            wanted = [p for p in expert_weights(name) if p in fused]
            params += [p for p in wanted if p not in params]
            if not wanted:
                modules.append(name)
    arguments = {"target_modules": modules, "target_parameters": [f"{EXPERTS}.{p}" for p in params]}
    if GATE_UP in params:
        pattern = rf".*\.{EXPERTS}\.{GATE_UP}"
        arguments.update(rank_pattern={pattern: 2 * rank}, alpha_pattern={pattern: 2 * alpha})
    return arguments
