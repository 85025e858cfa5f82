"""Time per optimizer step: model FLOPs (6N full, 4N LoRA, +2N recompute, + attention) at a fraction of the
device's peak (MFU), element-wise work at memory bandwidth, QLoRA de-quantisation, the optimizer update, ZeRO
communication (reduce-scatter / all-gather at NCCL bus bandwidth) and per-layer framework overhead.

With compiled decoder layers on a GPU whose table entry has a tensor-core efficiency (the trainer's default path
there) the device time is modelled by kernel class instead of one MFU prior: the frozen and trained weights' matrix
products and causal (flash / FlexAttention) attention at the tensor-core rate, masked SDPA attention (packed or
padded rows) at the memory-efficient kernel's lower rate over the full square, the LoRA adapters as the bytes they
move, at memory bandwidth; the launching thread stays ahead of the GPU (docs/estimation.md, "Compiled layers")."""
from finetune_launcher.estimate.activations import activation_shape
from finetune_launcher.estimate.calibration import calibration_factor, calibration_key
from finetune_launcher.estimate.devices import CPU_MEMORY_GBPS_PER_RANK, inter_node_busbw
from finetune_launcher.estimate.model_states import NF4_BYTES_PER_PARAM
from finetune_launcher.estimate.parameters import layer_linears, lora_target_names

OPTIMIZER_BYTES_PER_PARAM = 60  # DeepSpeed step: gradient flatten, norm, clip, AdamW, copy back to 16-bit
# Per transformer layer and pass (forward, backward, recompute): python dispatch, kernel launches, hooks. Priors
# until calibration; CPU measured on the 2-core machine of docs/estimation.md.
LAYER_OVERHEAD_S = {"gpu": 0.0015, "cpu": 0.002}
STEP_OVERHEAD_S = {"gpu": 0.02, "cpu": 0.02}
# An eager decoder layer (peft's LoRA modules, DeepSpeed's hooks) costs the launching thread this much per layer and
# pass on a GPU host: 4.4 ms at most on the host of docs/benchmarks.md's first gpu_matrix (LoRA ZeRO-2, 0.267 s for
# 28 layers x 2 passes), 5.0-6.1 ms on the issue-20 host (micro-batch 4 against 8). The smaller is the floor: a step
# is never faster than its launches. (Diffusion keeps LAYER_OVERHEAD_S per UNet block.)
EAGER_LAYER_HOST_S = 0.004
# Of an eager MoE layer's dispatched operations, the share its experts module runs (the grouped LoRA kernel): 42 of
# 169 in a forward of the tiny Qwen3-MoE layer, counted on the CPU. Compiled layers leave the experts eager
# (models/compiled_layers.py keep_experts_eager), so that share of EAGER_LAYER_HOST_S stays on the host per layer
# and pass. A proxy, not a GPU measurement.
EAGER_EXPERTS_SHARE = 0.25
# ZeRO-3 on GPUs: each partitioned module is gathered and released by Python hooks on every pass, time the GPU
# waits for; measured 0.54-0.75 ms per module and pass on one H200 (docs/benchmarks.md, gpu_matrix). On the CPU the
# gloo gather term already holds it (calibrated in docs/estimation.md).
ZERO3_FETCH_S = 0.00065
# FSDP2's gather, copy-out and reshard of one unit per pass as the host sees it: (0.560 - 0.524) s per step over
# 34 units x 2 passes x 2 micro-batches, LoRA on the Llama-3-8B shape against the unsharded step on one H200
# (docs/benchmarks.md, issue 29)
FSDP2_UNIT_S = 0.00026
# Liger's kernels remove memory-bound passes (norms, SwiGLU, RoPE, fp32 logits): Llama-3-8B shape LoRA, no
# checkpointing, one H200: 0.828 s/step with HF's modules, 0.62-0.72 with Liger's (docs/benchmarks.md).
LIGER_MFU_GAIN = 1.25
# Compiled layers on a GPU (docs/estimation.md, "Compiled layers"): SDPA with a mask (packed or padded rows) cannot
# use the flash kernel; its memory-efficient kernel is taken at half the rate of the matrix products, over the full
# square (a prior: issue 31's packed-row measurement on one H200, 0.589 s/step predicted 0.585, may have shared the
# GPU with another run and bounds it from one side only).
MASKED_ATTENTION_FRACTION = 0.5
# Elements a LoRA adapter moves per token and per element of its input / output width, forward and backward,
# counted for peft's LoRA layer (bf16: A reads x; B writes; scaling and the add read two outputs and write one;
# backward: the scaled gradient, dB, d(A out), dA rereads x, dx written and added to the base layer's) and the
# fraction of the memory bandwidth skinny (rank r) matrix products and element-wise kernels reach.
LORA_ELEMENTS_PER_IN, LORA_ELEMENTS_PER_OUT = 6, 8
LORA_FORWARD_ELEMENTS_PER_IN, LORA_FORWARD_ELEMENTS_PER_OUT = 1, 4  # recomputed under checkpointing


