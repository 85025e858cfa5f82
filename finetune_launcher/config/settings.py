"""RunConfig: the one resolved, frozen run config. Built once per launch (finetune_launcher.config.resolve_run_config)
from the YAML, the command-line overrides, the schema, the DeepSpeed file and the derived choices; read by the
pre-flight, the estimator and every rank; recorded in training_history.json. Nothing changes it after it is built.

Every key is declared once: a shared key as a RunConfig field made by `key()` (its type, default, JSON schema, help
and whether it is part of the training identity), a recipe's own key as a `Key` in its recipe-table entry. The JSON
schema the YAML and the command line are validated against, `ftl keys` and the checkpoints' identity all come
from these declarations."""
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from finetune_launcher import recipe_table
from finetune_launcher.recipe_table import Key

NUMBER_OR_NULL = {"type": ["number", "null"]}


def key(default: object, schema: Mapping[str, Any], help: str = "", identity: bool = False) -> Any:
    """A shared run-config key (a RunConfig field) with its schema, help and training-identity flag."""
    metadata = {"schema": schema, "help": help, "identity": identity}
    return field(default=default, metadata=metadata)


def built(default: object = None, factory: Callable[[], object] | None = None) -> Any:
    """A field resolved at build time (not a config key)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"built": True})
    return field(default=default, metadata={"built": True})


def freeze(value: Any) -> Any:
    """Lists -> tuples and dicts -> read-only mappings, all the way down."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    """The plain (JSON-ready, mutable) copy of a frozen value."""
    if isinstance(value, (dict, MappingProxyType)):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class RunConfig:
    # ---- what is trained
    mode: str = key(None, {"enum": list(recipe_table.MODES)}, "full fine-tune, LoRA, or LoRA on a 4-bit base",
                    identity=True)
    model: str = key(None, {"type": "string", "minLength": 1},
                     "hub id, local directory, builtin:tiny-llama or random:<architecture>", identity=True)
    dataset: str = key(None, {"type": "string", "minLength": 1}, "JSONL path, image folder or hub dataset name",
                       identity=True)
    recipe: str = key("auto", {"type": "string"}, "what is trained (see `ftl keys`); auto: from the model's config",
                      identity=True)
    run_name: str = key(None, {"type": "string", "pattern": "^[A-Za-z0-9._-]+$"},
                        "outputs go to output_dir/run_name; default: the config file's name")
    tokenizer: str = key(None, {"type": ["string", "null"]}, "tokenizer if not the model's", identity=True)
    trust_remote_code: bool = key(False, {"type": "boolean"}, "let transformers run the model repository's code")
    attn_implementation: str = key("sdpa", {"enum": ["sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                                     "flex_attention"]}, "transformers' attention kernel")
    dataset_split: str = key("train", {"type": "string"}, "split of a hub dataset", identity=True)
    dataset_format: str = key("auto", {"enum": ["auto", "dolly", "alpaca", "chat", "text"]},
                              "auto: from the first record's fields", identity=True)
    eval_dataset: str = key(None, {"type": ["string", "null"]}, "held-out file; default: eval_fraction of dataset",
                            identity=True)
    eval_fraction: float = key(0.05, {"type": "number", "minimum": 0, "exclusiveMaximum": 0.5},
                               "seeded share of the dataset held out for evals", identity=True)
    max_length: int = key(512, {"type": "integer", "minimum": 8}, "tokens per row", identity=True)
    packing: bool = key(True, {"type": "boolean"}, "several examples per row, each attending to itself only",
                        identity=True)
    max_examples: int = key(None, {"type": ["integer", "null"], "minimum": 1}, "use the first N records only",
                            identity=True)
    mix_datasets: tuple = key((), {"type": "array", "items": {
        "type": "object", "additionalProperties": False, "required": ["dataset", "fraction"],
        "properties": {"dataset": {"type": "string", "minLength": 1},
                       "fraction": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}}}},
        "other datasets mixed into the training set, each as a fraction of it (e.g. a 30% retention pool)",
        identity=True)
    lora_r: int = key(16, {"type": "integer", "minimum": 1}, "LoRA rank", identity=True)
    lora_alpha: float = key(32, {"type": "number", "exclusiveMinimum": 0}, "LoRA scale numerator", identity=True)
    lora_dropout: float = key(0.05, {"type": "number", "minimum": 0, "maximum": 1}, identity=True)
    lora_target_modules: object = key("all-linear", {"oneOf": [
        {"const": "all-linear"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
        "all-linear or a list of module names", identity=True)
    router_aux_loss_coef: float = key(None, {"type": ["number", "null"], "minimum": 0},
                                      "MoE: weight of the router's load-balancing loss in the training loss; null: "
                                      "the model config's router_aux_loss_coef", identity=True)
    moe_lora_kernel: str = key("grouped", {"enum": ["peft", "grouped"]},
                               "MoE LoRA on the fused experts: grouped (x.A.B per expert through grouped GEMMs, "
                               "no full-size copy) or peft (adds the adapter to the whole expert weight per "
                               "forward; same values)")
    bnb_4bit_quant_storage: str = key("auto", {"enum": ["auto", "uint8", "bfloat16", "float16", "float32"]},
                                      "QLoRA: the 4-bit weights' storage dtype; auto: the compute dtype where "
                                      "they are sharded (ZeRO-3, FSDP2), else uint8", identity=True)
    # ---- optimisation
    num_epochs: float = key(1, {"type": "number", "exclusiveMinimum": 0})
    max_steps: int = key(None, {"type": ["integer", "null"], "minimum": 1}, "optimizer steps; overrides num_epochs")
    micro_batch_size: int = key(1, {"type": "integer", "minimum": 1}, "rows per forward per process",
                                identity=True)
    gradient_accumulation_steps: int = key(1, {"type": "integer", "minimum": 1}, identity=True)
    learning_rate: float = key(2e-4, {"type": "number", "exclusiveMinimum": 0}, identity=True)
    weight_decay: float = key(0.0, {"type": "number", "minimum": 0}, identity=True)
    adam_beta1: float = key(0.9, {"type": "number", "minimum": 0, "exclusiveMaximum": 1}, identity=True)
    adam_beta2: float = key(0.999, {"type": "number", "minimum": 0, "exclusiveMaximum": 1}, identity=True)
    max_grad_norm: float = key(1.0, {"type": "number", "minimum": 0}, "gradient clipping; 0: off", identity=True)
    lr_scheduler: str = key("cosine", {"enum": ["cosine", "linear", "constant", "plateau"]}, identity=True)
    warmup_steps: int = key(0, {"type": "integer", "minimum": 0}, identity=True)
    warmup_ratio: float = key(0.0, {"type": "number", "minimum": 0, "maximum": 1}, identity=True)
    min_lr: float = key(0.0, {"type": "number", "minimum": 0}, "floor of the schedule; plateau: stop below it",
                        identity=True)
    plateau_factor: float = key(0.5, {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                "plateau: LR multiplier", identity=True)
    plateau_patience: int = key(2, {"type": "integer", "minimum": 1}, "plateau: evals without improvement",
                                identity=True)
    improvement_threshold: object = key(0.0, {"anyOf": [
        {"type": "number", "minimum": 0}, {"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?%$"}]},
        "an eval improves when lower than the best by more than this: a loss, or a percentage (5%)", identity=True)
    early_stopping_patience: int = key(None, {"type": ["integer", "null"], "minimum": 1},
                                       "stop after this many evals without improvement")
    min_eval_loss: float = key(None, NUMBER_OR_NULL, "stop when the eval loss falls below this")
    # ---- cadence, outputs
    eval_steps: int = key(50, {"type": "integer", "minimum": 1})
    logging_steps: int = key(10, {"type": "integer", "minimum": 1})
    save_steps: int = key(100, {"type": "integer", "minimum": 1})
    save_total_limit: int = key(2, {"type": "integer", "minimum": 1}, "checkpoints kept")
    output_dir: str = key("outputs", {"type": "string"})
    seed: int = key(42, {"type": "integer"}, identity=True)
    report_to: tuple = key(("tensorboard",), {"anyOf": [
        {"enum": ["tensorboard", "wandb", "none"]},
        {"type": "array", "items": {"enum": ["tensorboard", "wandb", "none"]}}]},
        "tensorboard always; add wandb to log there too; none (or []) turns both off")
    resume: str = key("auto", {"enum": ["auto", "always", "never"]},
                      "auto: continue checkpoints/latest when trained with the same settings")
    # ---- how it runs
    precision: str = key("auto", {"enum": ["auto", "bf16", "fp16", "fp32"]},
                         "auto: bf16 on GPUs that have it, fp16 on V100s, fp32 on the CPU", identity=True)
    gradient_checkpointing: object = key("auto", {"enum": ["auto", True, False]},
                                         "auto: off where the memory estimate fits without it")
    zero_stage: int = key(2, {"enum": [2, 3]}, "2: replicated weights; 3: sharded weights", identity=True)
    offload: bool = key(False, {"type": "boolean"}, "optimizer (and ZeRO-3 parameters) in CPU memory",
                        identity=True)
    deepspeed_config: str = key(None, {"type": ["string", "null"]}, "your own DeepSpeed JSON file")
    overlap_comm: bool = key(False, {"type": "boolean"}, "DeepSpeed's overlap_comm")
    liger_kernel: object = key("auto", {"enum": ["auto", True, False]}, "auto: on CUDA GPUs when installed")
    compile_layers: object = key("auto", {"enum": ["auto", True, False]},
                                 "torch.compile of each decoder layer (one graph shared by all); auto: on CUDA GPUs")
    zero3_gather: str = key("layer", {"enum": ["layer", "module"]},
                            "ZeRO-3: gather a decoder layer's parameters at once, or module by module")
    engine: str = key("auto", {"enum": ["auto", "deepspeed", "ddp", "fsdp2"]},
                      "deepspeed; ddp: plain PyTorch for replicated weights; fsdp2: torch's FSDP2 for zero_stage 3 "
                      "(checkpoints resume on any number of processes); auto: see README")
    debug_nan_at_step: int = key(None, {"type": ["integer", "null"], "minimum": 1},
                                 "testing only: make the loss NaN at this step")
    debug_nan_grad_at_step: int = key(None, {"type": ["integer", "null"], "minimum": 1},
                                      "testing only: make the gradients NaN at this step")
    # ---- resolved at build time (not config keys)
    recipe_options: object = built(factory=dict)  # the run's recipe's own keys (recipe-table Keys)
    world_size: int = built(1)
    procs_per_node: int = built(1)
    nnodes: int = built(1)
    device_kind: str = built("cpu")   # cuda | cpu
    gpu: str = built()                # the estimator's device name, e.g. H200, or None on the CPU
    deepspeed: object = built()       # the DeepSpeed config dict the engine gets, every "auto" filled
    config_path: str = built()
    sources: object = built(factory=dict)    # key -> "yaml" | "command line" (keys not listed: defaults)
    decisions: object = built(factory=dict)  # derived key -> why it has its value

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, freeze(getattr(self, f.name)))

    def __getattr__(self, name: str) -> Any:
        """The run's recipe's own keys read like the shared ones (cfg.resolution)."""
        options = self.__dict__.get("recipe_options") or {}
        if name in options:
            return options[name]
        raise AttributeError(f"RunConfig has no key '{name}'")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def lora(self) -> bool:
        return self.mode in ("lora", "qlora")

    def deepspeed_dict(self) -> dict[str, Any]:
        """A mutable copy for deepspeed.initialize (which writes into the dict it is given)."""
        return thaw(self.deepspeed)

    def as_dict(self) -> dict[str, Any]:
        """Every key (the recipe's own ones beside the shared ones) and built field as plain JSON-ready values
        (history metadata, the estimator's input, the file the ranks read)."""
        values = {f.name: thaw(getattr(self, f.name)) for f in fields(self) if f.name != "recipe_options"}
        values.update(thaw(self.recipe_options))
        return values

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        own = {name for name in recipe_table.get(data["recipe"]).key_names()} if "recipe" in data else set()
        known = {f.name for f in fields(cls)} - {"recipe_options"}
        unknown = sorted(set(data) - known - own)
        if unknown:
            raise ValueError(f"resolved run config has unknown keys {unknown}; it was written by another version")
        options = {name: data[name] for name in own if name in data}
        return cls(**{k: v for k, v in data.items() if k in known}, recipe_options=options)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def shared_keys() -> tuple[Key, ...]:
    """The shared keys as recipe-table Keys (name, default, schema, help, identity)."""
    return tuple(Key(f.name, f.default, f.metadata["schema"], f.metadata["help"], f.metadata["identity"])
                 for f in fields(RunConfig) if "schema" in f.metadata)


CONFIG_KEYS = tuple(k.name for k in shared_keys())
DEFAULTS = {k.name: k.default for k in shared_keys()}


def all_keys() -> dict[str, Key]:
    """Every key a run config may give: the shared ones and every recipe's own (name -> Key)."""
    return {**{k.name: k for k in shared_keys()}, **recipe_table.recipe_keys()}


def run_config_schema() -> dict[str, Any]:
    """The JSON schema of a run config (YAML + command line), built from the declarations."""
    properties = {name: dict(k.schema, description=k.help) if k.help else dict(k.schema)
                  for name, k in all_keys().items()}
    properties["recipe"] = dict(properties["recipe"], enum=["auto", *recipe_table.names()])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "finetune-launcher run config",
            "type": "object", "additionalProperties": False, "required": ["mode", "model", "dataset"],
            "properties": properties}


def identity_keys(recipe: str) -> tuple[str, ...]:
    """The keys that change what a run of `recipe` trains: a checkpoint continues automatically only when all of
    them match (checkpoint.training_identity adds the data files' fingerprints)."""
    own = tuple(k.name for k in recipe_table.get(recipe).keys if k.identity)
    return tuple(k.name for k in shared_keys() if k.identity) + own + ("world_size",)


def replace_settings(config: RunConfig, **changes: Any) -> RunConfig:
    """A new RunConfig with `changes` (for tests and the estimator's what-ifs; the run's own config stays as built)."""
    return RunConfig.from_dict({**config.as_dict(), **changes})
