"""Memory and time estimates for a fine-tune before it is launched, and their calibration against measured steps.

Memory per GPU (bytes held by each rank), term by term:
  weights      parameters in the compute dtype (NF4 with double quantisation for QLoRA's linear layers), whole on
               every rank under ZeRO-2, 1/N of them under ZeRO-3;
  gradients    backward: the rank's gradient partition in the compute dtype and the reduce bucket(s); optimizer
               step: the fp32 copy of the partition (ZeRO-3 keeps the backward buffers too);
  optimizer    fp32 master weights + Adam's two moments of the rank's partition (12 bytes per trainable parameter
               / N), on the CPU with offload;
  activations  bytes saved for backward by one micro-batch (counted op by op for the transformers modeling code:
               what torch.autograd.graph.saved_tensors_hooks sees), the checkpointed layer inputs with gradient
               checkpointing, and the fp32 log-softmax of the logits;
  other        transients (the logits' gradient buffers, the layer recomputed under checkpointing, ZeRO-3's gathered
               parameters), the runtime (CUDA context, NCCL) and a stated margin.
The peak is the larger of the backward phase (activations alive) and the optimizer step (fp32 gradient copy alive).

Time per optimizer step: model FLOPs (6N full, 4N LoRA, +2N recompute, + attention) at a fraction of the device's
peak (MFU), element-wise work at memory bandwidth, QLoRA de-quantisation, the optimizer update, ZeRO
communication (reduce-scatter / all-gather at NCCL bus bandwidth) and a per-layer overhead. `--measure` and
`--from-history` refit the throughput term (one factor on the device-bound terms) from measured step times.
"""
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from train.arch_table import ARCHITECTURES

GIB = 1024 ** 3
GPU_TABLE_PATH = Path(__file__).with_name("gpu_table.json")
QUANT_BYTES_PER_PARAM = 0.5  # NF4: two weights per byte
# Double quantisation: one uint8 absmax per 64 weights, one fp32 absmax per 256 of those blocks.
QUANT_STATE_BYTES_PER_PARAM = 1 / 64 + 4 / (64 * 256)
QUANT_STATE_BYTES_PER_TENSOR = 1092  # nested code book (256 fp32), NF4 code (16 fp32), offset
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32
MASTER_BYTES = 4
DEFAULT_MARGIN = 0.10
GPU_RUNTIME_GIB = 1.0  # CUDA context, cuBLAS workspace, NCCL buffers
CPU_RUNTIME_GIB = 0.6  # python + torch + deepspeed per process (RSS of an idle rank here)
CPU_PEAK_GFLOPS_PER_CORE = 100.0  # fp32 GEMM on one AVX-512 core (about 97 measured here; AVX2 cores: half)
CPU_MFU = 0.85
CPU_MEMORY_GBPS_PER_RANK = 20.0
CPU_GLOO_BUSBW_GBPS = 0.5  # DeepSpeed collectives over gloo between processes of one machine (measured)
OPTIMIZER_BYTES_PER_PARAM = 60  # DeepSpeed step: gradient flatten, norm, clip, AdamW, copy back to 16-bit
PACKED_FILL = 0.95  # fraction of a packed row holding real tokens (best-fit packing of instruction data)
UNPACKED_FILL = 0.6
WARMUP_STEPS = 2  # steps excluded from measured step times (first-step allocation, lazy init)
# Per transformer layer and pass (forward, backward, recompute): python dispatch, kernel launches, hooks. Priors
# until calibration; CPU measured on the 2-core machine of docs/estimation.md.
LAYER_OVERHEAD_S = {"gpu": 0.0015, "cpu": 0.002}
STEP_OVERHEAD_S = {"gpu": 0.02, "cpu": 0.02}
# ZeRO-3 on GPUs: each partitioned module is gathered and released by Python hooks on every pass, time the GPU
# waits for; measured 0.54-0.75 ms per module and pass on one H200 (docs/benchmarks.md, gpu_matrix). On the CPU the
# gloo gather term already holds it (calibrated in docs/estimation.md).
ZERO3_FETCH_S = 0.00065
# Liger's kernels remove memory-bound passes (norms, SwiGLU, RoPE, fp32 logits): Llama-3-8B shape LoRA, no
# checkpointing, one H200: 0.828 s/step with HF's modules, 0.62-0.72 with Liger's (docs/benchmarks.md).
LIGER_MFU_GAIN = 1.25
CALIBRATION_PATH_ENV = "FTL_ESTIMATE_CALIBRATION"


class EstimateError(ValueError):
    """An estimate cannot be made from these inputs; the message says what to change."""


# ================================================================ inputs

@dataclass
class RunSpec:
    """What the estimate is for. Field names follow the run config where one exists."""
    model: str
    mode: str = "lora"
    lora_rank: int = 16
    lora_targets: object = "all-linear"
    lora_dropout: float = 0.05
    seq_len: int = 2048
    micro_batch: int = 1
    grad_accum: int = 1
    zero: int = 2
    offload: bool = False
    gradient_checkpointing: bool = True
    packing: bool = True
    gpus_per_node: int = 1
    nodes: int = 1
    gpu: str = "H100-80GB"
    interconnect: str = None
    precision: str = "auto"
    attn_implementation: str = "sdpa"
    overlap_comm: bool = False
    examples: int = None
    tokens: int = None
    avg_tokens_per_example: float = None
    epochs: float = 1.0
    max_steps: int = None
    margin: float = DEFAULT_MARGIN
    reduce_bucket_size: int = None  # elements; None: hidden^2 as our ds_configs fill "auto"
    prefetch_bucket_size: int = None
    fill: float = None
    liger_kernel: bool = False  # Liger's RMSNorm/SwiGLU/RoPE (+ fused linear cross-entropy outside ZeRO-3)

    @property
    def world(self):
        return self.gpus_per_node * self.nodes

    def validate(self):
        problems = []
        if self.mode not in ("full", "lora", "qlora"):
            problems.append(f"mode must be full, lora or qlora (got '{self.mode}')")
        if self.zero not in (2, 3):
            problems.append(f"zero must be 2 or 3 (got {self.zero})")
        for name in ("seq_len", "micro_batch", "grad_accum", "gpus_per_node", "nodes", "lora_rank"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.mode == "qlora" and self.offload:
            problems.append("qlora does not support offload (bitsandbytes 4-bit weights stay on the GPU)")
        if problems:
            raise EstimateError("invalid estimate inputs: " + "; ".join(problems))
        return self


# ================================================================ architectures

@dataclass(frozen=True)
class Architecture:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool = False
    head_dim: int = None
    qkv_bias: bool = False
    qk_norm: bool = False
    norms_per_layer: int = 2
    final_logit_softcap: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    source: str = "table"

    @property
    def hd(self):
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def q_width(self):
        return self.num_attention_heads * self.hd

    @property
    def kv_width(self):
        return self.num_key_value_heads * self.hd

    @property
    def is_moe(self):
        return self.num_experts > 0


ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "tie_word_embeddings", "head_dim", "qkv_bias", "qk_norm", "norms_per_layer",
               "final_logit_softcap", "num_experts", "num_experts_per_tok", "moe_intermediate_size")


def _normalise_name(name):
    name = name.strip().lower().rstrip("/")
    return name.split("/")[-1]


def _table_index():
    index = {}
    for key, entry in ARCHITECTURES.items():
        index[_normalise_name(key)] = key
        for alias in entry["names"]:
            index[_normalise_name(alias)] = key
            index[alias.lower()] = key
    return index


def known_models():
    return sorted(ARCHITECTURES)


def architecture_from_table(key, source="table"):
    entry = {k: v for k, v in ARCHITECTURES[key].items() if k != "names"}
    return Architecture(name=key, source=source, **entry)


