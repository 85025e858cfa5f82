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
