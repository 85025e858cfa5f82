"""RunConfig: the one resolved, frozen run config. Built once per launch (finetune_launcher.config.resolve_run_config) from the
YAML, the command-line overrides, the schema, the DeepSpeed file and the derived choices; read by the pre-flight, the
estimator and every rank; recorded in training_history.json. Nothing changes it after it is built."""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType


def freeze(value):
    """Lists -> tuples and dicts -> read-only mappings, all the way down."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value):
    """The plain (JSON-ready, mutable) copy of a frozen value."""
    if isinstance(value, (dict, MappingProxyType)):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class RunConfig:
    # ---- what is trained
    mode: str
    model: str
    dataset: str
    recipe: str = "auto"
    run_name: str = None
    tokenizer: str = None
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"
    dataset_split: str = "train"
    dataset_format: str = "auto"
    eval_dataset: str = None
    eval_fraction: float = 0.05
    max_length: int = 512
    packing: bool = True
    max_examples: int = None
    mix_datasets: tuple = ()
    max_pixels: int = None
    min_pixels: int = None
    image_overflow: str = "drop"
    train_merger: bool = False
    lora_vision: bool = False
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    image_column: str = None
    caption_column: str = "text"
    snr_gamma: float = None
    noise_offset: float = 0.0
    cache_latents: bool = False
    text_encoder_lora: bool = False
    validation_prompts: tuple = ()
    sample_seeds: tuple = (0,)
    sample_steps: int = 20
    guidance_scale: float = 7.5
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    lora_target_modules: object = "all-linear"
    bnb_4bit_quant_storage: str = "auto"
    # ---- optimisation
    num_epochs: float = 1
    max_steps: int = None
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    improvement_threshold: object = 0.0  # a loss, or "5%" of the best
    early_stopping_patience: int = None
    min_eval_loss: float = None
    # ---- cadence, outputs
    eval_steps: int = 50
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    output_dir: str = "outputs"
    seed: int = 42
    report_to: tuple = ("tensorboard",)
    resume: str = "auto"
    # ---- how it runs
    precision: str = "auto"
    gradient_checkpointing: object = "auto"
    zero_stage: int = 2
    offload: bool = False
    deepspeed_config: str = None
    overlap_comm: bool = False
    liger_kernel: object = "auto"
    compile_layers: object = "auto"
    zero3_gather: str = "layer"
    engine: str = "auto"
    debug_nan_at_step: int = None
    debug_nan_grad_at_step: int = None
    # ---- resolved at build time (not config keys)
    world_size: int = 1
    procs_per_node: int = 1
    nnodes: int = 1
    device_kind: str = "cpu"          # cuda | cpu
    gpu: str = None                   # the estimator's device name, e.g. H200, or None on the CPU
    deepspeed: object = None          # the DeepSpeed config dict the engine gets, every "auto" filled
    config_path: str = None
    sources: object = field(default_factory=dict)  # key -> "yaml" | "command line" (keys not listed: defaults)
    decisions: object = field(default_factory=dict)  # derived key -> why it has its value

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, freeze(getattr(self, f.name)))

    @property
    def run_dir(self):
        return Path(self.output_dir) / self.run_name

    @property
    def lora(self):
        return self.mode in ("lora", "qlora")

    def deepspeed_dict(self):
        """A mutable copy for deepspeed.initialize (which writes into the dict it is given)."""
        return thaw(self.deepspeed)

    def as_dict(self):
        """Every field as plain JSON-ready values (history metadata, the estimator's input)."""
        return {f.name: thaw(getattr(self, f.name)) for f in fields(self)}

    def to_json(self):
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"resolved run config has unknown keys {unknown}; it was written by another version")
        return cls(**data)

    @classmethod
    def from_json_file(cls, path):
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


CONFIG_KEYS = tuple(f.name for f in fields(RunConfig) if f.name not in
                    ("world_size", "procs_per_node", "nnodes", "device_kind", "gpu", "deepspeed", "config_path",
                     "sources", "decisions"))
DEFAULTS = {f.name: f.default for f in fields(RunConfig) if f.name in CONFIG_KEYS}


def replace_settings(config, **changes):
    """A new RunConfig with `changes` (for tests and the estimator's what-ifs; the run's own config stays as built)."""
    return RunConfig.from_dict({**config.as_dict(), **changes})


# Keys that change what is trained: a checkpoint continues automatically only when all of them match.
TRAINING_IDENTITY_KEYS = (
    "recipe", "mode", "model", "tokenizer", "dataset", "dataset_split", "dataset_format", "eval_dataset",
    "eval_fraction", "max_length", "packing", "max_examples", "mix_datasets", "max_pixels", "min_pixels",
    "image_overflow", "train_merger", "lora_vision", "resolution", "center_crop", "random_flip", "image_column",
    "caption_column", "snr_gamma", "noise_offset", "text_encoder_lora", "lora_r", "lora_alpha", "lora_dropout",
    "lora_target_modules", "bnb_4bit_quant_storage", "micro_batch_size", "gradient_accumulation_steps",
    "world_size", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "lr_scheduler",
    "warmup_steps", "warmup_ratio", "min_lr", "plateau_factor", "plateau_patience", "improvement_threshold",
    "precision", "zero_stage", "offload", "seed")


def training_identity(config):
    """{key: value} of what a checkpoint's training depends on (see TRAINING_IDENTITY_KEYS)."""
    values = config.as_dict()
    return {key: values[key] for key in TRAINING_IDENTITY_KEYS}
