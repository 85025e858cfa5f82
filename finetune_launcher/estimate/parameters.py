"""Parameter counts: of the base model (from the architecture's shapes, or exactly from transformers' model built on
the meta device, see meta_model.py) and of the run (LoRA adapters, what trains, what bitsandbytes quantises)."""
from dataclasses import dataclass

from finetune_launcher.estimate.inputs import EstimateError
from finetune_launcher.models.experts import EXPERTS, FUSED, GATE_UP, ROUTER, expert_weights


@dataclass(frozen=True)
class BaseCounts:
    """The model as transformers builds it, before adapters."""
    total: int
    embedding: int
    lm_head: int                 # 0 when tied to the embedding
    linear_sizes: tuple          # numel of every nn.Linear weight bitsandbytes would quantise (lm_head excluded)
    matmul_per_token: int        # weights multiplied per token (active experts only), lm_head included
    largest_module: int          # the most parameters one module holds itself (what ZeRO-3 gathers at once)
    vision: int = 0              # vision tower and projector (vision-language models)
    source: str = "shapes"       # "shapes" (the table's formula) or "meta-device model"


@dataclass
class ParamCounts:
    """The run's counts: the model as published (`base`), what the run adds to it (`adapter`: peft's LoRA matrices
    and its trainable copies of modules_to_save), what trains, what is stored in NF4. `total` is what the ranks
    hold: base + adapter."""
    total: int
    base: int
    trainable: int
    lora: int
    embedding: int
    lm_head: int
    quantized: int               # NF4 weights (QLoRA)
    quantized_sizes: tuple       # numel of each NF4 tensor (QLoRA), for the per-tensor quant_state
    matmul_per_token: int
    largest_module: int
    vision: int = 0
    vision_lora: int = 0         # LoRA on the vision blocks (lora_vision), part of `lora`
    merger_trainable: int = 0    # merger parameters that train (train_merger), part of `trainable`

    @property
    def adapter(self):
        return self.total - self.base


def layer_linears(arch):
    """(name, in_features, out_features) of the 2D weights of one decoder layer (an MoE router included)."""
    h, q, kv, inter = arch.hidden_size, arch.q_width, arch.kv_width, arch.intermediate_size
    linears = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)]
    if arch.is_moe:
        return linears + [("gate", h, arch.num_experts)]  # the router
    return linears + [("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]


def quantized_linears(arch):
    """What bitsandbytes turns into NF4: every nn.Linear of a layer (an MoE router is a plain parameter)."""
    return [linear for linear in layer_linears(arch) if not (arch.is_moe and linear[0] == "gate")]


def lora_target_names(arch, targets):
    """The LoRA targets of one layer as the trainer resolves them; an MoE's experts as experts.gate_up_proj and
    experts.down_proj (models/experts.py: the names that mean them), its router frozen (no LoRA under all-linear)."""
    names = [n for n, _, _ in layer_linears(arch) if not (arch.is_moe and n == ROUTER)]
    if arch.is_moe:
        names += [f"{EXPERTS}.{weight}" for weight in FUSED]
    if targets in (None, "all-linear"):
        return names
    targets = [targets] if isinstance(targets, str) else list(targets)
    if arch.is_moe:
        targets = [expert for t in targets for expert in
                   ([f"{EXPERTS}.{w}" for w in expert_weights(t)] or [t])]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise EstimateError(f"LoRA target(s) {unknown} are not modules of {arch.name}; its targets are "
                            f"{', '.join(names)} (or all-linear)")
    return list(dict.fromkeys(targets))


def lora_tensor_sizes(arch, rank, targets):
    """numel of each LoRA A/B matrix of one layer (peft's shapes; MoE experts get peft's parameter LoRA)."""
    chosen = set(lora_target_names(arch, targets))
    sizes = []
    for name, fan_in, fan_out in layer_linears(arch):
        if name in chosen:
            sizes += [rank * fan_in, fan_out * rank]
    e, h, inter = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
    if f"{EXPERTS}.{GATE_UP}" in chosen:
        sizes += [2 * rank * e * h, 2 * inter * 2 * rank * e]  # gate_up_proj: rank 2r (gate and up, r each)
    if f"{EXPERTS}.down_proj" in chosen:
        sizes += [rank * e * inter, h * rank * e]
    return sizes


def base_counts_from_shapes(arch):
    """The counts the modeling code gives, computed from the layer shapes (torch-free: the offline table's path;
    a unit test holds them equal to the meta-device model for every table entry)."""
    h, layers = arch.hidden_size, arch.num_hidden_layers
    embedding = arch.vocab_size * h
    lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    linear = sum(i * o for _, i, o in layer_linears(arch))
    experts = 3 * arch.num_experts * h * arch.moe_intermediate_size
    biases = (arch.q_width + 2 * arch.kv_width) if arch.qkv_bias else 0
    small = arch.norms_per_layer * h + (2 * arch.hd if arch.qk_norm else 0) + biases
    active_mlp = 3 * arch.num_experts_per_tok * h * arch.moe_intermediate_size
    largest = max([embedding, lm_head, experts] + [i * o for _, i, o in layer_linears(arch)])
    vision = arch.vision.params if arch.vision else 0
    return BaseCounts(total=embedding + lm_head + layers * (linear + experts + small) + h + vision,
                      embedding=embedding, lm_head=lm_head,
                      linear_sizes=tuple(i * o for _, i, o in quantized_linears(arch)) * layers,
                      matmul_per_token=layers * (linear + active_mlp) + arch.vocab_size * h,
                      largest_module=largest, vision=vision)


def count_params(arch, spec):
    """The run's counts for `spec` (mode, LoRA rank and targets) on `arch`."""
    base = arch.counts or base_counts_from_shapes(arch)
    lora_sizes = lora_tensor_sizes(arch, spec.lora_r, spec.lora_target_modules) if spec.mode != "full" else []
    vision_lora, merger = arch.vision.trainable(spec) if arch.vision else (0, 0)
    lora = arch.num_hidden_layers * sum(lora_sizes) + vision_lora
    quantized_sizes = base.linear_sizes if spec.mode == "qlora" else ()
    if spec.mode == "full":  # the language model trains; the vision tower is frozen but for trained mergers
        total, trainable = base.total, base.total - base.vision + merger
    else:  # modules_to_save: peft trains a copy of each merger beside the frozen original
        total, trainable = base.total + lora + merger, lora + merger
    return ParamCounts(total=total, base=base.total, trainable=trainable, lora=lora,
                       embedding=base.embedding, lm_head=base.lm_head, quantized=sum(quantized_sizes),
                       quantized_sizes=quantized_sizes, matmul_per_token=base.matmul_per_token,
                       largest_module=base.largest_module, vision=base.vision, vision_lora=vision_lora,
                       merger_trainable=merger)
