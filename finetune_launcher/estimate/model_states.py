"""Memory of the model states per rank: weights (16-bit, fp32, or NF4 with double quantisation), gradients (by phase:
backward, optimizer step), the optimizer's fp32 master weights and Adam moments, and host memory with offload."""
import math
from dataclasses import replace

from finetune_launcher.models.references import is_random, loads_on_rank0

NF4_BLOCK = 64            # weights per absmax (bitsandbytes' blocksize for 4-bit)
NESTED_BLOCK = 256        # absmax values per fp32 absmax of the double quantisation
# Per tensor: the NF4 code book (16 fp32), the nested code book (256 fp32) and the nested offset (one fp32).
QUANT_STATE_FIXED_BYTES = 16 * 4 + 256 * 4 + 4
NF4_BYTES_PER_PARAM = 0.5  # two weights per byte (what ZeRO-3 gathers of a QLoRA model)
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
MASTER_BYTES = 4


def dtype_bytes(precision):
    return 4 if precision == "fp32" else 2


def reduce_bucket(spec, arch):
    return spec.reduce_bucket_size or arch.hidden_size ** 2


def lora_dtype_bytes(spec, e):
    """peft creates adapters in fp32. DeepSpeed casts every parameter to the compute dtype unless the model was
    built inside zero.Init (ZeRO-3 LoRA): then the adapters stay fp32. A 4-bit model is not built inside zero.Init,
    so QLoRA's adapters are cast (both measured with DeepSpeed 0.19)."""
    if spec.engine == "fsdp2":
        return e  # FSDP2 computes the adapters in the run's dtype (their fp32 masters are the sharded parameters)
    return 4 if spec.zero_stage == 3 and spec.mode == "lora" else e


def zero3_partitions_at_load(spec):
    """DeepSpeed's zero.Init partitions as the model loads; a 4-bit model, and every model under FSDP2 (sharded
    once loaded), is loaded whole by each rank first."""
    return spec.zero_stage == 3 and spec.mode != "qlora" and spec.engine != "fsdp2"


def nf4_tensor_bytes(numel):
    """(packed weight bytes, quant_state bytes) of one tensor in NF4 with double quantisation: two weights per
    byte; one uint8 absmax per 64 weights; one fp32 absmax per 256 of those; the code books and the offset."""
    blocks = math.ceil(numel / NF4_BLOCK)
    nested = math.ceil(blocks / NESTED_BLOCK)
    return math.ceil(numel * NF4_BYTES_PER_PARAM), blocks + 4 * nested + QUANT_STATE_FIXED_BYTES


def quantized_bytes(counts):
    """NF4 storage of the quantised weights and their quant_state, summed over the tensors."""
    packed = state = 0
    for numel in counts.quantized_sizes:
        tensor_packed, tensor_state = nf4_tensor_bytes(numel)
        packed, state = packed + tensor_packed, state + tensor_state
    return packed, state


def weight_bytes(spec, counts, e):
    """Parameter bytes held by one rank at the optimizer step: whole under ZeRO-2, 1/N under ZeRO-3 (small
    "persistent" parameters are partitioned too at that point: measured) and FSDP2, whose shards of what trains are
    the fp32 master weights (a full fine-tune's weights: 4 bytes each; the optimizer term then holds Adam only)."""
    if spec.engine == "fsdp2":
        return fsdp2_weight_bytes(spec, counts, e)
    lora = counts.lora * lora_dtype_bytes(spec, e)
    base = counts.total - counts.lora  # (with peft's trainable copies of modules_to_save, in the compute dtype)
    if spec.mode == "qlora":
        packed, state = quantized_bytes(counts)  # quant_state tensors are not parameters: never sharded
        dense = (base - counts.quantized) * e
        return (packed + dense + lora) / (spec.world_size if spec.zero_stage == 3 else 1) + state
    if spec.zero_stage == 3:
        return 0.0 if spec.offload else (base * e + lora) / spec.world_size  # offload_param: partitions in CPU memory
    return base * e + lora


def fsdp2_weight_bytes(spec, counts, e):
    frozen = counts.total - counts.trainable
    if spec.mode == "qlora":
        packed, state = quantized_bytes(counts)  # quant_state stays whole on every rank
        return (packed + (frozen - counts.quantized) * e + counts.trainable * 4) / spec.world_size + state
    return (frozen * e + counts.trainable * 4) / spec.world_size


def fsdp2_unit_bytes(arch, counts, e):
    """One FSDP2 unit gathered in the compute dtype: the largest of a decoder layer and the embedding or head (a
    UNet's block: its largest module, as the model has no decoder layers)."""
    layers = getattr(arch, "num_hidden_layers", 0)
    layer = (counts.total - counts.largest_module) / layers if layers else 0
    return max(layer, counts.largest_module) * e


def gradient_bytes(spec, arch, counts, e):
    """(bytes in the backward phase, bytes during the optimizer step) on one rank. Backward: the rank's gradient
    partition in the compute dtype and the reduce bucket(s). Step: ZeRO-2 frees both and holds the fp32 copy of
    the partition; ZeRO-3 keeps them and adds the fp32 copy (both measured in DeepSpeed 0.19)."""
    partition = counts.trainable / spec.world_size
    if spec.engine == "fsdp2":
        # the sharded fp32 gradients; while a unit's reduce-scatter runs, its unsharded gradients in the compute
        # dtype and their fp32 copy for the reduce (what trains of one unit)
        unit = fsdp2_unit_bytes(arch, counts, 1) * (counts.trainable / counts.total) * (e + 4)
        return partition * 4 + unit, partition * 4 + unit
    buckets = reduce_bucket(spec, arch) * e * (2 if spec.overlap_comm and spec.zero_stage == 2 else 1)
    if spec.offload:
        return buckets, 0.0  # the partition gradients go to pinned CPU buffers
    backward = partition * e + buckets
    fp32_copy = partition * 4
    return backward, fp32_copy + (backward if spec.zero_stage == 3 else 0.0)


def optimizer_bytes(spec, counts):
    if spec.offload:
        return 0.0
    masters = 0 if spec.engine == "fsdp2" else MASTER_BYTES  # FSDP2's masters are the weights themselves
    return counts.trainable / spec.world_size * (masters + ADAM_STATE_BYTES)


def host_bytes_per_node(spec, counts, e):
    """Host (CPU) memory per node beyond the processes themselves: offloaded states, and the whole model where it
    is loaded before it is sharded: by each rank for QLoRA under ZeRO-3 (not built inside zero.Init), by rank 0
    alone under FSDP2 with 16-bit weights (the others build it on the meta device: models.references.loads_on_rank0),
    counted here on every node as the most any node holds."""
    per_rank = 0.0
    if spec.offload:
        per_rank += counts.trainable / spec.world_size * (MASTER_BYTES + ADAM_STATE_BYTES + 4)
        if spec.zero_stage == 3:
            per_rank += counts.total * e / spec.world_size
    loading = 0.0  # a `random:` shape is built on the GPU (16-bit, or NF4 one layer at a time): nothing loaded
    if spec.zero_stage == 3 and not zero3_partitions_at_load(spec) and not is_random(spec.model):
        whole = weight_bytes(replace(spec, zero_stage=2, engine="deepspeed"), counts, e)  # as loaded, unsharded
        loading = whole if loads_on_rank0(spec) else whole * spec.procs_per_node
    return per_rank * spec.procs_per_node + loading