def attention_flops_per_token(arch, spec, masked):
    """Forward QK^T and AV: 4 x span x heads x head_dim per layer; causal kernels skip half unless a mask is
    materialised (SDPA with packing/padding computes the full square)."""
    span = spec.max_length * (1.0 if masked else 0.5)
    return 4 * span * arch.q_width * arch.num_hidden_layers


def flops_per_token(arch, spec, counts, masked):
    """Training FLOPs per (padded) token: forward 2N; backward 4N for full fine-tunes (input and weight
    gradients), 2N for LoRA (input gradients only, frozen weights); recompute adds a forward of the layers but
    what checkpointing skips."""
    n = counts.matmul_per_token
    n_layers = n - arch.vocab_size * arch.hidden_size - recompute_skipped_per_token(arch, spec)
    attn = attention_flops_per_token(arch, spec, masked)
    lora = counts.lora - counts.vision_lora if spec.mode != "full" else 0  # vision LoRA: the tower's flops
    forward = 2 * n + attn + 2 * lora
    backward = (4 * n if spec.mode == "full" else 2 * n) + 2 * attn + 4 * lora
    recompute = (2 * n_layers + attn + 2 * lora) if spec.gradient_checkpointing else 0
    return {"forward": forward, "backward": backward, "recompute": recompute,
            "total": forward + backward + recompute, "model_6n": 6 * counts.total,
            "attention": attn * (4 if spec.gradient_checkpointing else 3),
            "lora": lora * (8 if spec.gradient_checkpointing else 6)}


def recompute_skipped_per_token(arch, spec):
    """Weights per token the recompute does not multiply: torch's non-reentrant checkpoint stops a layer's
    recompute once every tensor it saved is back, so the last matmul (down_proj, whose output nothing saves) is
    skipped unless a LoRA adapter on it runs after it (measured with torch's FlopCounterMode)."""
    if arch.is_moe or (spec.mode != "full" and "down_proj" in lora_target_names(arch, spec.lora_target_modules)):
        return 0
    return arch.num_hidden_layers * arch.hidden_size * arch.intermediate_size


def comm_seconds(spec, device, counts, e, interconnect):
    """Exposed ZeRO communication per optimizer step, from nccl-tests' bus-bandwidth definitions:
    reduce-scatter / all-gather of S bytes over n ranks take S x (n-1)/n / busbw."""
    w = spec.world_size
    if w == 1:
        return 0.0, {}
    busbw = device.intra_busbw_gbps if spec.nnodes == 1 else inter_node_busbw(device, interconnect)
    factor = (w - 1) / w / (busbw * 1e9)
    # reduce-scatter after every backward; FSDP2 LoRA skips it until the step's last micro-batch
    reduces = 1 if spec.engine == "fsdp2" and spec.mode != "full" else spec.gradient_accumulation_steps
    grads = counts.trainable * e * factor * reduces
    params = counts.trainable * e * factor if spec.zero_stage == 2 else 0.0  # all-gather of updated parameters
    gather = 0.0
    if spec.zero_stage == 3:
        weight_bytes_total = counts.quantized * NF4_BYTES_PER_PARAM + (counts.total - counts.quantized) * e
        passes = 3 if spec.gradient_checkpointing else 2
        gather = weight_bytes_total * factor * passes * spec.gradient_accumulation_steps
    return grads + params + gather, {"reduce_scatter_s": grads, "allgather_params_s": params,
                                     "zero3_gather_s": gather, "busbw_gbps": busbw}


