"""The run config: YAML + command line + schema, errors that name the file, key and fix, the derived choices, and
the frozen RunConfig every rank reads."""
import dataclasses
from pathlib import Path

import pytest

from tests.conftest import resolve
from finetune_launcher.config import ConfigError, RunConfig, parse_overrides, split_command_line
from finetune_launcher.config.sources import schema

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "mode: lora\nmodel: builtin:tiny-llama\ndataset: data/tiny_instruct.jsonl\n"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_is_an_error_naming_file_key_and_fix(tmp_path):
    path = write(tmp_path, MINIMAL + "lora_rank: 8\n")
    with pytest.raises(ConfigError) as error:
        resolve(path)
    message = str(error.value)
    assert str(path) in message and "unknown key 'lora_rank'" in message and "did you mean 'lora_r'" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'micro_batch_size'.*'four'"):
        resolve(write(tmp_path, MINIMAL + "micro_batch_size: four\n"))


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="'dataset' is a required property"):
        resolve(write(tmp_path, "mode: lora\nmodel: x\n"))


def test_bad_yaml_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve(write(tmp_path, "mode: [lora\n"))


def test_overrides_are_typed_and_aliased():
    overrides = parse_overrides(["--lora_r", "8", "--zero", "3", "--offload", "--learning_rate", "1e-4",
                                 "--lora_target_modules", "q_proj,v_proj", "--max_steps=5", "--resume"])
    assert overrides == {"lora_r": 8, "zero_stage": 3, "offload": True, "learning_rate": "1e-4",
                         "lora_target_modules": ["q_proj", "v_proj"], "max_steps": 5, "resume": True}


def test_one_parser_splits_config_launcher_options_and_overrides():
    path, options, overrides = split_command_line(
        ["configs/x.yaml", "--launcher", "accelerate", "--dry-run", "--zero=3", "--lora_r", "4"],
        value_options=("--launcher",), flag_options=("--dry-run",))
    assert path == "configs/x.yaml" and options == {"--launcher": "accelerate", "--dry-run": True}
    assert overrides == {"zero_stage": 3, "lora_r": 4}
    assert split_command_line(["--config", "a.yaml", "--seed", "1"])[0::2] == ("a.yaml", {"seed": 1})


def test_overrides_apply_over_the_file_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = resolve(path, parse_overrides(["--learning_rate", "1e-4", "--resume"]))
    assert cfg.learning_rate == pytest.approx(1e-4) and cfg.resume == "always"
    assert cfg.sources["learning_rate"] == "command line" and cfg.sources["mode"] == "yaml"
    with pytest.raises(ConfigError, match="command-line overrides"):
        resolve(path, {"zero_stage": 4})


