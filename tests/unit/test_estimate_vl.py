"""The estimator's vision-language parts against the ecosystem: the offline table's counts against the models
transformers builds on the meta device, image tokens against the real Qwen2-VL image processor, what a vision
tower keeps for backward against autograd's saved-tensor hooks on the tiny Qwen3-VL, the data sample against the
project's own reader."""
import json
from dataclasses import replace

import pytest
import torch

from finetune_launcher.estimate import RunSpec, count_params, estimate, load_architecture, spec_from_config
from finetune_launcher.estimate.architectures import architecture_from_table
from finetune_launcher.recipes.vision_language.estimate_tower import image_tokens, vision_activation_terms
from finetune_launcher.recipes.vision_language.estimate_table import VL_ARCHITECTURES


def table_config(key):
    from transformers import AutoConfig

    entry = VL_ARCHITECTURES[key]
    vision = {k: v for k, v in entry["vision"].items() if k != "model_type"}
    text = {k: v for k, v in entry["text"].items() if k not in ("qk_norm", "qkv_bias")}
    return AutoConfig.for_model(entry["vision"]["model_type"], text_config=text, vision_config=vision,
                                tie_word_embeddings=text["tie_word_embeddings"])


def numel(parameters):
    return sum(p.numel() for p in parameters)


@pytest.mark.parametrize("key", sorted(VL_ARCHITECTURES))
def test_vl_table_counts_equal_the_meta_device_model(key, tmp_path):
    """Every count of a table entry, torch-free, equals the model transformers builds from the same config; and the
    config.json path reads the same vision tower."""
    from transformers import AutoModelForImageTextToText

    config = table_config(key)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    arch = architecture_from_table(key)
    counts = count_params(arch, RunSpec(model=key, mode="qlora"))
    visual = model.model.visual
    assert counts.total - counts.lora == numel(model.parameters())
    assert counts.vision == arch.vision.params == numel(visual.parameters())
    assert arch.vision.merger_params() == sum(numel(m.parameters()) for n, m in visual.named_children()
                                              if "merger" in n)
    decoder_linears = [m.weight.numel() for m in model.model.language_model.modules()
                       if isinstance(m, torch.nn.Linear)]
    assert sorted(counts.quantized_sizes) == sorted(decoder_linears)  # NF4: the language model only
    config.save_pretrained(tmp_path / key)
    assert load_architecture(str(tmp_path / key)).vision == arch.vision


@pytest.mark.parametrize("patch,size,bounds", [
    (16, (640, 480), (65536, 16777216)), (16, (1920, 1080), (65536, 262144)), (16, (50, 300), (65536, 262144)),
    (14, (333, 517), (3136, 12845056)), (14, (1280, 720), (3136, 200704)), (14, (30, 20), (3136, 12845056))])
def test_image_tokens_equal_the_image_processor(patch, size, bounds):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                         min_pixels=bounds[0], max_pixels=bounds[1])
    grid = processor(images=[Image.new("RGB", size, (120, 30, 200))], return_tensors="pt")["image_grid_thw"]
    key = "qwen3-vl-8b" if patch == 16 else "qwen2.5-vl-3b"
    assert image_tokens(architecture_from_table(key).vision, *size, *bounds) == int(grid.prod()) // 4


def saved_bytes(module, *inputs):
    """Bytes autograd keeps for backward in one forward (each storage once, parameters left out)."""
    from finetune_launcher.profiling import kept_for_backward

    with kept_for_backward(module) as kept:
        module(*inputs)
    return sum(kept.values())


@pytest.mark.parametrize("train_merger", [False, True])
def test_vision_tower_keeps_what_the_estimate_says(train_merger):
    """The tiny Qwen3-VL's tower on two 64x64 pictures: frozen it keeps nothing for backward; with its mergers
    training they keep what the estimate counts (within 15%)."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from finetune_launcher.models.references import resolve_model_path
    from finetune_launcher.recipes.vision_language.tiny import image_processor

    path = resolve_model_path("builtin:tiny-qwen3-vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.requires_grad_(False)
    visual = model.model.visual
    for name, param in visual.named_parameters():
        param.requires_grad = train_merger and "merger" in name
    pictures = image_processor()(images=[Image.new("RGB", (64, 64), c) for c in ("red", "blue")], return_tensors="pt")
    measured = saved_bytes(visual, pictures["pixel_values"], pictures["image_grid_thw"])
    spec = RunSpec(model=str(path), mode="lora", micro_batch_size=2, image_size=(64, 64), train_merger=train_merger,
                   recipe="vision_language", packing=False)
    predicted = sum(vision_activation_terms(load_architecture(str(path)).vision, spec, 4).values())
    if train_merger:
        assert measured == pytest.approx(predicted, rel=0.15)
    else:
        assert measured == predicted == 0


def test_vl_data_sample_gives_pictures_per_row_and_size():
    """The shipped tiny VL config: pictures per row over the mixture (90% task rows, 10% text-only retention) and the
    mean picture size, against the project's own reader on the same first rows."""
    from PIL import Image

    from finetune_launcher.config import resolve_run_config
    from finetune_launcher.config.machine import named
    from finetune_launcher.recipes.vision_language.data import read_conversations

    config = resolve_run_config("configs/tiny_vl_lora.yaml", procs_per_node=1, machine=named("cpu"),
                                require_model=False).as_dict()
    spec = spec_from_config(config, 1, 1, gpu="cpu")
    rows = read_conversations(config["dataset"])[:200]
    sizes = [Image.open(p).size for _, _, paths in rows for p in paths]
    pool = read_conversations(config["mix_datasets"][0]["dataset"])[:200]
    per_row = 0.9 * len(sizes) / len(rows) + 0.1 * sum(len(p) for _, _, p in pool) / len(pool)
    assert spec.images_per_row == pytest.approx(per_row)
    assert spec.image_size == (round(sum(w for w, _ in sizes) / len(sizes)), round(sum(h for _, h in sizes) /
                                                                                  len(sizes)))
    assert spec.packing is False and spec.recipe == "vision_language"


def test_bigger_pictures_cost_more_memory_and_time():
    base = RunSpec(model="Qwen/Qwen3-VL-8B-Instruct", mode="lora", gpu="A100-80GB", max_length=4096,
                   recipe="vision_language", packing=False, train_merger=True)
    small = estimate(replace(base, image_size=(448, 448)), calibration={}, with_alternatives=False)
    large = estimate(replace(base, image_size=(1344, 1344)), calibration={}, with_alternatives=False)
    data = small.to_json(), large.to_json()
    assert [d["image_tokens_per_image"] for d in data] == [196, 1764]
    assert large.memory["activations"] > small.memory["activations"]
    assert large.timing["terms"]["vision_s"] > 8 * small.timing["terms"]["vision_s"]


def test_cli_image_size_flag_and_a_bad_one(capsys):
    from tools.estimate_time import main

    argv = ["--model", "Qwen/Qwen2.5-VL-7B-Instruct", "--mode", "qlora", "--gpu", "A100-40GB", "--seq-len", "2048",
            "--json", "--no-calibration"]
    assert main(argv + ["--image-size", "640x480", "--images-per-row", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["image_size"] == [640, 480] and data["images_per_row"] == 2 and data["inputs"]["packing"] is False
    with pytest.raises(SystemExit):
        main(argv + ["--image-size", "640-480"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err
