"""Build the one RunConfig of a launch, in this order: YAML, command-line overrides, the schema, the DeepSpeed
file's settings, then the derived choices (recipe, precision, 4-bit storage, Liger, engine, layer compilation,
gradient checkpointing), then the DeepSpeed dict with every "auto" filled. Each derived value records why it has
its value (`decisions`)."""
import importlib.util
import os
from pathlib import Path

from finetune_launcher import recipe_table
from finetune_launcher.config import deepspeed as ds
from finetune_launcher.config import machine as machines
from finetune_launcher.config.model_facts import model_facts, resolve_recipe
from finetune_launcher.config.settings import DEFAULTS, RunConfig
from finetune_launcher.config.sources import ConfigError, merged_values
from finetune_launcher.dtypes import DTYPE_NAMES
from finetune_launcher.estimate import GIB, EstimateError
from finetune_launcher.estimate.from_config import without_checkpointing
from finetune_launcher.models.experts import resolve_experts
from finetune_launcher.resources import MissingResource, resource


def resolve_run_config(config_path=None, overrides=None, procs_per_node=None, nnodes=1, machine=None,
                       require_model=True):
    """The frozen RunConfig for a config file + overrides on `machine` (default: this one) with `procs_per_node`
    processes on each of `nnodes` nodes. `require_model=False` (estimates for another machine) tolerates a model
    whose config.json is not available here, using the estimator's offline table for its shape."""
    user, sources, source = merged_values(config_path, overrides)
    values = {**DEFAULTS, **user}
    machine = machine or machines.detect()
    procs = procs_per_node or default_procs_per_node(machine)
    world = procs * nnodes
    values["run_name"] = values["run_name"] or (Path(config_path).stem if config_path else f"{values['mode']}-run")
    values["config_path"] = str(Path(config_path).resolve()) if config_path else None
    values["dataset"] = shipped_data(values["dataset"], config_path)
    decisions = {}

    ds_path = values["deepspeed_config"] or ds.shipped_file(values["zero_stage"], values["offload"])
    ds_data = ds.read_deepspeed_file(ds_path)
    decisions["deepspeed"] = [f"file {ds_path}"] + ds.reconcile(ds_data, values, sources, ds_path)
    risky_overlap = ds.risky_overlap(ds_data, sources)

    facts = model_facts(values, require_model)
    values["recipe"], decisions["recipe"] = resolve_recipe(values, facts)
    recipe = recipe_table.get(values["recipe"])
    decisions.update(apply_recipe_defaults(values, recipe, sources))
    values["precision"], decisions["precision"] = resolve_precision(values["precision"], machine)
    values["bnb_4bit_quant_storage"], decisions["bnb_4bit_quant_storage"] = resolve_quant_storage(values)
    values["liger_kernel"], decisions["liger_kernel"] = resolve_liger(values["liger_kernel"], machine,
                                                                      facts.model_type)
    if facts.experts and recipe.experts:
        decisions["experts"] = resolve_experts(values, facts.experts)
    values["engine"], decisions["engine"] = resolve_engine(values, machine, world)
    values["compile_layers"], decisions["compile_layers"] = resolve_compile(values, machine, facts)
    check_cross_fields(values, source, sources)
    deepspeed = ds.fill_auto(ds_data, values, world, facts.hidden_size, largest_adapter(values, facts),
                             machine.on_gpu)
    values["gradient_checkpointing"], decisions["gradient_checkpointing"] = resolve_checkpointing(
        {**values, "deepspeed": deepspeed}, procs, nnodes, machine)
    if risky_overlap:
        decisions["deepspeed"].append(
            f"WARNING: {ds_path} sets zero_optimization.overlap_comm true with contiguous_gradients on; DeepSpeed has "
            f"produced NaN grad norms with that pair. Kept as set; to turn it off set \"overlap_comm\": false in that "
            f"file (or \"auto\": it then follows --overlap_comm, off by default)")
    options = {k.name: values.pop(k.name, k.default) for k in recipe.keys}
    for other in recipe_table.recipe_keys():
        values.pop(other, None)  # another recipe's key: check_cross_fields refused it if given
    return RunConfig(**values, recipe_options=options, world_size=world, procs_per_node=procs, nnodes=nnodes,
                     device_kind=machine.kind, gpu=machine.gpu, deepspeed=deepspeed, sources=sources,
                     decisions=decisions)