def test_the_resolved_config_is_frozen_and_round_trips(tmp_path):
    cfg = resolve(write(tmp_path, MINIMAL), {"lora_target_modules": ["q_proj", "v_proj"]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.zero_stage = 3
    with pytest.raises(TypeError):
        cfg.deepspeed["zero_optimization"]["stage"] = 3  # nested values are read-only too
    assert cfg.lora_target_modules == ("q_proj", "v_proj")
    copy = RunConfig.from_dict(cfg.as_dict())
    assert copy == cfg and copy.deepspeed_dict() == cfg.deepspeed_dict()
    assert cfg.deepspeed_dict() is not cfg.deepspeed_dict()  # deepspeed.initialize gets a mutable copy


def test_a_recipes_own_keys_read_like_shared_ones_and_belong_to_its_identity(tmp_path):
    """Diffusion's keys are declared in its recipe-table entry, yet read as cfg.resolution, survive the file the
    ranks read, and a changed one makes another training identity; an LM run carries none of them."""
    from finetune_launcher.checkpoint import training_identity

    sd = resolve(write(tmp_path, "mode: lora\nmodel: builtin:tiny-sd\ndataset: data/tiny_sd\nresolution: 32\n"))
    assert sd.recipe == "diffusion" and sd.resolution == 32 and sd.caption_column == "text"
    assert RunConfig.from_dict(sd.as_dict()) == sd and sd.as_dict()["resolution"] == 32
    other = resolve(write(tmp_path, "mode: lora\nmodel: builtin:tiny-sd\ndataset: data/tiny_sd\nresolution: 64\n",
                          "b.yaml"))
    assert training_identity(sd)["resolution"] == 32 != training_identity(other)["resolution"]
    assert sd.lora_target_modules == ("to_k", "to_q", "to_v", "to_out.0")  # the recipe's default for a shared key
    lm = resolve(write(tmp_path, MINIMAL, "lm.yaml"))
    assert "resolution" not in lm.as_dict() and not hasattr(lm, "resolution")


def test_another_recipes_key_is_refused_naming_its_recipe(tmp_path):
    with pytest.raises(ConfigError, match="key 'resolution' is for diffusion runs, but this is a causal_lm run"):
        resolve(write(tmp_path, MINIMAL + "resolution: 256\n"))


def test_the_schema_lists_every_declared_key_with_its_help():
    properties = schema()["properties"]
    assert properties["lora_r"]["description"] == "LoRA rank" and properties["lora_r"]["minimum"] == 1
    assert "resolution" in properties and "max_pixels" in properties  # recipes' own keys
    assert properties["recipe"]["enum"] == ["auto", "diffusion", "vision_language", "causal_lm"]


def test_derived_choices_are_resolved_and_explained(tmp_path):
    cfg = resolve(write(tmp_path, MINIMAL))
    assert (cfg.precision, cfg.liger_kernel, cfg.recipe) == ("fp32", False, "causal_lm")
    assert isinstance(cfg.gradient_checkpointing, bool)
    assert "CPU" in cfg.decisions["precision"] and "CUDA GPU" in cfg.decisions["liger_kernel"]
    assert cfg.world_size == 2 and cfg.deepspeed["train_batch_size"] == 2 * cfg.micro_batch_size * \
        cfg.gradient_accumulation_steps


@pytest.mark.parametrize("gpu,precision", [("H100-80GB", "bf16"), ("V100-32GB", "fp16"), ("cpu", "fp32")])
def test_precision_auto_follows_the_machine(tmp_path, gpu, precision):
    cfg = resolve(write(tmp_path, MINIMAL), on=gpu)
    assert cfg.precision == precision
    assert cfg.deepspeed["bf16"]["enabled"] is (precision == "bf16")
    assert cfg.deepspeed["fp16"]["enabled"] is (precision == "fp16")


@pytest.mark.parametrize("override,needle", [
    ({"precision": "fp16"}, "fp16 needs a GPU"),
    ({"liger_kernel": True}, "liger_kernel': true, but Liger's kernels are Triton kernels and need a CUDA GPU"),
    ({"model": "builtin:typo"}, "unknown builtin model 'typo'; known: builtin:small-llama, builtin:tiny-llama"),
    ({"model": "random:unknown"}, "unknown architecture 'unknown' for random:; known: random:"),
    ({"model": "/nonexistent/model"}, "does not exist"),
])
def test_impossible_choices_are_config_errors_naming_the_key(tmp_path, override, needle):
    with pytest.raises(ConfigError) as error:
        resolve(write(tmp_path, MINIMAL), override)
    assert needle in str(error.value)


def test_a_bf16_run_on_a_gpu_without_bf16_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="V100-32GB has no bf16 support"):
        resolve(write(tmp_path, MINIMAL + "precision: bf16\n"), on="V100-32GB")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves_and_names_its_command(path):
    cfg = resolve(path, on="H100-80GB", procs=8, require_model=False)
    assert cfg.mode in ("full", "lora", "qlora") and cfg.deepspeed["zero_optimization"]["stage"] == cfg.zero_stage
    header = path.read_text().splitlines()[:12]
    assert any("bash launch/" in line or "sbatch" in line for line in header), \
        f"{path.name}: the header comment must give the exact command that runs it"


@pytest.mark.parametrize("argv", [[*recipe, "--mode", mode] for recipe in ([], ["--recipe", "diffusion"])
                                  for mode in ("lora", "qlora", "full")], ids=" ".join)
def test_every_launchers_mode_without_a_config_has_its_embedded_default(argv):
    """`bash launch/train_full.sh`, `bash launch/train_diffusion.sh --mode full`, ...: each starts a shipped tiny
    config of that recipe and mode (train_diffusion.sh --mode full looked for a file that did not exist)."""
    from finetune_launcher.launch.cli import parse_launch_args

    _, path, _ = parse_launch_args(argv)
    cfg = resolve(path, on="cpu", procs=2, require_model=False)
    assert cfg.mode == argv[-1] and (cfg.recipe == "diffusion") == ("diffusion" in argv), (path, cfg.recipe)


QLORA_ZERO3 = MINIMAL.replace("lora", "qlora", 1) + "zero_stage: 3\n"


@pytest.mark.parametrize("precision,storage", [("bf16", "float16"), ("fp16", "bfloat16"), ("bf16", "float32")])
def test_qlora_zero3_storage_must_equal_the_compute_dtype(tmp_path, precision, storage):
    path = write(tmp_path, QLORA_ZERO3 + f"precision: {precision}\nbnb_4bit_quant_storage: {storage}\n")
    with pytest.raises(ConfigError) as error:
        resolve(path, on="H100-80GB")
    message = str(error.value)
    wanted = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    assert f"bnb_4bit_quant_storage '{storage}'" in message and f"precision {precision} computes in {wanted}" in message
    assert "bnb_4bit_quant_storage: auto" in message


@pytest.mark.parametrize("on,stage,storage,expected", [
    ("H100-80GB", 3, "auto", "bfloat16"), ("V100-32GB", 3, "auto", "float16"), ("cpu", 3, "auto", "float32"),
    ("H100-80GB", 2, "auto", "uint8"), ("V100-32GB", 3, "float16", "float16")])
def test_qlora_storage_auto_follows_the_resolved_precision(tmp_path, on, stage, storage, expected):
    text = MINIMAL.replace("lora", "qlora", 1) + f"zero_stage: {stage}\nbnb_4bit_quant_storage: {storage}\n"
    assert resolve(write(tmp_path, text), on=on).bnb_4bit_quant_storage == expected


def test_auto_precision_is_checked_against_explicit_storage(tmp_path):
    """float16 storage with precision auto: fine on a V100 (fp16), refused on an H100 (bf16)."""
    path = write(tmp_path, QLORA_ZERO3 + "bnb_4bit_quant_storage: float16\n")
    assert resolve(path, on="V100-32GB").precision == "fp16"
    with pytest.raises(ConfigError, match="precision bf16 computes in bfloat16"):
        resolve(path, on="H100-80GB")


@pytest.mark.parametrize("text,expected", [("wandb", ("tensorboard", "wandb")), ("tensorboard", ("tensorboard",)),
                                           ("none", ()), ("[]", ()), ("tensorboard,wandb", ("tensorboard", "wandb")),
                                           ("[wandb]", ("tensorboard", "wandb"))])
def test_report_to_accepts_a_name_a_list_or_none_on_the_command_line(tmp_path, text, expected):
    assert resolve(write(tmp_path, MINIMAL), parse_overrides(["--report_to", text])).report_to == expected


@pytest.mark.parametrize("line,expected", [("report_to: wandb", ("tensorboard", "wandb")), ("report_to: none", ()),
                                           ("report_to: [wandb]", ("tensorboard", "wandb")), ("report_to: []", ())])
def test_report_to_accepts_a_name_a_list_or_none_in_yaml(tmp_path, line, expected):
    assert resolve(write(tmp_path, MINIMAL + line + "\n")).report_to == expected
    assert resolve(write(tmp_path, MINIMAL, name="default.yaml")).report_to == ("tensorboard",)


@pytest.mark.parametrize("line,needle", [("report_to: wandbb", "unknown value 'wandbb' (did you mean 'wandb'?)"),
                                         ("report_to: [tensorboard, mlflow]", "unknown value 'mlflow'"),
                                         ("report_to: [none, wandb]", "'none' cannot be combined"),
                                         ("report_to: 3", "expected a name or a list of names")])
def test_bad_report_to_names_the_key_and_the_fix(tmp_path, line, needle):
    path = write(tmp_path, MINIMAL + line + "\n")
    with pytest.raises(ConfigError) as error:
        resolve(path)
    message = str(error.value)
    assert str(path) in message and "key 'report_to'" in message and needle in message
    assert "use tensorboard, wandb, a list of them, or none" in message or "use none alone" in message


def test_metric_sinks_follow_the_resolved_report_to(tmp_path, monkeypatch):
    """tensorboard unless report_to is none or empty; wandb only when named (and checked before the run starts):
    the sinks read the resolved config's value as it is."""
    import importlib.util

    from finetune_launcher.history import MetricSinks, check_sinks_available

    def resolved(report_to):
        return resolve(write(tmp_path, MINIMAL), parse_overrides(["--report_to", report_to])).report_to

    def events_written(name, report_to):
        sinks = MetricSinks(tmp_path / name / "tensorboard", resolved(report_to), "run", {})
        sinks.log(1, {"loss": 1.0})
        sinks.close()
        return bool(list((tmp_path / name).rglob("events.out.tfevents*")))

    assert events_written("list", "[tensorboard]") and events_written("string", "tensorboard")
    assert not events_written("empty", "[]") and not events_written("none", "none")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb.init returns a no-op run: nothing leaves the machine
    assert events_written("wandb", "[wandb]") and events_written("wandb-string", "wandb")  # tensorboard as well
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match="report_to includes wandb but wandb is not installed"):
        check_sinks_available(resolved("wandb"))
    check_sinks_available(resolved("none"))
    check_sinks_available(resolved("tensorboard"))


def test_flex_attention_is_an_attention_implementation(tmp_path):
    """FlexAttention with a document mask for packed rows (docs/benchmarks.md, issue 31); a made-up name is refused."""
    assert resolve(write(tmp_path, MINIMAL + "attn_implementation: flex_attention\n")).attn_implementation == \
        "flex_attention"
    with pytest.raises(ConfigError, match="attn_implementation"):
        resolve(write(tmp_path, MINIMAL + "attn_implementation: flexattention\n"))
