from pathlib import Path

import pytest

from train.config import ConfigError, load_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]
MINIMAL = "mode: lora\nmodel: builtin:tiny-llama\ndataset: data/tiny_instruct.jsonl\n"


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unknown_key_is_an_error_naming_file_key_and_fix(tmp_path):
    path = write(tmp_path, MINIMAL + "lora_rank: 8\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "unknown key 'lora_rank'" in message and "did you mean 'lora_r'" in message


def test_wrong_type_names_the_key_and_value(tmp_path):
    path = write(tmp_path, MINIMAL + "micro_batch_size: four\n")
    with pytest.raises(ConfigError, match=r"key 'micro_batch_size'.*'four'"):
        load_config(path)


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="'dataset' is a required property"):
        load_config(write(tmp_path, "mode: lora\nmodel: x\n"))


def test_bad_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "mode: [lora\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_overrides_are_typed_and_aliased():
    overrides = parse_overrides(["--lora_r", "8", "--zero", "3", "--offload", "--learning_rate", "1e-4",
                                 "--lora_target_modules", "q_proj,v_proj", "--max_steps=5", "--resume"])
    assert overrides == {"lora_r": 8, "zero_stage": 3, "offload": True, "learning_rate": "1e-4",
                         "lora_target_modules": ["q_proj", "v_proj"], "max_steps": 5, "resume": True}


def test_overrides_apply_over_the_file_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, parse_overrides(["--learning_rate", "1e-4", "--resume"]))
    assert config["learning_rate"] == pytest.approx(1e-4) and config["resume"] == "always"
    with pytest.raises(ConfigError, match="command-line overrides"):
        load_config(path, {"zero_stage": 4})


def test_qlora_zero3_with_uint8_storage_is_refused_with_the_fix(tmp_path):
    path = write(tmp_path, MINIMAL.replace("lora", "qlora", 1) + "zero_stage: 3\nbnb_4bit_quant_storage: uint8\n")
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage"):
        load_config(path)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config["mode"] in ("full", "lora", "qlora")
    header = path.read_text().splitlines()[:12]
    assert any("bash launch/" in line or "sbatch" in line for line in header), \
        f"{path.name}: the header comment must give the exact command that runs it"


QLORA_ZERO3 = MINIMAL.replace("lora", "qlora", 1) + "zero_stage: 3\n"


@pytest.mark.parametrize("precision,storage", [("bf16", "float16"), ("fp16", "bfloat16"), ("fp32", "bfloat16"),
                                               ("bf16", "float32")])
def test_qlora_zero3_storage_must_equal_the_explicit_precisions_dtype(tmp_path, precision, storage):
    path = write(tmp_path, QLORA_ZERO3 + f"precision: {precision}\nbnb_4bit_quant_storage: {storage}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    wanted = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    assert f"bnb_4bit_quant_storage '{storage}'" in message and f"precision {precision} computes in {wanted}" in message
    assert "bnb_4bit_quant_storage: auto" in message


@pytest.mark.parametrize("precision,storage", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"),
                                               ("auto", "auto"), ("bf16", "auto"), ("auto", "float16")])
def test_qlora_zero3_storage_matching_or_auto_is_accepted(tmp_path, precision, storage):
    config = load_config(write(tmp_path, QLORA_ZERO3 + f"precision: {precision}\nbnb_4bit_quant_storage: {storage}\n"))
    assert config["bnb_4bit_quant_storage"] == storage


def test_qlora_zero3_storage_is_checked_against_the_resolved_precision_at_load(tmp_path):
    """precision auto is resolved at run time: the model side refuses a storage dtype that does not match it."""
    import torch

    from train.model import quantization_config

    config = load_config(write(tmp_path, QLORA_ZERO3 + "bnb_4bit_quant_storage: float16\n"))  # precision auto
    with pytest.raises(ConfigError) as error:
        quantization_config(config, "bf16")
    message = str(error.value)
    assert "bnb_4bit_quant_storage 'float16'" in message and "precision bf16" in message
    assert "bfloat16" in message and "bnb_4bit_quant_storage: auto" in message
    assert quantization_config(config, "fp16").bnb_4bit_quant_storage == torch.float16
    auto = load_config(write(tmp_path, QLORA_ZERO3, name="auto.yaml"))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        assert quantization_config(auto, precision).bnb_4bit_quant_storage == dtype
    zero2 = load_config(write(tmp_path, MINIMAL.replace("lora", "qlora", 1), name="z2.yaml"))
    assert quantization_config(zero2, "bf16").bnb_4bit_quant_storage == torch.uint8


@pytest.mark.parametrize("text,expected", [("wandb", ["tensorboard", "wandb"]), ("tensorboard", ["tensorboard"]),
                                           ("none", []), ("[]", []), ("tensorboard,wandb", ["tensorboard", "wandb"]),
                                           ("[wandb]", ["tensorboard", "wandb"])])
def test_report_to_accepts_a_name_a_list_or_none_on_the_command_line(tmp_path, text, expected):
    config = load_config(write(tmp_path, MINIMAL), parse_overrides(["--report_to", text]))
    assert config["report_to"] == expected


@pytest.mark.parametrize("line,expected", [("report_to: wandb", ["tensorboard", "wandb"]), ("report_to: none", []),
                                           ("report_to: [wandb]", ["tensorboard", "wandb"]), ("report_to: []", [])])
def test_report_to_accepts_a_name_a_list_or_none_in_yaml(tmp_path, line, expected):
    assert load_config(write(tmp_path, MINIMAL + line + "\n"))["report_to"] == expected
    assert load_config(write(tmp_path, MINIMAL, name="default.yaml"))["report_to"] == ["tensorboard"]


@pytest.mark.parametrize("line,needle", [("report_to: wandbb", "unknown value 'wandbb' (did you mean 'wandb'?)"),
                                         ("report_to: [tensorboard, mlflow]", "unknown value 'mlflow'"),
                                         ("report_to: [none, wandb]", "'none' cannot be combined"),
                                         ("report_to: 3", "expected a name or a list of names")])
def test_bad_report_to_names_the_key_and_the_fix(tmp_path, line, needle):
    path = write(tmp_path, MINIMAL + line + "\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "key 'report_to'" in message and needle in message
    assert "use tensorboard, wandb, a list of them, or none" in message or "use none alone" in message


def test_metric_sinks_follow_report_to(tmp_path, monkeypatch):
    """tensorboard unless report_to is none or empty; wandb only when named (and checked before the run starts)."""
    import importlib.util

    from train.history import MetricSinks, check_sinks_available

    def events_written(name, report_to):
        sinks = MetricSinks(tmp_path / name / "tensorboard", report_to, "run", {})
        sinks.log(1, {"loss": 1.0})
        sinks.close()
        return bool(list((tmp_path / name).rglob("events.out.tfevents*")))

    assert events_written("list", ["tensorboard"]) and events_written("string", "tensorboard")
    assert not events_written("empty", []) and not events_written("none", "none")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # wandb.init returns a no-op run: nothing leaves the machine
    assert events_written("wandb", ["wandb"]) and events_written("wandb-string", "wandb")  # tensorboard as well
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "wandb" else real_find_spec(name, *args))
    with pytest.raises(ConfigError, match="report_to includes wandb but wandb is not installed"):
        check_sinks_available("wandb")
    check_sinks_available("none")
    check_sinks_available(["tensorboard"])