def shipped_data(dataset, config_path):
    """A relative dataset path that names none of the user's files but one the package ships (the embedded
    defaults' data/tiny_*.jsonl, installed under <prefix>/share/finetune-launcher/) is that shipped file."""
    if not dataset or Path(dataset).is_absolute() or Path(dataset).exists():
        return dataset
    try:
        return str(resource(dataset))
    except MissingResource:
        return dataset


def apply_recipe_defaults(values, recipe, sources):
    """The recipe's own keys' defaults, and its defaults for shared keys (e.g. diffusion's LoRA targets) where the
    user gave none."""
    for own in recipe.keys:
        values.setdefault(own.name, own.default)
    decisions = {}
    for name, value in recipe.defaults.items():
        if name not in sources:
            values[name] = value
            decisions[name] = f"{recipe.name} default"
    return decisions


def default_procs_per_node(machine):
    if machine.on_gpu and machine.local:
        return machine.gpus
    return int(os.environ.get("FTL_CPU_PROCS", "2")) if machine.local else 1


def largest_adapter(values, facts):
    """Elements of the largest LoRA matrix (rank x the widest projection side); 0 for a full fine-tune."""
    return 0 if values["mode"] == "full" else values["lora_r"] * facts.widest


# ---------------------------------------------------------------- derived choices

def resolve_precision(requested, machine):
    """auto -> bf16 on GPUs that have it, fp16 on older GPUs (V100), fp32 on the CPU."""
    if requested == "auto":
        if not machine.on_gpu:
            return "fp32", "auto: fp32 on the CPU"
        if machine.bf16:
            return "bf16", f"auto: bf16 on {machine.gpu}"
        return "fp16", f"auto: fp16 ({machine.gpu} has no bf16)"
    if requested == "fp16" and not machine.on_gpu:
        raise ConfigError("key 'precision': fp16 needs a GPU (DeepSpeed refuses fp16 on the CPU); use precision: "
                          "auto or fp32")
    if requested == "bf16" and machine.on_gpu and not machine.bf16:
        raise ConfigError(f"key 'precision': bf16, but {machine.gpu} has no bf16 support (V100-class); use precision: "
                          f"fp16 or auto")
    return requested, "set in the run config"


def resolve_quant_storage(values):
    """The 4-bit storage dtype: ZeRO-3 shards parameters by dtype, so QLoRA under ZeRO-3 stores NF4 weights in the
    compute dtype; otherwise uint8."""
    compute = DTYPE_NAMES[values["precision"]]
    storage = values["bnb_4bit_quant_storage"]
    if values["mode"] != "qlora":
        return storage, "not a QLoRA run"
    if storage == "auto":
        chosen = compute if values["zero_stage"] == 3 else "uint8"
        return chosen, f"auto: {chosen} ({'the compute dtype, for ZeRO-3' if values['zero_stage'] == 3 else 'ZeRO-2'})"
    if values["zero_stage"] == 3 and storage != compute:
        raise ConfigError(quant_storage_problem(storage, f"precision {values['precision']} computes in {compute}"))
    return storage, "set in the run config"


def quant_storage_problem(storage, computes):
    return (f"mode qlora with zero_stage 3 needs bnb_4bit_quant_storage equal to the compute dtype so DeepSpeed can "
            f"shard the 4-bit weights; got bnb_4bit_quant_storage '{storage}' but {computes}. Set "
            f"bnb_4bit_quant_storage: auto (it follows the precision), or use zero_stage: 2")


def resolve_liger(setting, machine, model_type):
    """Liger's Triton kernels: `auto` on a CUDA GPU with liger-kernel installed for a model type it knows; `true`
    insists (and fails here, before launch, where they cannot run)."""
    if setting is False:
        return False, "off (set in the run config)"
    problem = liger_problem(machine, model_type)
    if problem and setting is True:
        raise ConfigError(f"key 'liger_kernel': true, but {problem}; set liger_kernel: auto (use them where they work) "
                          f"or false")
    if problem:
        return False, f"off ({problem}; liger_kernel: false silences this)"
    return True, "on (auto: CUDA GPU, liger-kernel installed)" if setting == "auto" else "on (set in the run config)"