def architecture_from_config_json(config, name, source):
    """Read the sizes of a transformers config.json (a dict); multimodal configs keep them in text_config."""
    config = config.get("text_config") or config
    model_type = config.get("model_type", "")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in config]
    if missing:
        raise EstimateError(f"{source}: config.json lacks {', '.join(missing)}; the estimator supports decoder-only "
                            f"transformers (Llama, Qwen, Mistral, Gemma, ...)")
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
    return Architecture(
        name=name, source=source,
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config.get("intermediate_size") or 4 * config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
        qkv_bias=bool(config.get("attention_bias", model_type.startswith("qwen2"))),
        qk_norm=model_type.startswith("qwen3"),
        norms_per_layer=4 if model_type.startswith(("gemma2", "gemma3")) else 2,
        final_logit_softcap=bool(config.get("final_logit_softcapping")),
        num_experts=experts,
        num_experts_per_tok=int(config.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate_size=int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 0)
        if experts else 0,
    )


def _hub_cache_config(model_ref):
    """config.json of a hub id already in the local Hugging Face cache (no network)."""
    if "/" not in model_ref or os.path.isabs(model_ref):
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    snapshots = hub.expanduser() / f"models--{model_ref.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/config.json")) if snapshots.is_dir() else []
    return found[-1] if found else None


def load_architecture(model_ref):
    """The sizes of `model_ref`: builtin:NAME, random:ARCH, a local directory with config.json, a hub id in the offline table,
    or a hub id already in the local Hugging Face cache. Never loads weights, never downloads."""
    from train.models.tiny import RANDOM_PREFIX, is_builtin, is_random, resolve_model_path

    if is_random(model_ref):
        return architecture_from_table(model_ref[len(RANDOM_PREFIX):], source=f"offline table ({model_ref})")
    path = Path(resolve_model_path(model_ref)) if is_builtin(model_ref) else Path(os.path.expanduser(model_ref))
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise EstimateError(f"model directory {path} has no config.json; point --model at the directory that "
                                f"holds config.json (weights are not needed)")
        return architecture_from_config_json(json.loads(config_file.read_text()), model_ref, str(config_file))
    key = _table_index().get(model_ref.lower()) or _table_index().get(_normalise_name(model_ref))
    if key:
        return architecture_from_table(key, source=f"offline table ({key})")
    cached = _hub_cache_config(model_ref)
    if cached:
        return architecture_from_config_json(json.loads(cached.read_text()), model_ref, str(cached))
    raise EstimateError(
        f"unknown model '{model_ref}': not a local directory with a config.json, not in the offline table and not in "
        f"the local Hugging Face cache. Known models: {', '.join(known_models())} (hub ids such as "
        f"Qwen/Qwen2.5-7B-Instruct work too). For another model, pass the directory holding its config.json")


# ================================================================ devices

@dataclass
class Device:
    name: str
    memory_gib: float
    tflops: dict
    hbm_tbps: float
    intra_busbw_gbps: float
    mfu: dict
    link: str = ""
    kind: str = "gpu"  # or "cpu"

    def peak_flops(self, precision):
        value = self.tflops.get(precision)
        if value is None:
            raise EstimateError(f"{self.name} has no {precision} support; use precision fp16 (or fp32)")
        return value * 1e12


def _gpu_table():
    return json.loads(GPU_TABLE_PATH.read_text())


def known_gpus():
    return sorted(_gpu_table()["devices"]) + ["cpu"]


def known_interconnects():
    return sorted(k for k in _gpu_table()["interconnects"] if not k.startswith("_"))


def cpu_device(procs_per_node=1):
    """This machine's CPU, shared by `procs_per_node` ranks: its RAM split between them, one core each."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        ram = 16.0
    cores = os.cpu_count() or 1
    per_rank_cores = max(1, cores // max(1, procs_per_node))
    gflops = CPU_PEAK_GFLOPS_PER_CORE * per_rank_cores
    return Device(name="cpu", memory_gib=ram / max(1, procs_per_node),
                  tflops={"fp32": gflops / 1e3, "bf16": gflops / 1e3, "fp16": None},
                  hbm_tbps=CPU_MEMORY_GBPS_PER_RANK * per_rank_cores / 1e3, intra_busbw_gbps=CPU_GLOO_BUSBW_GBPS,
                  mfu={"full": CPU_MFU, "lora": CPU_MFU}, link="gloo", kind="cpu")


def resolve_device(name, procs_per_node=1):
    """A device from the table by name (case and separators ignored), or `cpu`."""
    if name.lower() == "cpu":
        return cpu_device(procs_per_node)
    devices = _gpu_table()["devices"]
    key = _device_key(name, devices)
    if key is None:
        raise EstimateError(f"unknown GPU type '{name}'. Known: {', '.join(known_gpus())} (also as CUDA names them, "
                            f"e.g. H100, A100, RTX 4090, and with the memory: RTX4090-24GB)")
    return Device(name=key, **{k: v for k, v in devices[key].items() if k != "match"})


def _device_key(name, devices):
    """The table entry `name` means: its key, a CUDA name it matches (H100, RTX 4090), or either with the memory
    size after it (RTX4090-24GB) when that size is the entry's."""
    def norm(text):
        return re.sub(r"[^a-z0-9]", "", text.lower())

    wanted = norm(name)
    exact = [key for key in devices if norm(key) == wanted]
    cuda_named = [key for key, entry in devices.items() if any(norm(c) == wanted for c in entry["match"])]
    if exact or cuda_named:
        return (exact or cuda_named)[0]
    sized = re.fullmatch(r"(.+)[-_ ](\d+) ?gb", name.strip().lower())
    if sized:
        base, gib = norm(sized.group(1)), int(sized.group(2))
        for key, entry in devices.items():
            same_size = abs(entry["memory_gib"] - gib) <= 0.1 * gib
            if same_size and any(norm(c) == base for c in [key, *entry["match"]]):
                return key
    return None


def device_from_cuda_name(cuda_name, memory_bytes=None):
    """Map torch.cuda.get_device_name() to a table entry (longest matching substring wins)."""
    devices = _gpu_table()["devices"]
    best, best_len = None, 0
    for key, entry in devices.items():
        for pattern in entry["match"]:
            if pattern.lower() in cuda_name.lower() and len(pattern) > best_len:
                best, best_len = key, len(pattern)
    if best is None:
        return None
    device = resolve_device(best)
    if memory_bytes:
        device.memory_gib = memory_bytes / GIB
    return device


def inter_node_busbw(device, interconnect):
    table = _gpu_table()["interconnects"]
    if interconnect not in table or interconnect.startswith("_"):
        raise EstimateError(f"unknown interconnect '{interconnect}'. Known: {', '.join(known_interconnects())}")
    link = table[interconnect]
    return min(device.intra_busbw_gbps, link["nic_gbps"] * link["efficiency"])


def default_interconnect(device):
    if device.name in ("H100-80GB", "H200", "B200"):
        return "ib-8x400"
    if device.name.startswith("A100"):
        return "ib-8x200"
    return "eth-100"


# ================================================================ parameters

@dataclass
class ParamCounts:
    total: int
    trainable: int
    lora: int
    embedding: int
    lm_head: int
    layer_linear: int        # per layer: nn.Linear weights (what LoRA "all-linear" and bitsandbytes touch)
    layer_experts: int       # per layer: MoE expert weights (3D parameters)
    layer_small: int         # per layer: norms and biases
    quantized: int           # NF4 weights (QLoRA)
    matmul_per_token: int    # weights multiplied per token (active experts only), lm_head included
    largest_module: int