def layers_compiled_on_gpu(spec, device):
    """Decoder layers compiled (the resolved compile_layers) on a GPU: a few fused kernels per layer, the launching
    thread stays ahead of the GPU (busy 91-95% measured)."""
    return bool(spec.compile_layers) and device.kind != "cpu"


def compiled_on_gpu(spec, device):
    """The kernel-class model applies: LoRA/QLoRA with compiled layers on a GPU whose table entry gives the
    tensor-core efficiency. A full fine-tune keeps the MFU prior: its weight gradients and the plain engine's fp32
    master weights are not in the kernel-class terms (they came out 19% short on the one measured row, against 1%
    for the prior)."""
    return layers_compiled_on_gpu(spec, device) and bool(device.tensor_core_efficiency) and spec.mode != "full"


def lora_elements_per_token(arch, spec):
    """(forward + backward, forward only) elements the LoRA adapters of the language model move per token."""
    if spec.mode == "full":
        return 0, 0
    chosen = set(lora_target_names(arch, spec.lora_target_modules))
    both = forward = 0
    for name, fan_in, fan_out in layer_linears(arch):
        if name in chosen:
            both += LORA_ELEMENTS_PER_IN * fan_in + LORA_ELEMENTS_PER_OUT * fan_out
            forward += LORA_FORWARD_ELEMENTS_PER_IN * fan_in + LORA_FORWARD_ELEMENTS_PER_OUT * fan_out
            if spec.lora_dropout > 0:  # the dropout reads x and writes its output and mask, forward only
                both, forward = both + 3 * fan_in, forward + 3 * fan_in
    return both * arch.num_hidden_layers, forward * arch.num_hidden_layers


def compiled_matmul_terms(arch, spec, device, flops, shape, peak, tokens):
    """Matrix products and attention at the tensor-core rate (masked SDPA at MASKED_ATTENTION_FRACTION of it); the
    LoRA adapters' own FLOPs are negligible, their bytes are lora_s."""
    rate = peak * device.tensor_core_efficiency
    attention = flops["attention"] * tokens
    lora = flops["lora"] * tokens
    return {"matmul_s": (flops["total"] * tokens - attention - lora) / rate,
            "attention_s": attention / (rate * (MASKED_ATTENTION_FRACTION if shape.masked else 1.0))}


