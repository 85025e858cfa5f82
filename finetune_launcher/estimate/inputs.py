"""What an estimate is for (RunSpec), the estimator's error class and the constants shared by its parts."""
from dataclasses import dataclass

from finetune_launcher import recipe_table

GIB = 1024 ** 3
DEFAULT_MARGIN = 0.10
PACKED_FILL = 0.95  # fraction of a packed row holding real tokens (best-fit packing of instruction data)
UNPACKED_FILL = 0.6
WARMUP_STEPS = 2  # steps excluded from measured step times (first-step allocation, lazy init)
PRECISIONS = ("bf16", "fp16", "fp32")
ENGINES = ("deepspeed", "ddp", "fsdp2")


class EstimateError(ValueError):
    """An estimate cannot be made from these inputs; the message says what to change."""


@dataclass
class RunSpec:
    """What the estimate is for. A run-config key keeps its name and its resolved value (precision, recipe,
    gradient_checkpointing and liger_kernel as the config resolution decided them: the estimator decides none of
    them); the rest is what only an estimate needs: the machine, the dataset's size, the margin."""
    model: str
    recipe: str = recipe_table.DEFAULT
    mode: str = "lora"
    lora_r: int = 16
    lora_target_modules: object = "all-linear"
    lora_dropout: float = 0.05
    max_length: int = 2048
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    zero_stage: int = 2
    offload: bool = False
    gradient_checkpointing: bool = True
    packing: bool = True
    precision: str = "bf16"
    attn_implementation: str = "sdpa"
    overlap_comm: bool = False
    liger_kernel: bool = False  # Liger's RMSNorm/SwiGLU/RoPE (+ fused linear cross-entropy outside ZeRO-3)
    compile_layers: bool = False  # regional torch.compile of the decoder layers (as resolved)
    engine: str = "deepspeed"   # deepspeed | ddp (replicated, as ZeRO-2) | fsdp2 (sharded units, fp32 masters)
    zero3_gather: str = "layer"  # ZeRO-3 gathers a decoder layer at once, or module by module
    moe_lora_kernel: str = "grouped"  # a mixture of experts' LoRA: peft keeps a full-size expert weight per layer
    num_epochs: float = 1.0
    max_steps: int = None
    # vision-language: the processor's pixel bounds (None: the model's own), what of the vision tower trains
    min_pixels: int = None
    max_pixels: int = None
    train_merger: bool = False
    lora_vision: bool = False
    # diffusion: square pictures of `resolution`, the VAE's latents cached, LoRA on the text encoder too
    resolution: int = 512
    cache_latents: bool = False
    text_encoder_lora: bool = False
    # the resolved DeepSpeed dict's zero_optimization values that change memory (None: as our files fill "auto")
    reduce_bucket_size: int = None  # elements; None: hidden^2
    stage3_max_live_parameters: int = None  # None: 1e9
    # the machine
    procs_per_node: int = 1
    nnodes: int = 1
    gpu: str = "H100-80GB"
    interconnect: str = None
    # the dataset's size (for the total time) and what a row holds
    examples: int = None
    tokens: int = None
    avg_tokens_per_example: float = None
    fill: float = None          # fraction of a row holding real tokens; None: PACKED_FILL or UNPACKED_FILL
    text_blocks: bool = False   # rows cut from plain text (dataset_format text): full rows, no attention mask
    image_size: tuple = None    # (width, height) of a picture; None: a square of max_pixels, cut to what a row holds
    images_per_row: float = 1.0
    margin: float = DEFAULT_MARGIN

    @property
    def world_size(self):
        return self.procs_per_node * self.nnodes

    @property
    def row_fill(self):
        """Fraction of each (padded) row that holds real tokens."""
        if self.fill:
            return self.fill
        return PACKED_FILL if self.packing else UNPACKED_FILL

    def validate(self):
        problems = []
        if self.mode not in recipe_table.MODES:
            problems.append(f"mode must be full, lora or qlora (got '{self.mode}')")
        if self.zero_stage not in (2, 3):
            problems.append(f"zero_stage must be 2 or 3 (got {self.zero_stage})")
        for name in ("max_length", "micro_batch_size", "gradient_accumulation_steps", "procs_per_node", "nnodes",
                     "lora_r"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got '{self.precision}'; 'auto' is "
                            f"decided when the run config is resolved)")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {', '.join(ENGINES)} (got '{self.engine}'; 'auto' is decided "
                            f"when the run config is resolved)")
        if self.recipe not in recipe_table.names():
            problems.append(f"recipe must be one of {', '.join(recipe_table.names())} (got '{self.recipe}')")
        if self.images_per_row < 0:
            problems.append(f"images_per_row must be 0 or more (got {self.images_per_row})")
        if self.mode == "qlora" and self.offload:
            problems.append("qlora does not support offload (bitsandbytes 4-bit weights stay on the GPU)")
        if problems:
            raise EstimateError("invalid estimate inputs: " + "; ".join(problems))
        return self