def layer_linears(arch):
    """(name, in_features, out_features) of the nn.Linear layers of one decoder layer."""
    h, q, kv, inter = arch.hidden_size, arch.q_width, arch.kv_width, arch.intermediate_size
    linears = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h)]
    if arch.is_moe:
        return linears + [("gate", h, arch.num_experts)]  # the router
    return linears + [("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]


def quantized_linears(arch):
    """What bitsandbytes turns into NF4: every nn.Linear of a layer (an MoE router is a plain parameter)."""
    return [linear for linear in layer_linears(arch) if not (arch.is_moe and linear[0] == "gate")]


def lora_target_names(arch, targets):
    names = [n for n, _, _ in layer_linears(arch)] + (["experts"] if arch.is_moe else [])
    if targets in (None, "all-linear"):
        return names
    targets = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise EstimateError(f"LoRA target(s) {unknown} are not modules of {arch.name}; its targets are "
                            f"{', '.join(names)} (or all-linear)")
    return targets


def lora_tensor_sizes(arch, rank, targets):
    """numel of each LoRA A/B matrix of one layer (peft's shapes; MoE experts get peft's parameter LoRA)."""
    chosen = set(lora_target_names(arch, targets))
    sizes = []
    for name, fan_in, fan_out in layer_linears(arch):
        if name in chosen:
            sizes += [rank * fan_in, fan_out * rank]
    if "experts" in chosen:
        e, h, inter = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
        sizes += [2 * rank * e * h, 2 * inter * 2 * rank * e,  # gate_up_proj: peft doubles the rank
                  rank * e * inter, h * rank * e]                     # down_proj
    return sizes


def count_params(arch, spec):
    h, layers = arch.hidden_size, arch.num_hidden_layers
    embedding = arch.vocab_size * h
    lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    linear = sum(i * o for _, i, o in layer_linears(arch))
    experts = 3 * arch.num_experts * h * arch.moe_intermediate_size
    biases = (arch.q_width + 2 * arch.kv_width) if arch.qkv_bias else 0
    small = arch.norms_per_layer * h + (2 * arch.hd if arch.qk_norm else 0) + biases
    total = embedding + lm_head + layers * (linear + experts + small) + h
    lora_sizes = lora_tensor_sizes(arch, spec.lora_rank, spec.lora_targets) if spec.mode != "full" else []
    lora = layers * sum(lora_sizes)
    active_mlp = 3 * arch.num_experts_per_tok * h * arch.moe_intermediate_size
    matmul = layers * (linear + active_mlp) + arch.vocab_size * h
    quantized = layers * sum(i * o for _, i, o in quantized_linears(arch)) if spec.mode == "qlora" else 0
    largest = max([embedding, lm_head, experts // 3 * 2] + [i * o for _, i, o in layer_linears(arch)])
    return ParamCounts(total=total + lora, trainable=(total if spec.mode == "full" else lora), lora=lora,
                       embedding=embedding, lm_head=lm_head, layer_linear=linear, layer_experts=experts,
                       layer_small=small, quantized=quantized, matmul_per_token=matmul, largest_module=largest)


# ================================================================ precision

def resolve_precision(spec, device):
    if spec.precision != "auto":
        return spec.precision
    if device.kind == "cpu":
        return "fp32"
    return "bf16" if device.tflops.get("bf16") else "fp16"


def dtype_bytes(precision):
    return 4 if precision == "fp32" else 2


# ================================================================ memory: model states

def reduce_bucket(spec, arch):
    return spec.reduce_bucket_size or arch.hidden_size ** 2


def lora_dtype_bytes(spec, e):
    """peft creates adapters in fp32. DeepSpeed casts every parameter to the compute dtype unless the model was
    built inside zero.Init (ZeRO-3 LoRA): then the adapters stay fp32. A 4-bit model is not built inside zero.Init,
    so QLoRA's adapters are cast (both measured with DeepSpeed 0.19)."""
    return 4 if spec.zero == 3 and spec.mode == "lora" else e


def zero3_partitions_at_load(spec):
    return spec.zero == 3 and spec.mode != "qlora"


def quantized_bytes(counts, arch):
    """NF4 storage of the quantised weights plus their quant_state (absmax, nested absmax, the two code books)."""
    tensors = arch.num_hidden_layers * len(quantized_linears(arch))
    packed = counts.quantized * QUANT_BYTES_PER_PARAM
    state = counts.quantized * QUANT_STATE_BYTES_PER_PARAM + tensors * QUANT_STATE_BYTES_PER_TENSOR
    return packed, state


def weight_bytes(spec, arch, counts, e):
    """Parameter bytes held by one rank at the optimizer step: whole under ZeRO-2, 1/N under ZeRO-3 (small
    "persistent" parameters are partitioned too at that point: measured)."""
    lora = counts.lora * lora_dtype_bytes(spec, e)
    base = counts.total - counts.lora
    if spec.mode == "qlora":
        packed, state = quantized_bytes(counts, arch)  # quant_state tensors are not parameters: never sharded
        dense = (base - counts.quantized) * e
        return (packed + dense + lora) / (spec.world if spec.zero == 3 else 1) + state
    if spec.zero == 3:
        return 0.0 if spec.offload else (base * e + lora) / spec.world  # offload_param: partitions in CPU memory
    return base * e + lora


def gradient_bytes(spec, arch, counts, e):
    """(bytes in the backward phase, bytes during the optimizer step) on one rank. Backward: the rank's gradient
    partition in the compute dtype and the reduce bucket(s). Step: ZeRO-2 frees both and holds the fp32 copy of
    the partition; ZeRO-3 keeps them and adds the fp32 copy (both measured in DeepSpeed 0.19)."""
    partition = counts.trainable / spec.world
    buckets = reduce_bucket(spec, arch) * e * (2 if spec.overlap_comm and spec.zero == 2 else 1)
    if spec.offload:
        return buckets, 0.0  # the partition gradients go to pinned CPU buffers
    backward = partition * e + buckets
    fp32_copy = partition * 4
    return backward, fp32_copy + (backward if spec.zero == 3 else 0.0)


def optimizer_bytes(spec, counts):
    if spec.offload:
        return 0.0
    return counts.trainable / spec.world * (MASTER_BYTES + ADAM_STATE_BYTES)


# ================================================================ memory: activations

@dataclass
class ActivationShape:
    tokens: int      # micro_batch x padded sequence length
    batch: int
    seq: int
    e: int           # activation dtype bytes
    masked: bool     # a materialised attention mask (SDPA/eager with packing or padding)
    mask_bytes: int  # per element of a dropout mask: bool on GPUs, a float noise tensor on the CPU


def activation_shape(spec, precision, device_kind="gpu"):
    seq = -(-spec.seq_len // 8) * 8  # collate pads to a multiple of 8
    masked = spec.attn_implementation in ("sdpa", "eager")
    e = dtype_bytes(precision)
    return ActivationShape(tokens=spec.micro_batch * seq, batch=spec.micro_batch, seq=seq, e=e, masked=masked,
                           mask_bytes=e if device_kind == "cpu" else 1)


def saved_inputs(arch, spec):
    """Which layer inputs autograd keeps: a frozen linear keeps nothing; a LoRA adapter keeps its input (its
    dropout's output when lora_dropout > 0); a trainable linear keeps its input."""
    full = spec.mode == "full"
    targets = set() if full else set(lora_target_names(arch, spec.lora_targets))
    direct = full or spec.lora_dropout == 0
    mlp_names = {"gate_proj", "up_proj", "gate", "experts"}
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
    chosen = set(lora_target_names(arch, spec.lora_targets))
    total = 0
    for name, fan_in, _ in layer_linears(arch):
        if name not in chosen:
            continue
        total += t * spec.lora_rank * adapter_e  # lora_A output, saved by lora_B
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
    return terms


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
    return spec.liger_kernel and spec.zero != 3


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
    if spec.zero == 3:
        trainable_share = 1 if spec.mode == "full" else 0
        prefetch = spec.prefetch_bucket_size or int(0.9 * arch.hidden_size ** 2)
        largest_bytes = counts.largest_module * (QUANT_BYTES_PER_PARAM if spec.mode == "qlora" else e)
        terms["zero3_gathered_parameters"] = largest_bytes + counts.largest_module * e * trainable_share + \
            prefetch * e
    return terms


# ================================================================ time

def attention_flops_per_token(arch, spec, masked):
    """Forward QK^T and AV: 4 x span x heads x head_dim per layer; causal kernels skip half unless a mask is
    materialised (SDPA with packing/padding computes the full square)."""
    span = spec.seq_len * (1.0 if masked else 0.5)
    return 4 * span * arch.q_width * arch.num_hidden_layers


def flops_per_token(arch, spec, counts, masked):
    """Training FLOPs per (padded) token: forward 2N; backward 4N for full fine-tunes (input and weight
    gradients), 2N for LoRA (input gradients only, frozen weights); recompute adds a forward of the layers."""
    n = counts.matmul_per_token
    n_layers = n - arch.vocab_size * arch.hidden_size
    attn = attention_flops_per_token(arch, spec, masked)
    lora = counts.lora if spec.mode != "full" else 0
    forward = 2 * n + attn + 2 * lora
    backward = (4 * n if spec.mode == "full" else 2 * n) + 2 * attn + 4 * lora
    recompute = (2 * n_layers + attn + 2 * lora) if spec.gradient_checkpointing else 0
    return {"forward": forward, "backward": backward, "recompute": recompute,
            "total": forward + backward + recompute, "model_6n": 6 * counts.total}


def comm_seconds(spec, device, counts, e, interconnect):
    """Exposed ZeRO communication per optimizer step, from nccl-tests' bus-bandwidth definitions:
    reduce-scatter / all-gather of S bytes over n ranks take S x (n-1)/n / busbw."""
    w = spec.world
    if w == 1:
        return 0.0, {}
    busbw = device.intra_busbw_gbps if spec.nodes == 1 else inter_node_busbw(device, interconnect)
    factor = (w - 1) / w / (busbw * 1e9)
    grads = counts.trainable * e * factor * spec.grad_accum  # reduce-scatter after every backward
    params = counts.trainable * e * factor if spec.zero == 2 else 0.0  # all-gather of updated parameters
    gather = 0.0
    if spec.zero == 3:
        weight_bytes_total = counts.quantized * QUANT_BYTES_PER_PARAM + (counts.total - counts.quantized) * e
        passes = 3 if spec.gradient_checkpointing else 2
        gather = weight_bytes_total * factor * passes * spec.grad_accum
    return grads + params + gather, {"reduce_scatter_s": grads, "allgather_params_s": params,
                                     "zero3_gather_s": gather, "busbw_gbps": busbw}


def step_time(arch, spec, device, counts, precision, activations_per_layer, calibration, interconnect):
    """Seconds per optimizer step, by term, before and after calibration."""
    shape = activation_shape(spec, precision)
    e = shape.e
    tokens = shape.tokens * spec.grad_accum  # per rank per step (padded)
    flops = flops_per_token(arch, spec, counts, shape.masked)
    mfu = default_mfu(device, spec.mode) * (LIGER_MFU_GAIN if spec.liger_kernel else 1.0)
    peak = device.peak_flops(precision)
    bandwidth = device.hbm_tbps * 1e12
    passes = 3 if spec.gradient_checkpointing else 2
    terms = {
        "matmul_s": flops["total"] * tokens / (peak * mfu),
        "elementwise_s": 3 * activations_per_layer * arch.num_hidden_layers * spec.grad_accum *
        (passes / 2) / bandwidth,
        "dequant_s": (counts.quantized * 2.5 * passes * spec.grad_accum / bandwidth) if spec.mode == "qlora" else 0,
        "optimizer_s": counts.trainable / spec.world * OPTIMIZER_BYTES_PER_PARAM /
        (bandwidth if not spec.offload else CPU_MEMORY_GBPS_PER_RANK * 1e9),
    }
    compute_bound = terms["matmul_s"] + terms["elementwise_s"] + terms["dequant_s"] + terms["optimizer_s"]
    terms["overhead_s"] = overhead_seconds(arch, spec, device, passes, compute_bound) + \
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
    return {"terms": terms, "comm": comm_detail, "flops_per_token": flops, "mfu_assumed": mfu,
            "tokens_per_rank_step": tokens, "cold_s": cold, "calibrated_s": calibrated,
            "calibration_factor": factor, "device_bound_s": compute_bound}


def overhead_seconds(arch, spec, device, passes, compute_bound):
    """Framework time per step: python dispatch and launches per layer and pass, plus a per-step constant. On a
    CPU it adds to the compute; a GPU runs ahead of the launching thread, so only what exceeds compute shows."""
    kind = "cpu" if device.kind == "cpu" else "gpu"
    launches = LAYER_OVERHEAD_S[kind] * arch.num_hidden_layers * passes * spec.grad_accum
    if kind == "cpu":
        return STEP_OVERHEAD_S[kind] + launches
    return STEP_OVERHEAD_S[kind] + max(0.0, launches - compute_bound)


def zero3_fetch_seconds(arch, spec, device, passes):
    """Hook time of ZeRO-3's per-module gathers: the layer's linears (norms and LoRA matrices stay whole: below the
    persistence threshold), the embedding and the output head, on every pass of every micro-batch."""
    if spec.zero != 3 or device.kind == "cpu":
        return 0.0
    modules = len(layer_linears(arch)) * arch.num_hidden_layers + 2
    return ZERO3_FETCH_S * modules * passes * spec.grad_accum


def default_mfu(device, mode):
    return device.mfu["full" if mode == "full" else "lora"]


# ================================================================ calibration

def calibration_path():
    from train.models.tiny import cache_root

    return Path(os.environ.get(CALIBRATION_PATH_ENV) or cache_root() / "estimate_calibration.json")


def calibration_key(device, precision):
    return f"{device.name}/{precision}"


def load_calibration(path=None):
    path = Path(path) if path else calibration_path()
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def save_calibration(entry, path=None):
    path = Path(path) if path else calibration_path()
    data = load_calibration(path)
    data[entry["key"]] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return path


def calibration_factor(calibration, device, precision):
    """Multiplier on the device-bound terms fitted on this device and precision, or None."""
    if not calibration:
        return None
    entry = calibration.get(calibration_key(device, precision))
    return entry["factor"] if entry else None


def fit_calibration(estimate, measured_step_s, source):
    """Refit the throughput term: the factor that makes the device-bound time match the measurement, keeping
    the overhead and communication terms."""
    timing = estimate.timing
    fixed = timing["terms"]["overhead_s"] + timing["terms"]["comm_s"]
    device_bound = timing["device_bound_s"]
    factor = max(0.05, (measured_step_s - fixed) / device_bound) if device_bound > 0 else 1.0
    return {"key": calibration_key(estimate.device, estimate.precision), "factor": factor,
            "device": estimate.device.name, "precision": estimate.precision, "mode": estimate.spec.mode,
            "measured_step_time_s": measured_step_s, "cold_step_time_s": timing["cold_s"],
            "effective_tflops_per_rank": estimate.flops_per_step / max(1e-9, measured_step_s) / 1e12,
            "source": source, "spec": asdict(estimate.spec)}


def measured_step_time(records):
    """Median step time of the records after warm-up."""
    times = sorted(r["step_time_s"] for r in records
                   if r.get("step") and r["step"] > WARMUP_STEPS and isinstance(r.get("step_time_s"), (int, float)))
    if not times:
        raise EstimateError(f"no step after the first {WARMUP_STEPS} (warm-up) has a step_time_s; run more steps "
                            f"(logging_steps 1 records every one)")
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2


# ================================================================ the estimate

@dataclass
class Estimate:
    spec: RunSpec
    arch: Architecture
    device: Device
    precision: str
    counts: ParamCounts
    memory: dict       # bytes by term (see module doc)
    peak_bytes: float
    peak_phase: str
    breakdown: dict    # bytes at the peak, by weights/gradients/optimizer/activations/other
    timing: dict
    total_steps: int
    steps_note: str
    interconnect: str
    assumptions: list
    host_bytes: float = 0.0
    alternatives: list = field(default_factory=list)

    @property
    def fits(self):
        return self.peak_bytes <= self.device.memory_gib * GIB

    @property
    def step_time_s(self):
        return self.timing["calibrated_s"] or self.timing["cold_s"]

    @property
    def flops_per_step(self):
        return self.timing["flops_per_token"]["total"] * self.timing["tokens_per_rank_step"]

    @property
    def tokens_per_s(self):
        """Real (non-pad) tokens per second over all ranks."""
        return self.timing["tokens_per_rank_step"] * self.spec.world * self.fill / self.step_time_s

    @property
    def fill(self):
        if self.spec.fill:
            return self.spec.fill
        return PACKED_FILL if self.spec.packing else UNPACKED_FILL

    @property
    def total_time_h(self):
        return None if self.total_steps is None else self.total_steps * self.step_time_s / 3600

    @property
    def refusal(self):
        if self.fits:
            return None
        need, have = self.peak_bytes / GIB, self.device.memory_gib
        fix = self.alternatives[0] if self.alternatives else None
        fix_text = (f"suggested fix: {fix['change']} (predicted {fix['memory_gib']:.1f} GiB, "
                    f"{fix['step_time_s']:.2f} s/step)" if fix else
                    "no single change fits: add GPUs or nodes, or use a smaller model")
        return (f"predicted peak memory {need:.1f} GiB per {self.device.name} exceeds its {have:.1f} GiB "
                f"({self._breakdown_text()}); {fix_text}; pass --force to launch anyway")

    def _breakdown_text(self):
        return ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.breakdown.items())

    def to_json(self):
        gib = {k: round(v / GIB, 3) for k, v in self.breakdown.items()}
        return {
            "model": self.spec.model, "architecture": self.arch.name, "architecture_source": self.arch.source,
            "mode": self.spec.mode, "device": self.device.name, "precision": self.precision,
            "world_size": self.spec.world, "gpus_per_node": self.spec.gpus_per_node, "nodes": self.spec.nodes,
            "params_total": self.counts.total, "params_trainable": self.counts.trainable,
            "params_lora": self.counts.lora, "params_quantized_nf4": self.counts.quantized,
            "memory_per_gpu_gib": {"total": round(self.peak_bytes / GIB, 3), **gib},
            "memory_peak_phase": self.peak_phase,
            "memory_terms_gib": {k: round(v / GIB, 4) for k, v in self.memory.items()},
            "device_memory_gib": round(self.device.memory_gib, 2),
            "host_memory_per_node_gib": round(self.host_bytes / GIB, 3),
            "fits": self.fits, "refusal": self.refusal,
            "step_time_s": round(self.step_time_s, 4),
            "step_time_cold_s": round(self.timing["cold_s"], 4),
            "step_time_calibrated_s": None if self.timing["calibrated_s"] is None
            else round(self.timing["calibrated_s"], 4),
            "calibration_factor": self.timing["calibration_factor"],
            "step_time_terms_s": {k: round(v, 5) for k, v in self.timing["terms"].items()},
            "communication": self.timing["comm"],
            "flops_per_token": self.timing["flops_per_token"],
            "tokens_per_s": round(self.tokens_per_s, 2),
            "tokens_per_step": int(self.timing["tokens_per_rank_step"] * self.spec.world * self.fill),
            "total_steps": self.total_steps, "total_steps_note": self.steps_note,
            "total_time_h": None if self.total_time_h is None else round(self.total_time_h, 4),
            "interconnect": self.interconnect if self.spec.nodes > 1 else None,
            "alternatives": self.alternatives,
            "assumptions": self.assumptions,
            "inputs": asdict(self.spec),
        }


def estimate(spec, calibration=None, device=None, with_alternatives=True):
    """The full estimate for `spec`. `calibration`: a dict as load_calibration() returns (None: cold)."""
    spec.validate()
    arch = load_architecture(spec.model)
    device = device or resolve_device(spec.gpu, spec.gpus_per_node)
    precision = resolve_precision(spec, device)
    device.peak_flops(precision)  # refuses fp16/bf16 where the device has none
    interconnect = spec.interconnect or default_interconnect(device)
    counts = count_params(arch, spec)
    e = dtype_bytes(precision)
    memory, one_layer = memory_terms(arch, spec, device, counts, precision)
    peak, phase, breakdown = peak_memory(memory, device, spec.margin)
    timing = step_time(arch, spec, device, counts, precision, one_layer, calibration, interconnect)
    total_steps, steps_note = total_optimizer_steps(spec)
    result = Estimate(spec=spec, arch=arch, device=device, precision=precision, counts=counts, memory=memory,
                      peak_bytes=peak, peak_phase=phase, breakdown=breakdown, timing=timing,
                      total_steps=total_steps, steps_note=steps_note, interconnect=interconnect,
                      assumptions=[], host_bytes=host_bytes_per_node(spec, arch, counts, e))
    result.assumptions = assumptions_for(result)
    if with_alternatives:
        result.alternatives = rank_alternatives(result, calibration, device)
    return result


def memory_terms(arch, spec, device, counts, precision):
    e = dtype_bytes(precision)
    grads, grads_at_step = gradient_bytes(spec, arch, counts, e)
    saved, one_layer = activation_terms(arch, spec, precision, device.kind)
    memory = {"weights": weight_bytes(spec, arch, counts, e), "gradients": grads,
              "gradients_at_step": grads_at_step, "optimizer": optimizer_bytes(spec, counts),
              "activations": sum(saved.values())}
    memory.update({f"activations.{k}": v for k, v in saved.items()})
    for key, value in transient_terms(arch, spec, counts, precision, one_layer).items():
        memory[f"transient.{key}"] = value
    memory["runtime"] = (CPU_RUNTIME_GIB if device.kind == "cpu" else GPU_RUNTIME_GIB) * GIB
    return memory, one_layer


def host_bytes_per_node(spec, arch, counts, e):
    """Host (CPU) memory per node beyond the processes themselves: offloaded states, and for QLoRA under ZeRO-3
    the whole model each rank loads (not built inside zero.Init) before DeepSpeed partitions it."""
    per_rank = 0.0
    if spec.offload:
        per_rank += counts.trainable / spec.world * (MASTER_BYTES + ADAM_STATE_BYTES + 4)
        if spec.zero == 3:
            per_rank += counts.total * e / spec.world
    if spec.zero == 3 and not zero3_partitions_at_load(spec):
        per_rank += weight_bytes(replace(spec, zero=2), arch, counts, e)
    return per_rank * spec.gpus_per_node


def peak_memory(memory, device, margin):
    """(peak bytes, phase, breakdown at the peak). The backward phase holds the activations, the transients and
    the gradient buffers; the optimizer step holds the step's gradient bytes (with the fp32 copy) instead."""
    transients = sum(v for k, v in memory.items() if k.startswith("transient."))
    backward = memory["weights"] + memory["optimizer"] + memory["gradients"] + memory["activations"] + transients
    step = memory["weights"] + memory["optimizer"] + memory["gradients_at_step"]
    phase = "backward" if backward >= step else "optimizer step"
    held = max(backward, step) + memory["runtime"]
    peak = held * (1 + margin)
    in_backward = phase == "backward"
    breakdown = {"weights": memory["weights"],
                 "gradients": memory["gradients"] if in_backward else memory["gradients_at_step"],
                 "optimizer": memory["optimizer"],
                 "activations": memory["activations"] if in_backward else 0.0,
                 "other": (transients if in_backward else 0.0) + memory["runtime"] + held * margin}
    return peak, phase, breakdown


def total_optimizer_steps(spec):
    """Steps of the run, as the trainer counts them: rows // world // (micro x accum) per epoch."""
    if spec.max_steps:
        return spec.max_steps, "max_steps"
    fill = spec.fill or (PACKED_FILL if spec.packing else UNPACKED_FILL)
    if spec.tokens:
        rows = math.ceil(spec.tokens / (spec.seq_len * fill)) if spec.packing else None
        if rows is None and spec.avg_tokens_per_example:
            rows = math.ceil(spec.tokens / spec.avg_tokens_per_example)
        if rows is None:
            return None, "tokens given without packing: give --examples too"
        note = f"{spec.tokens} tokens packed into rows of {spec.seq_len} at {fill:.0%} fill"
    elif spec.examples:
        if spec.packing and spec.avg_tokens_per_example:
            per = min(spec.avg_tokens_per_example, spec.seq_len)
            rows = math.ceil(spec.examples * per / (spec.seq_len * fill))
            note = f"{spec.examples} examples x {per:.0f} tokens packed at {fill:.0%} fill"
        else:
            rows = spec.examples
            note = f"{spec.examples} examples, one row each" + \
                   (" (give --avg-tokens-per-example for packing)" if spec.packing else "")
    else:
        return None, "no dataset size given (--examples or --tokens)"
    per_epoch = rows // spec.world // (spec.micro_batch * spec.grad_accum)
    if per_epoch == 0:
        return 1, note + "; fewer rows than one step needs"
    return max(1, math.ceil(spec.epochs * per_epoch)), note + f", {per_epoch} steps per epoch x {spec.epochs:g} epochs"


def assumptions_for(result):
    spec, arch, device = result.spec, result.arch, result.device
    t = result.timing
    notes = [
        f"architecture from {arch.source}",
        f"precision {result.precision} ({dtype_bytes(result.precision)} bytes); AdamW with fp32 master weights "
        f"and moments (12 bytes per trainable parameter, /{spec.world} ranks)",
        f"rows of {spec.seq_len} tokens (padded width); {result.fill:.0%} of them real tokens "
        f"({'packed' if spec.packing else 'unpacked'})",
        f"attention {spec.attn_implementation}"
        + (" with a materialised mask (packing/padding): full s^2 attention FLOPs, K/V repeated for GQA"
           if spec.attn_implementation in ("sdpa", "eager") else " (no mask, causal)"),
        f"ZeRO-{spec.zero}{' + CPU offload' if spec.offload else ''}: reduce bucket "
        f"{reduce_bucket(spec, arch):,} elements (hidden^2, as ds_configs fill 'auto')",
        f"margin {spec.margin:.0%} on top of everything (allocator fragmentation); runtime "
        f"{result.memory['runtime'] / GIB:.1f} GiB per rank",
        f"peak phase: {result.peak_phase} (activations are freed before the optimizer step's fp32 gradient copy)",
        f"{device.name}: {device.memory_gib:.1f} GiB, {device.peak_flops(result.precision) / 1e12:g} TFLOP/s "
        f"{result.precision} peak, MFU {t['mfu_assumed']:.0%} until calibrated, {device.hbm_tbps:g} TB/s memory",
        f"FLOPs per token {t['flops_per_token']['total'] / 1e9:.3g} G "
        f"({'6N' if spec.mode == 'full' else '4N'}{' + 2N recompute' if spec.gradient_checkpointing else ''}"
        f" + attention)",
        "communication not overlapped with compute" if not spec.overlap_comm else
        "communication overlapped with compute (only the excess counts)",
    ]
    if spec.world > 1:
        notes.append(f"bus bandwidth {t['comm'].get('busbw_gbps', 0):g} GB/s "
                     f"({device.link if spec.nodes == 1 else result.interconnect})")
    if spec.mode == "qlora":
        notes.append("QLoRA: nn.Linear layers in NF4 with double quantisation (0.516 bytes/param), embeddings, "
                     "norms and lm_head in the compute dtype; de-quantised on every forward, backward and "
                     "recompute at 2.5 bytes/param of memory traffic")
    if arch.is_moe:
        notes.append(f"MoE: {arch.num_experts} experts, {arch.num_experts_per_tok} active per token: active "
                     f"parameters for FLOPs, all parameters for memory and ZeRO-3 traffic; expert weights are 3D "
                     f"parameters (not nn.Linear), so QLoRA leaves them in 16-bit")
    if t["calibration_factor"]:
        notes.append(f"calibrated: device-bound terms x {t['calibration_factor']:.3f} from a measurement on this "
                     f"device ({calibration_path()})")
    return notes


# ================================================================ alternatives

def candidate_changes(spec):
    changes = []
    if spec.zero == 2:
        changes.append(("ZeRO-3", dict(zero=3)))
    if not spec.gradient_checkpointing:
        changes.append(("gradient checkpointing", dict(gradient_checkpointing=True)))
    else:
        changes.append(("no gradient checkpointing", dict(gradient_checkpointing=False)))
    if spec.micro_batch > 1:
        changes.append((f"micro-batch {spec.micro_batch // 2} x accumulation {spec.grad_accum * 2}",
                        dict(micro_batch=spec.micro_batch // 2, grad_accum=spec.grad_accum * 2)))
    if not spec.offload and spec.mode != "qlora":
        changes.append(("CPU offload", dict(offload=True)))
        if spec.zero == 2:
            changes.append(("ZeRO-3 + CPU offload", dict(zero=3, offload=True)))
    if spec.mode == "full":
        changes.append(("LoRA instead of a full fine-tune", dict(mode="lora")))
    if spec.mode in ("full", "lora"):
        changes.append(("QLoRA", dict(mode="qlora", offload=False)))
    if spec.zero == 2 and not spec.gradient_checkpointing:
        changes.append(("ZeRO-3 + gradient checkpointing", dict(zero=3, gradient_checkpointing=True)))
    return changes


def rank_alternatives(result, calibration, device):
    """Single changes that fit, fastest first (the same global batch: micro-batch halves, accumulation doubles).
    Listed when the run does not fit, or when one is faster than the run as configured."""
    options = []
    for label, change in candidate_changes(result.spec):
        try:
            other = estimate(replace(result.spec, **change), calibration, device=device, with_alternatives=False)
        except EstimateError:
            continue
        if not other.fits:
            continue
        if result.fits and other.step_time_s >= result.step_time_s * 0.95:
            continue
        options.append({"change": label, "memory_gib": round(other.peak_bytes / GIB, 2),
                        "step_time_s": round(other.step_time_s, 4),
                        "total_time_h": None if other.total_time_h is None else round(other.total_time_h, 3)})
    return sorted(options, key=lambda o: o["step_time_s"])


# ================================================================ from a run config

def spec_from_config(config, nproc, nnodes, gpu=None):
    """A RunSpec for a validated run config (train.config.load_config) and the launcher's process counts."""
    if config["gradient_checkpointing"] == "auto":
        config = dict(config, gradient_checkpointing=resolve_gradient_checkpointing(config, nproc, nnodes, gpu)[0])
    spec = RunSpec(
        model=config["model"], mode=config["mode"], lora_rank=config["lora_r"],
        lora_targets=config["lora_target_modules"], lora_dropout=config["lora_dropout"],
        seq_len=config["max_length"], micro_batch=config["micro_batch_size"],
        grad_accum=config["gradient_accumulation_steps"], zero=config["zero_stage"], offload=config["offload"],
        gradient_checkpointing=config["gradient_checkpointing"], packing=config["packing"],
        gpus_per_node=nproc, nodes=nnodes, gpu=gpu or "cpu", precision=config["precision"],
        attn_implementation=config["attn_implementation"], overlap_comm=config["overlap_comm"],
        liger_kernel=liger_expected(config, gpu),
        epochs=config["num_epochs"], max_steps=config["max_steps"])
    spec = _with_dataset_size(spec, config)
    return _with_ds_file_settings(spec, config)


def liger_expected(config, gpu):
    """Whether the trainer will apply Liger's kernels: `auto` does on GPUs (liger-kernel is in the [gpu] extra)."""
    setting = config.get("liger_kernel", "auto")
    if setting == "auto":
        return bool(gpu) and gpu != "cpu"
    return bool(setting)


def resolve_gradient_checkpointing(config, nproc, nnodes, gpu=None):
    """(on?, why) for `gradient_checkpointing: auto`: off when the run is predicted to fit without it (a third less
    compute per step), on otherwise or when no estimate can be made."""
    setting = config["gradient_checkpointing"]
    if setting != "auto":
        return setting, "set in the run config"
    try:
        device = resolve_device(gpu, nproc) if gpu else detect_device(nproc)
        spec = spec_from_config(dict(config, gradient_checkpointing=False), nproc, nnodes, gpu=device.name)
        result = estimate(spec, calibration={}, device=device, with_alternatives=False)
    except EstimateError as error:
        return True, f"auto: on (no memory estimate: {error})"
    need, have = result.peak_bytes / GIB, device.memory_gib
    if result.fits:
        return False, f"auto: off (predicted {need:.1f} GiB of {have:.1f} GiB per {device.name} without it)"
    return True, f"auto: on (without it {need:.1f} GiB > {have:.1f} GiB per {device.name})"


EXACT_COUNT_BYTES = 256 * 1024 ** 2  # count lines of files up to this size; extrapolate beyond (stays fast)


def _with_dataset_size(spec, config):
    """Count the examples of a local JSONL and estimate their tokens from the first 200; hub datasets stay
    unknown (give --examples)."""
    path = Path(config["dataset"])
    if not path.is_file() or path.suffix not in (".jsonl", ".json"):
        return spec
    head = _first_lines(path, 200)
    if not head:
        return spec
    examples = _count_lines(path)
    if config["max_examples"]:
        examples = min(examples, config["max_examples"])
    examples = int(examples * (1 - config["eval_fraction"])) if not config["eval_dataset"] else examples
    try:
        sample = [_example_text(json.loads(line)) for line in head]
    except (json.JSONDecodeError, AttributeError):
        return replace(spec, examples=examples)
    return replace(spec, examples=examples, avg_tokens_per_example=_average_tokens(sample, config))


def _first_lines(path, n):
    lines = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line)
            if len(lines) >= n:
                break
    return lines


def _count_lines(path):
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= EXACT_COUNT_BYTES:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + \
                (0 if size == 0 else 1) - _ends_with_newline(path)
        head = f.read(4 << 20)
    return int(size / max(1, len(head)) * head.count(b"\n"))


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return 1 if f.read(1) == b"\n" else 0


def _example_text(record):
    """The text an example trains on: its string fields with the instruction template around them."""
    from train.data.prompts import render_instruction_prompt

    if isinstance(record.get("messages"), list):
        return "\n".join(f"<|{m.get('role')}|>\n{m.get('content')}" for m in record["messages"])
    if "instruction" in record:
        answer = record.get("response") or record.get("output") or ""
        return render_instruction_prompt(record["instruction"], record.get("context") or record.get("input") or "") \
            + str(answer)
    return " ".join(str(v) for v in record.values() if isinstance(v, str))


def _average_tokens(texts, config):
    """With the model's own tokenizer.json when it is local (the builtin models have one), else 4 characters per
    token; plus one EOS."""
    from train.models.tiny import is_builtin, resolve_model_path

    ref = config["tokenizer"] or config["model"]
    tokenizer_file = (Path(resolve_model_path(ref)) if is_builtin(ref) else Path(ref)) / "tokenizer.json"
    count = None
    if tokenizer_file.is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_file))
            count = sum(len(tokenizer.encode(text, add_special_tokens=False).ids) for text in texts)
        except Exception:  # a tokenizer we cannot read: the generic ratio
            count = None
    if count is None:
        count = sum(len(text) for text in texts) / 4.0
    return count / max(1, len(texts)) + 1


def _with_ds_file_settings(spec, config):
    """Bucket sizes from a user's DeepSpeed file when they are concrete numbers (ours say "auto")."""
    if not config.get("deepspeed_config"):
        return spec
    try:
        zero = json.loads(Path(config["deepspeed_config"]).read_text()).get("zero_optimization", {})
    except (OSError, json.JSONDecodeError):
        return spec
    numbers = {k: int(v) for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return replace(spec, reduce_bucket_size=numbers.get("reduce_bucket_size"),
                   prefetch_bucket_size=numbers.get("stage3_prefetch_bucket_size"),
                   overlap_comm=bool(zero.get("overlap_comm", spec.overlap_comm)) if
                   zero.get("overlap_comm") != "auto" else spec.overlap_comm)


def _nvidia_smi_device():
    """The first GPU from nvidia-smi (fast, no torch import), or None."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, _, mib = out[0].rpartition(",")
    device = device_from_cuda_name(name.strip(), float(mib) * 1024 ** 2 if mib.strip().isdigit() else None)
    if device is None:
        raise EstimateError(f"GPU '{name.strip()}' is not in train/gpu_table.json; pass --gpu "
                            f"(known: {', '.join(known_gpus())})")
    return device


def detect_device(nproc):
    """The table entry for this machine's GPU, or the CPU when there is none (no torch import when possible)."""
    if not any(Path("/dev").glob("nvidia[0-9]*")):
        return cpu_device(nproc)
    device = _nvidia_smi_device()
    if device is not None:
        return device
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            device = device_from_cuda_name(name, torch.cuda.get_device_properties(0).total_memory)
            if device is None:
                raise EstimateError(f"GPU '{name}' is not in train/gpu_table.json; known: {', '.join(known_gpus())}")
            return device
    except ImportError:
        pass
    return cpu_device(nproc)


def estimate_from_config(config, nproc, nnodes, announce=False, gpu=None, calibration=None):
    """The launcher's pre-flight: an estimate for this run on this machine's device (or `gpu`), printed when
    `announce`. Returns the Estimate (.fits, .refusal) or None when no estimate can be made (said why)."""
    from train.console import ascii_safe

    try:
        device = resolve_device(gpu, nproc) if gpu else detect_device(nproc)
        spec = spec_from_config(config, nproc, nnodes, gpu=device.name)
        result = estimate(spec, calibration if calibration is not None else load_calibration(), device=device)
    except EstimateError as error:
        if announce:
            print(ascii_safe(f"pre-flight: no estimate ({error})"), flush=True)
        return None
    if announce:
        print(ascii_safe(preflight_text(result)), flush=True)
    return result


def preflight_text(result):
    mem = result.peak_bytes / GIB
    total = f", {format_hours(result.total_time_h)} for {result.total_steps} steps" if result.total_steps else ""
    verdict = "fits" if result.fits else "DOES NOT FIT"
    calibrated = "calibrated" if result.timing["calibration_factor"] else "cold estimate"
    lines = [f"pre-flight estimate ({result.device.name} x {result.spec.world}, {result.precision}): "
             f"{mem:.2f} GiB of {result.device.memory_gib:.1f} GiB per rank ({verdict}; "
             f"{result._breakdown_text().replace(', ', ' + ')} GiB); "
             f"{result.step_time_s:.2f} s/step, {result.tokens_per_s:,.0f} tokens/s{total} ({calibrated})"]
    if result.alternatives and result.fits:
        best = result.alternatives[0]
        lines.append(f"pre-flight: faster option that fits: {best['change']} ({best['step_time_s']:.2f} s/step)")
    return "\n".join(lines)


def format_hours(hours):
    if hours is None:
        return "?"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days"


# ================================================================ text table

def render_table(result):
    s, c = result.spec, result.counts
    rows = [
        ("model", f"{s.model} ({result.arch.source})"),
        ("mode", f"{s.mode}{f' r={s.lora_rank}' if s.mode != 'full' else ''}, ZeRO-{s.zero}"
                 f"{' + offload' if s.offload else ''}, checkpointing {'on' if s.gradient_checkpointing else 'off'}"),
        ("ranks", f"{s.gpus_per_node} per node x {s.nodes} node(s) of {result.device.name}"),
        ("batch", f"micro {s.micro_batch} x seq {s.seq_len} x accum {s.grad_accum} x {s.world} ranks"),
        ("parameters", f"{c.total / 1e9:.3f} B total, {c.trainable / 1e6:.2f} M trainable"
                       f"{f', {c.quantized / 1e9:.3f} B in NF4' if c.quantized else ''}"),
    ]
    lines = [f"{k:<12} {v}" for k, v in rows]
    lines += ["", f"memory per rank (GiB)       peak phase: {result.peak_phase}"]
    for key, value in result.memory.items():
        indent = "    " if key.startswith("activations.") else "  "
        label = MEMORY_LABELS.get(key, key.replace("transient.", "transient (other): "))
        lines.append(f"{indent}{label:<38} {value / GIB:10.3f}")
    margin = (result.breakdown["other"] - _other_without_margin(result)) / GIB
    lines.append(f"  {'margin (%d%%)' % round(100 * result.spec.margin):<38} {margin:10.3f}")
    lines.append(f"  {'PEAK':<38} {result.peak_bytes / GIB:10.3f}  of {result.device.memory_gib:.1f}"
                 f"  -> {'fits' if result.fits else 'DOES NOT FIT'}")
    if result.host_bytes:
        lines.append(f"  {'host memory per node (offload, loading)':<38} {result.host_bytes / GIB:10.3f}")
    t = result.timing
    lines += ["", "time per optimizer step (s)"]
    for key, value in t["terms"].items():
        lines.append(f"  {key:<38} {value:10.4f}")
    lines.append(f"  {'step (cold)':<38} {t['cold_s']:10.4f}")
    if t["calibrated_s"] is not None:
        lines.append(f"  {'step (calibrated, x%.3f)' % t['calibration_factor']:<38} {t['calibrated_s']:10.4f}")
    lines.append(f"  {'tokens/s (all ranks, real tokens)':<38} {result.tokens_per_s:10.1f}")
    lines.append(f"  {'total steps':<38} {str(result.total_steps):>10}  ({result.steps_note})")
    lines.append(f"  {'total time':<38} {format_hours(result.total_time_h):>10}")
    if result.alternatives:
        lines += ["", "alternatives that fit" + (" and are faster" if result.fits else "") + ", fastest first"]
        for alt in result.alternatives:
            lines.append(f"  {alt['change']:<38} {alt['memory_gib']:7.2f} GiB {alt['step_time_s']:9.3f} s/step")
    if not result.fits:
        lines += ["", "REFUSED: " + result.refusal]
    lines += ["", "assumptions"] + [f"  - {a}" for a in result.assumptions]
    return "\n".join(lines)


MEMORY_LABELS = {"gradients": "gradients (backward)", "gradients_at_step": "gradients (optimizer step)",
                 "activations": "activations (saved for backward)"}


def _other_without_margin(result):
    transients = sum(v for k, v in result.memory.items() if k.startswith("transient."))
    return (transients if result.peak_phase == "backward" else 0.0) + result.memory["runtime"]


# ================================================================ calibration runs

def measurement_overrides(steps, out_dir, run_name="estimate-measure"):
    """Run-config overrides for a short measuring run: every step logged, no eval, no checkpoints."""
    return ["--max_steps", str(steps + WARMUP_STEPS), "--logging_steps", "1", "--eval_fraction", "0",
            "--lr_scheduler", "constant", "--warmup_steps", "0", "--warmup_ratio", "0", "--save_steps", "1000000",
            "--eval_steps", "1000000", "--report_to", "[]", "--output_dir", str(out_dir), "--run_name", run_name,
            "--resume", "never"]


def run_measurement(config_path, mode, steps, nproc, overrides=(), out_dir=None, timeout=None):
    """Train `steps` (+ warm-up) real steps of the run through the launcher and the trainer; return the run's
    training_history.json as a dict. Raises EstimateError with the trainer's output tail when it fails."""
    import subprocess
    import sys
    import tempfile

    from train.resources import PACKAGE_DIR

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="ftl-measure-"))
    config_path = _config_with_mode(config_path, mode, out_dir)
    cmd = [sys.executable, "-m", "train.launch", "--mode", mode, str(config_path), "--no-preflight",
           "--nproc-per-node", str(nproc), *map(str, overrides), *measurement_overrides(steps, out_dir)]
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_DIR.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=PACKAGE_DIR.parent, env=env, capture_output=True, text=True, timeout=timeout)
    history_file = out_dir / "estimate-measure" / "training_history.json"
    if proc.returncode != 0 or not history_file.exists():
        tail = (proc.stdout[-1500:] + proc.stderr[-2500:]).strip()
        raise EstimateError(f"the measuring run failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(history_file.read_text())


def _config_with_mode(config_path, mode, out_dir):
    """The launcher insists that a config's mode matches the launcher's: write a copy when measuring another mode."""
    import yaml

    data = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    if data.get("mode") == mode:
        return config_path
    data["mode"] = mode
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / f"{Path(config_path).stem}-{mode}.yaml"
    copy.write_text(yaml.safe_dump(data))
    return copy


def spec_from_history(history, gpu=None):
    """(RunSpec, Device) of a run from its training_history.json metadata."""
    meta = history.get("metadata") or {}
    if "config" not in meta:
        raise EstimateError("this training_history.json has no metadata.config; it was not written by this trainer")
    config = dict(meta["config"])
    world = int(meta.get("world_size", 1))
    nnodes = int((meta.get("estimate") or {}).get("nnodes", 1))
    device_name = str(meta.get("device", "cpu"))
    if gpu:
        device = resolve_device(gpu, world // nnodes)
    elif device_name.startswith("cpu"):
        device = cpu_device(world // nnodes)
    else:
        device = device_from_cuda_name(device_name)
        if device is None:
            raise EstimateError(f"the run's device '{device_name}' is not in train/gpu_table.json; pass --gpu "
                                f"(known: {', '.join(known_gpus())})")
    config.setdefault("precision", meta.get("precision", "auto"))
    if meta.get("precision"):
        config["precision"] = meta["precision"]
    spec = spec_from_config(config, world // nnodes, nnodes, gpu=device.name)
    if meta.get("total_steps"):
        spec = replace(spec, max_steps=int(meta["total_steps"]))
    return spec, device


def calibrate_from_history(history, gpu=None, path=None, save=True):
    """(cold estimate, calibration entry, calibrated estimate) from a finished or running job's history."""
    spec, device = spec_from_history(history, gpu)
    cold = estimate(spec, calibration={}, device=device, with_alternatives=False)
    measured = measured_step_time(history.get("records", []))
    entry = fit_calibration(cold, measured, source=str(history.get("metadata", {}).get("run_name", "history")))
    if save:
        save_calibration(entry, path)
    calibrated = estimate(spec, calibration={entry["key"]: entry}, device=device)
    return cold, entry, calibrated


# ================================================================ the trainer's log line

class EstimateLog:
    """Logs the estimate when training starts and the measured step time after warm-up (once), and records both
    in the history metadata. Rank 0 only. Never raises: an estimate problem must not stop a run."""

    def __init__(self, config, world, history=None, measured_steps=3):
        self.history, self.measured_steps, self.seen, self.times, self.result = history, measured_steps, 0, [], None
        if int(os.environ.get("RANK", "0")) != 0:
            return
        try:
            nnodes = max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            self.result = estimate_from_config(config, world // nnodes, nnodes)
        except Exception as error:  # noqa: BLE001 - logging only
            self._say(f"estimate: unavailable ({type(error).__name__}: {error})")
            return
        if self.result is None:
            return
        self._say(f"estimate: {self.result.peak_bytes / GIB:.2f} GiB peak per rank, "
                  f"{self.result.step_time_s:.3f} s/step "
                  f"({'calibrated' if self.result.timing['calibration_factor'] else 'cold'}, "
                  f"{self.result.device.name})")
        self._record({"nnodes": nnodes, "predicted_step_time_s": self.result.step_time_s,
                      "predicted_peak_gib": self.result.peak_bytes / GIB,
                      "cold_step_time_s": self.result.timing["cold_s"]})

    def observe(self, step, record):
        """Call after every optimizer step; the first WARMUP_STEPS after a (re)start are not measured."""
        if self.result is None or self.times is None:
            return
        self.seen += 1
        if self.seen <= WARMUP_STEPS:
            return
        self.times.append(record["step_time_s"])
        if len(self.times) < self.measured_steps:
            return
        measured = sorted(self.times)[len(self.times) // 2]
        predicted = self.result.step_time_s
        self._say(f"estimate vs measured after warm-up: {measured:.3f} s/step measured, {predicted:.3f} predicted "
                  f"({(predicted / measured - 1) * 100:+.0f}%)")
        self._record({"measured_step_time_s": measured, "measured_at_step": step})
        self.times = None

    def _record(self, values):
        if self.history is None:
            return
        metadata = self.history.data.setdefault("metadata", {})
        metadata.setdefault("estimate", {}).update(values)

    @staticmethod
    def _say(text):
        from train.console import say

        say(text)


def log_estimate_vs_measured(config, world, history=None):
    """The trainer's hook: returns an object whose .observe(step, record) is called after each step."""
    return EstimateLog(config, world, history)