def step_time(arch, spec, device, counts, activations_per_layer, calibration, interconnect):
    """Seconds per optimizer step, by term, before and after calibration."""
    precision = spec.precision
    shape = activation_shape(spec, precision)
    e = shape.e
    tokens = shape.tokens * spec.gradient_accumulation_steps  # per rank per step (padded)
    flops = flops_per_token(arch, spec, counts, shape.masked)
    mfu = default_mfu(device, spec.mode) * (LIGER_MFU_GAIN if spec.liger_kernel else 1.0)
    peak = device.peak_flops(precision)
    bandwidth = device.hbm_tbps * 1e12
    passes = 3 if spec.gradient_checkpointing else 2
    accum = spec.gradient_accumulation_steps
    compiled = compiled_on_gpu(spec, device)
    if compiled:
        both, forward = lora_elements_per_token(arch, spec)
        lora_bytes = (both + (forward if spec.gradient_checkpointing else 0)) * e * tokens
        matmul = compiled_matmul_terms(arch, spec, device, flops, shape, peak, tokens)
        matmul["lora_s"] = lora_bytes / (bandwidth * device.memory_efficiency)
        bandwidth *= device.memory_efficiency  # element-wise, de-quantisation and the optimizer too
    else:
        matmul = {"matmul_s": flops["total"] * tokens / (peak * mfu)}
    terms = {
        **matmul,
        "elementwise_s": 3 * activations_per_layer * arch.num_hidden_layers * accum * (passes / 2) / bandwidth,
        "dequant_s": (counts.quantized * 2.5 * passes * accum / bandwidth) if spec.mode == "qlora" else 0,
        "optimizer_s": counts.trainable / spec.world_size * OPTIMIZER_BYTES_PER_PARAM /
        (bandwidth if not spec.offload else CPU_MEMORY_GBPS_PER_RANK * 1e9),
    }
    if arch.vision:
        terms["vision_s"] = sum(arch.vision.flops(spec).values()) * accum / (peak * mfu)
    compute_bound = sum(terms.values())
    # compiled layers: a few fused kernels per layer, the launching thread stays ahead (GPU busy 91-95% measured)
    terms["overhead_s"] = (compiled_overhead_seconds(arch, spec, passes, compute_bound)
                           if layers_compiled_on_gpu(spec, device) else
                           overhead_seconds(arch, spec, device, passes, compute_bound)) + \
        zero3_fetch_seconds(arch, spec, device, passes)
    comm, comm_detail = comm_seconds(spec, device, counts, e, interconnect)
    # On GPUs ZeRO-3 prefetches parameters on a side stream: gathers hide behind compute; the rest overlaps only
    # with overlap_comm. gloo on the CPU shares the cores with compute: nothing overlaps.
    gather = comm_detail.get("zero3_gather_s", 0.0)
    gather_exposed = gather if device.kind == "cpu" else max(0.0, gather - compute_bound)
    others = comm - comm_detail.get("zero3_gather_s", 0.0)
    terms["comm_s"] = gather_exposed + (max(0.0, others - compute_bound) if spec.overlap_comm else others)
    cold = compute_bound + terms["overhead_s"] + terms["comm_s"]
    factor = calibration_factor(calibration, device, precision)
    calibrated = compute_bound * factor + terms["overhead_s"] + terms["comm_s"] if factor else None
    return {"terms": terms, "comm": comm_detail, "flops_per_token": flops,
            "mfu_assumed": None if compiled else mfu, "compiled_layers_model": compiled,
            "tokens_per_rank_step": tokens, "cold_s": cold, "calibrated_s": calibrated,
            "calibration_factor": factor, "device_bound_s": compute_bound,
            "calibration_key": calibration_key(device, precision)}


def compiled_overhead_seconds(arch, spec, passes, compute_bound):
    """Compiled layers on a GPU: the per-step constant, and for a mixture of experts the host time of the experts
    left eager, where it exceeds the compute it runs ahead of."""
    if not arch.is_moe:
        return STEP_OVERHEAD_S["gpu"]
    experts = EAGER_EXPERTS_SHARE * EAGER_LAYER_HOST_S * arch.num_hidden_layers * passes * \
        spec.gradient_accumulation_steps
    return STEP_OVERHEAD_S["gpu"] + max(0.0, experts - compute_bound)


def overhead_seconds(arch, spec, device, passes, compute_bound):
    """Framework time per step: python dispatch and launches per layer and pass, plus a per-step constant. On a
    CPU it adds to the compute; a GPU runs ahead of the launching thread, so only what exceeds compute shows."""
    kind = "cpu" if device.kind == "cpu" else "gpu"
    per_layer = EAGER_LAYER_HOST_S if kind == "gpu" else LAYER_OVERHEAD_S[kind]
    launches = per_layer * arch.num_hidden_layers * passes * spec.gradient_accumulation_steps
    if kind == "cpu":
        return STEP_OVERHEAD_S[kind] + launches
    return STEP_OVERHEAD_S[kind] + max(0.0, launches - compute_bound)


def zero3_fetch_seconds(arch, spec, device, passes):
    """Hook time of ZeRO-3's gathers: one per decoder layer (zero3_gather: layer) or one per linear of it (module;
    norms and LoRA matrices stay whole: below the persistence threshold), plus the embedding and the output head, on
    every pass of every micro-batch."""
    if spec.zero_stage != 3 or device.kind == "cpu":
        return 0.0
    if spec.engine == "fsdp2":  # one unit per decoder layer, the embedding and the head
        return FSDP2_UNIT_S * (arch.num_hidden_layers + 2) * passes * spec.gradient_accumulation_steps
    per_layer = 1 if spec.zero3_gather == "layer" else len(layer_linears(arch))
    modules = per_layer * arch.num_hidden_layers + 2
    return ZERO3_FETCH_S * modules * passes * spec.gradient_accumulation_steps


def default_mfu(device, mode):
    return device.mfu["full" if mode == "full" else "lora"]

