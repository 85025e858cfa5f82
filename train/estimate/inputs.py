"""What an estimate is for (RunSpec), the estimator's error class and the constants shared by its parts."""
from dataclasses import dataclass

GIB = 1024 ** 3
DEFAULT_MARGIN = 0.10
PACKED_FILL = 0.95  # fraction of a packed row holding real tokens (best-fit packing of instruction data)
UNPACKED_FILL = 0.6
WARMUP_STEPS = 2  # steps excluded from measured step times (first-step allocation, lazy init)
RECIPES = ("causal_lm", "vision_language", "diffusion")


class EstimateError(ValueError):
    """An estimate cannot be made from these inputs; the message says what to change."""


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
    max_live_parameters: int = None  # ZeRO-3's stage3_max_live_parameters; None: 1e9
    zero3_gather: str = "layer"  # ZeRO-3 gathers a decoder layer at once, or module by module
    fill: float = None
    liger_kernel: bool = False  # Liger's RMSNorm/SwiGLU/RoPE (+ fused linear cross-entropy outside ZeRO-3)
    compile_layers: bool = None  # regional torch.compile of the decoder layers; None: as `auto` (on for GPUs)
    text_blocks: bool = False   # rows cut from plain text (dataset_format text): full rows, no attention mask
    recipe: str = "causal_lm"   # causal_lm | vision_language | diffusion (the run config's recipe)
    # vision-language: the pictures of a row and the processor's pixel bounds (None: the model's own)
    image_size: tuple = None    # (width, height); None: a square of max_pixels, cut to what a row holds
    images_per_row: float = 1.0
    min_pixels: int = None
    max_pixels: int = None
    train_merger: bool = False
    lora_vision: bool = False
    # diffusion: square pictures of `resolution`, the VAE's latents cached, LoRA on the text encoder too
    resolution: int = 512
    cache_latents: bool = False
    text_encoder_lora: bool = False

    @property
    def world(self):
        return self.gpus_per_node * self.nodes

    @property
    def row_fill(self):
        """Fraction of each (padded) row that holds real tokens."""
        if self.recipe == "diffusion":
            return 1.0  # a "row" is one picture
        if self.fill:
            return self.fill
        return PACKED_FILL if self.packing else UNPACKED_FILL

    def validate(self):
        problems = []
        if self.mode not in ("full", "lora", "qlora"):
            problems.append(f"mode must be full, lora or qlora (got '{self.mode}')")
        if self.zero not in (2, 3):
            problems.append(f"zero must be 2 or 3 (got {self.zero})")
        for name in ("seq_len", "micro_batch", "grad_accum", "gpus_per_node", "nodes", "lora_rank"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.recipe not in RECIPES:
            problems.append(f"recipe must be one of {', '.join(RECIPES)} (got '{self.recipe}')")
        if self.recipe == "diffusion" and int(self.resolution) < 8:
            problems.append(f"resolution must be at least 8 (got {self.resolution})")
        if self.images_per_row < 0:
            problems.append(f"images_per_row must be 0 or more (got {self.images_per_row})")
        if self.mode == "qlora" and self.offload:
            problems.append("qlora does not support offload (bitsandbytes 4-bit weights stay on the GPU)")
        if problems:
            raise EstimateError("invalid estimate inputs: " + "; ".join(problems))
        return self