def liger_problem(machine, model_type):
    if not machine.on_gpu:
        return "Liger's kernels are Triton kernels and need a CUDA GPU"
    if not machine.local:
        return None  # a pre-flight for GPU nodes: assume the [gpu] extra is installed there
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e '.[gpu]')"
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return f"liger-kernel has no kernels for model type '{model_type}'"
    return None


def resolve_engine(values, machine, world):
    """`engine: auto` on CUDA GPUs without a DeepSpeed file: fsdp2 for sharded runs (zero_stage 3), ddp (plain
    PyTorch: no ZeRO bookkeeping, no per-parameter hooks) where ZeRO-2 would partition nothing worth it (LoRA/QLoRA on
    replicated weights, or any mode on one process); deepspeed otherwise, for a DeepSpeed file, its CPU optimizer
    offload, fp16 loss scaling, and on the CPU."""
    setting = values["engine"]
    if setting == "deepspeed":
        return "deepspeed", "set in the run config"
    if setting != "auto":
        problem = ENGINE_PROBLEMS[setting](values, world)
        if problem:
            raise ConfigError(f"key 'engine': {setting}, but {problem}; set engine: auto or deepspeed")
        return setting, "set in the run config"
    if values["deepspeed_config"]:
        return "deepspeed", f"auto: a DeepSpeed file was given ({values['deepspeed_config']})"
    if not machine.on_gpu:
        return "deepspeed", "auto: deepspeed on the CPU (engine: ddp or fsdp2 opts in)"
    if values["zero_stage"] == 3:
        return auto_sharded_engine(values, world)
    problem = ddp_problem(values, world)
    if problem:
        return "deepspeed", f"auto: {problem}"
    if values["mode"] == "full":
        return "ddp", ("auto: full fine-tune on one process, where ZeRO-2 partitions nothing: plain PyTorch with fp32 "
                       "master weights, without ZeRO's per-parameter gradient hooks and buckets")
    return "ddp", (f"auto: {values['mode']} at zero_stage 2 on replicated weights: plain PyTorch, without ZeRO's "
                   f"per-parameter gradient hooks")


def auto_sharded_engine(values, world):
    problem = fsdp2_problem(values, world)
    if problem:
        return "deepspeed", f"auto: zero_stage 3 on DeepSpeed, as {problem}"
    return "fsdp2", ("auto: zero_stage 3 on FSDP2 (fully_shard per layer, torch's collectives without per-module "
                     "Python hooks: 1.07x the unsharded step for LoRA and 1.04x for QLoRA on one H200, against "
                     "DeepSpeed ZeRO-3's 1.81x, docs/benchmarks.md)")


def recipe_engines(values):
    return recipe_table.get(values["recipe"]).engines


def ddp_problem(values, world):
    if "ddp" not in recipe_engines(values):
        return f"the {values['recipe']} recipe runs on {' or '.join(recipe_engines(values))}"
    if values["mode"] == "full" and world > 1:
        return "a full fine-tune on several processes needs ZeRO's partitioning of gradients and optimizer states"
    if values["zero_stage"] == 3:
        return "zero_stage 3 shards the weights (engine fsdp2 or deepspeed)"
    if values["offload"]:
        return "optimizer offload is DeepSpeed's"
    if values["precision"] == "fp16":
        return "fp16 loss scaling is DeepSpeed's"
    return None


def fsdp2_problem(values, world):
    if "fsdp2" not in recipe_engines(values):
        return f"the {values['recipe']} recipe runs on {' or '.join(recipe_engines(values))}"
    if values["zero_stage"] != 3:
        return (f"fsdp2 shards weights, gradients and optimizer states, which is zero_stage 3 (this run has "
                f"zero_stage {values['zero_stage']}: add --zero 3)")
    if values["deepspeed_config"]:
        return f"a DeepSpeed file was given ({values['deepspeed_config']}); remove deepspeed_config to run fsdp2"
    if values["offload"]:
        return "optimizer offload is DeepSpeed's (DeepSpeedCPUAdam; FSDP2's CPU offload is not measured here)"
    if values["precision"] == "fp16":
        return "fp16 loss scaling is DeepSpeed's"
    return None


