"""Activation memory: the bytes one micro-batch saves for backward (counted op by op for the transformers modeling
code: what torch.autograd.graph.saved_tensors_hooks sees), and the short-lived buffers of the backward phase."""
import math
from dataclasses import dataclass

from finetune_launcher.estimate.model_states import NF4_BYTES_PER_PARAM, dtype_bytes, fsdp2_unit_bytes, lora_dtype_bytes
from finetune_launcher.estimate.parameters import layer_linears, lora_target_names

ZERO3_MAX_LIVE_PARAMETERS = int(1e9)  # DeepSpeed's default, and ds_configs/zero3.json's


@dataclass
class ActivationShape:
    tokens: int      # micro_batch x padded sequence length
    batch: int
    seq: int
    e: int           # activation dtype bytes
    masked: bool     # a materialised attention mask (SDPA/eager with packing or padding)
    mask_bytes: int  # per element of a dropout mask: bool on GPUs, a float noise tensor on the CPU


def activation_shape(spec, precision, device_kind="gpu"):
    seq = -(-spec.max_length // 8) * 8  # collate pads to a multiple of 8
    masked = attention_masked(spec)
    e = dtype_bytes(precision)
    return ActivationShape(tokens=spec.micro_batch_size * seq, batch=spec.micro_batch_size, seq=seq, e=e,
                           masked=masked, mask_bytes=e if device_kind == "cpu" else 1)


def attention_masked(spec):
    """Whether SDPA/eager attention gets a materialised mask: packed rows (a block-diagonal mask from the restarting
    positions) and padded micro-batches do; full text blocks and single unpadded rows do not (transformers then drops
    the mask and SDPA runs its causal flash kernel, GQA's k/v not repeated). FlexAttention and flash-attn never
    materialise one; eager attention always does."""
    if spec.attn_implementation == "eager":
        return True
    if spec.attn_implementation != "sdpa" or spec.text_blocks:
        return False
    return spec.packing or spec.micro_batch_size > 1


def saved_inputs(arch, spec):
    """Which layer inputs autograd keeps: a frozen linear keeps nothing; a LoRA adapter keeps its input (its
    dropout's output when lora_dropout > 0); a trainable linear keeps its input."""
    full = spec.mode == "full"
    targets = set() if full else set(lora_target_names(arch, spec.lora_target_modules))
    direct = full or spec.lora_dropout == 0
    mlp_names = {"gate_proj", "up_proj", "gate", "experts.gate_up_proj", "experts.down_proj"}
    return {"attention_input": full or (direct and bool(targets & {"q_proj", "k_proj", "v_proj"})),
            "mlp_input": full or (direct and bool(targets & mlp_names)),
            "down_input": full or (direct and "down_proj" in targets),
            "lm_head_input": full, "norm_weights": full}


def norm_saved_bytes(width, shape, weight_trainable, output_saved, liger=False):
    """transformers' RMSNorm keeps its fp32 input (or the upcast copy) and rsqrt; the normalised tensor when the
    weight trains; its output when the next linear keeps its input. Liger's keeps the 16-bit input and rsqrt."""
    if liger:
        return shape.e * shape.tokens * width * (2 if output_saved else 1) + 4 * shape.tokens
    per_element = 4 + (shape.e if weight_trainable else 0) + (shape.e if output_saved else 0)
    return per_element * shape.tokens * width + 4 * shape.tokens


def attention_saved_bytes(arch, spec, shape):
    t, e = shape.tokens, shape.e
    q, kv = arch.q_width, arch.kv_width
    terms = {}
    if arch.qk_norm:
        terms["qk_norm"] = norm_saved_bytes(q + kv, shape, spec.mode == "full", True)
    repeat_kv = shape.masked and arch.num_key_value_heads != arch.num_attention_heads
    if spec.attn_implementation == "eager":
        heads_sq = shape.batch * arch.num_attention_heads * shape.seq ** 2
        terms["q_k_v"] = 3 * t * q * e
        terms["attention_probs"] = heads_sq * (4 + (e if e < 4 else 0))  # fp32 softmax (+ cast back)
        terms["o_proj_input"] = t * q * e
    else:
        # SDPA keeps q, k, v (k/v repeated to all heads when a mask forces repeat_kv), its output (which is
        # also o_proj's input: same storage) and the log-sum-exp.
        terms["q_k_v"] = t * q * e + 2 * t * (q if repeat_kv else kv) * e
        terms["output_and_lse"] = t * q * e + shape.batch * arch.num_attention_heads * shape.seq * 4
    if shape.masked:
        terms["mask"] = shape.batch * shape.seq ** 2 * e  # SDPA converts the bool mask per layer
    return terms


def mlp_saved_bytes(arch, spec, shape):
    t, e = shape.tokens, shape.e
    if arch.is_moe:
        k, inter = arch.num_experts_per_tok, arch.moe_intermediate_size
        return t * k * (2 * arch.hidden_size + 4 * inter) * e + 4 * t * arch.num_experts
    down = 1 if saved_inputs(arch, spec)["down_input"] else 0
    kept = 2 if spec.liger_kernel else 3  # gate out, (act out: not Liger's SwiGLU, it recomputes), up out
    return (kept + down) * t * arch.intermediate_size * e  # (+ act*up, down_proj's input)


def lora_saved_bytes(arch, spec, shape):
    if spec.mode == "full":
        return 0
    t, e = shape.tokens, shape.e
    adapter_e = lora_dtype_bytes(spec, e)
    chosen = set(lora_target_names(arch, spec.lora_target_modules))
    total = 0
    for name, fan_in, _ in layer_linears(arch):
        if name not in chosen:
            continue
        total += t * spec.lora_r * adapter_e  # lora_A output, saved by lora_B
        if spec.lora_dropout > 0:
            total += t * fan_in * (adapter_e + shape.mask_bytes)  # dropout output (saved by lora_A) + mask
        elif adapter_e != e:
            total += t * fan_in * adapter_e  # peft casts the input to the fp32 adapters' dtype
    return total


def layer_activation_terms(arch, spec, shape):
    """Bytes one decoder layer saves for backward (no checkpointing), by component."""
    keeps = saved_inputs(arch, spec)
    h = arch.hidden_size
    liger = spec.liger_kernel
    terms = {"norms": norm_saved_bytes(h, shape, keeps["norm_weights"], keeps["attention_input"], liger) +
             norm_saved_bytes(h, shape, keeps["norm_weights"], keeps["mlp_input"], liger) +
             (arch.norms_per_layer - 2) * norm_saved_bytes(h, shape, keeps["norm_weights"], False, liger)}
    terms.update(attention_saved_bytes(arch, spec, shape))
    terms["mlp"] = mlp_saved_bytes(arch, spec, shape)
    terms["lora"] = lora_saved_bytes(arch, spec, shape)
    terms["expert_lora_weights"] = expert_lora_weight_bytes(arch, spec, shape)
    return terms


def expert_lora_weight_bytes(arch, spec, shape):
    """moe_lora_kernel peft: peft folds the adapter into each LoRA'd expert weight (W + s B A, all experts) on every
    forward, and the experts' grouped GEMM keeps that copy for the backward; the grouped kernel keeps none."""
    if spec.mode == "full" or not arch.is_moe or spec.moe_lora_kernel != "peft":
        return 0
    chosen = set(lora_target_names(arch, spec.lora_target_modules))
    per_expert = {"experts.gate_up_proj": 2 * arch.moe_intermediate_size * arch.hidden_size,
                  "experts.down_proj": arch.hidden_size * arch.moe_intermediate_size}
    return sum(arch.num_experts * n * shape.e for name, n in per_expert.items() if name in chosen)


def model_level_activation_terms(arch, spec, shape):
    t, e = shape.tokens, shape.e
    keeps = saved_inputs(arch, spec)
    terms = {"final_norm": norm_saved_bytes(arch.hidden_size, shape, keeps["norm_weights"], keeps["lm_head_input"],
                                            spec.liger_kernel),
             "labels_and_ids": 8 * t * (2 if spec.mode == "full" else 1)}
    if fused_cross_entropy(spec):
        terms["fused_ce_input_gradient"] = t * arch.hidden_size * e  # computed in the forward, kept for backward
    else:
        terms["logits_log_softmax_fp32"] = 4 * t * arch.vocab_size
    if arch.final_logit_softcap:
        terms["logit_softcap"] = t * arch.vocab_size * e
    if not spec.gradient_checkpointing:
        terms["rope_cos_sin"] = 2 * t * arch.hd * e
    return terms


def activation_terms(arch, spec, precision, device_kind="gpu"):
    """Bytes saved for backward by one micro-batch (what saved_tensors_hooks counts), by term; and one layer's
    bytes (recomputed in backward under checkpointing)."""
    shape = activation_shape(spec, precision, device_kind)
    layer = sum(layer_activation_terms(arch, spec, shape).values())
    terms = model_level_activation_terms(arch, spec, shape)
    if spec.gradient_checkpointing:
        # Non-reentrant checkpointing keeps each layer's input; position embeddings and the mask are kwargs.
        terms["checkpointed_layer_inputs"] = arch.num_hidden_layers * shape.tokens * arch.hidden_size * shape.e
    else:
        terms["layers"] = arch.num_hidden_layers * layer
        if spec.mode != "full":  # the frozen embedding's output needs no gradient: layer 0's first norm keeps nothing
            terms["layers"] -= norm_saved_bytes(arch.hidden_size, shape, False, False, spec.liger_kernel)
    return terms, layer


def fused_cross_entropy(spec):
    """Liger's fused linear cross-entropy runs outside ZeRO-3 (it reads lm_head.weight outside the module)."""
    return spec.liger_kernel and spec.zero_stage != 3


def transient_terms(arch, spec, counts, precision, one_layer):
    """Short-lived buffers of the backward phase."""
    shape = activation_shape(spec, precision)
    e = shape.e
    if fused_cross_entropy(spec):
        # Liger's fused linear cross-entropy: logits and their gradient one chunk of tokens at a time
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(shape.tokens / math.ceil(arch.vocab_size /
                                                                                    arch.hidden_size)))))
        terms = {"fused_ce_chunk": 8 * chunk * arch.vocab_size}
    else:
        terms = {"logits_gradients": 8 * shape.tokens * arch.vocab_size}
    if spec.gradient_checkpointing:
        terms["recomputed_layer"] = one_layer
    if spec.engine == "fsdp2":  # the unit running and the one prefetched, gathered in the compute dtype
        terms["fsdp2_gathered_units"] = 2 * fsdp2_unit_bytes(arch, counts, e)
    elif spec.zero_stage == 3:
        terms["zero3_gathered_parameters"] = zero3_live_bytes(spec, counts, e)
    return terms




def zero3_live_bytes(spec, counts, e):
    """Gathered parameters ZeRO-3 holds in the backward phase: with stage3_max_reuse_distance at 1e9 a parameter
    gathered for the forward is kept for its backward use, up to stage3_max_live_parameters of them (1e9: about
    2 GB in 16-bit, as the DeepSpeed guide of transformers says); adapters are never gathered (whole on every rank,
    below the persistence threshold). Plus the full-size gradient of the largest module before its reduce-scatter
    when it trains."""
    base = counts.total - counts.lora
    live = min(base, spec.stage3_max_live_parameters or ZERO3_MAX_LIVE_PARAMETERS)
    bytes_per_param = (counts.quantized * NF4_BYTES_PER_PARAM + (base - counts.quantized) * e) / base
    return live * bytes_per_param + (counts.largest_module * e if spec.mode == "full" else 0)