ENGINE_PROBLEMS = {"ddp": ddp_problem, "fsdp2": fsdp2_problem}


def resolve_compile(values, machine, facts=None):
    """`compile_layers: auto` -> on for CUDA GPUs with torch >= 2.5, for recipes with decoder layers, outside
    ZeRO-3 with zero3_gather: module (whose hooks gather parameters inside each layer's forward), and not for a
    mixture of experts (`facts`: the model's ModelFacts)."""
    setting = values["compile_layers"]
    if setting is False:
        return False, "off (set in the run config)"
    problem = compile_problem(values, machine)
    if problem and setting is True:
        raise ConfigError(f"key 'compile_layers': true, but {problem}; set compile_layers: auto or false")
    if setting is True:
        return True, "on (set in the run config)"
    if problem:
        return False, f"off (auto: {problem})"
    if facts is not None and facts.experts and machine.on_gpu:
        return False, ("off (auto: a mixture-of-experts layer's grouped GEMM failed under inductor on an H200 with "
                       "torch 2.11, 'Invalid strides/sizes' in _grouped_mm: docs/benchmarks.md, issue 30; "
                       "compile_layers: true compiles attention, norms and router with the experts left eager, "
                       "not yet measured on a GPU)")
    if not machine.on_gpu:
        return False, "off (auto: on CUDA GPUs only; inductor's CPU compile of a layer takes about a minute)"
    return True, "on (auto: CUDA GPU, torch >= 2.5)"


def compile_problem(values, machine):
    no_layers = recipe_table.get(values["recipe"]).compile_layers
    if no_layers:
        return f"the {values['recipe']} recipe cannot compile layers: {no_layers}"
    if values["zero_stage"] == 3 and values["engine"] == "deepspeed" and values["zero3_gather"] == "module":
        return "ZeRO-3 with zero3_gather: module gathers parameters inside each layer's forward"
    version = installed_torch_version() if machine.local else None
    if version and version < (2, 5):
        return f"torch {'.'.join(map(str, version))} is older than 2.5 (layers would not share one compiled graph)"
    return None


def installed_torch_version():
    """(major, minor) of the installed torch, without importing it (the launcher never starts CUDA)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(part) for part in version("torch").split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return None


def resolve_checkpointing(values, procs, nnodes, machine):
    """`gradient_checkpointing: auto` from the memory estimate: off when the run is predicted to fit without it (a
    third less compute per step), on otherwise or when no estimate can be made."""
    if values["gradient_checkpointing"] != "auto":
        return bool(values["gradient_checkpointing"]), "set in the run config"
    try:
        result, device = without_checkpointing(values, procs, nnodes, machine.gpu if machine.on_gpu else "cpu")
    except EstimateError as error:
        return True, f"auto: on (no memory estimate: {error})"
    need, have = result.peak_bytes / GIB, device.memory_gib
    if result.fits:
        return False, f"auto: off (predicted {need:.1f} GiB of {have:.1f} GiB per {device.name} without it)"
    return True, f"auto: on (without it {need:.1f} GiB > {have:.1f} GiB per {device.name})"


def check_cross_fields(values, source, sources=None):
    problems = []
    for name in sources or {}:
        owner = recipe_table.owner_of(name)
        if owner is not None and owner.name != values["recipe"]:
            problems.append(f"key '{name}' is for {owner.name} runs, but this is a {values['recipe']} run "
                            f"({values['model']}); remove it")
    if values["mode"] == "qlora" and values["offload"]:
        problems.append("mode qlora does not support offload (bitsandbytes 4-bit weights stay on the GPU); set "
                        "offload: false")
    if values["eval_dataset"] is None and values["eval_fraction"] == 0 and values["lr_scheduler"] == "plateau":
        problems.append("lr_scheduler plateau needs evaluations: set eval_fraction > 0 or eval_dataset")
    if values["warmup_steps"] and values["warmup_ratio"]:
        problems.append("set warmup_steps or warmup_ratio, not both")
    if problems:
        raise ConfigError(f"{source}: invalid config:\n  - " + "\n  - ".join(problems))
