"""The vision-language recipe through the real launchers with 2 CPU processes: the embedded default (LoRA, ZeRO-2)
learns, QLoRA (ZeRO-2) quantizes only the language model, the plain-PyTorch ddp engine trains it too, LoRA under
ZeRO-3 trains with text-only and image micro-batches side by side, saved adapters load with peft and change the
model, a killed run resumes with the same losses, and bad images or rows are named before launch."""
import json

import pytest
import torch

from tests.conftest import (REPO, assert_ok, losses_by_step, read_history, run_launcher, train_then_sigkill,
                            vl_settings)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["vl-lora", "vl-qlora", "vl-lora-z3", "vl-lora-ddp"])
def test_vl_runs_learn_and_record_what_the_engine_ran(recipe_runs, name):
    proc, run_dir = recipe_runs[name]
    assert_ok(proc)
    history = read_history(run_dir)
    meta = history["metadata"]
    assert meta["recipe"] == "vision_language" and meta["engine"]["world_size"] == 2
    expected = {"vl-lora": ("deepspeed", 2), "vl-qlora": ("deepspeed", 2), "vl-lora-z3": ("deepspeed", 3),
                "vl-lora-ddp": ("ddp", 0)}[name]
    assert (meta["engine"]["engine"], meta["engine"]["zero_stage"]) == expected
    evals = history["evals"]
    assert evals[0]["step"] == 0 and evals[-1]["eval_loss"] < 0.7 * evals[0]["eval_loss"], evals
    data = meta["data"]
    mixed = data["mixture"]["counts"]["data/tiny_vl/retention.jsonl"]
    assert data["image_rows"] > 0 and mixed <= data["text_rows"] < data["train_rows"], data
    assert data["image_rows"] + data["text_rows"] == data["train_rows"], data
    assert "(image + text)" in proc.stdout and f"{mixed} mixed in from data/tiny_vl/retention.jsonl" in proc.stdout


def test_the_default_run_trains_the_language_model_only(recipe_runs):
    from safetensors.torch import load_file

    _, run_dir = recipe_runs["vl-lora"]
    keys = list(load_file(run_dir / "best" / "adapter_model.safetensors"))
    assert keys and all(".language_model." in k for k in keys), [k for k in keys if ".language_model." not in k][:3]


def test_best_holds_a_processor_auto_processor_builds_without_torchvision(recipe_runs):
    """best/'s processor: AutoProcessor (trust_remote_code: transformers cannot build any Qwen-VL processor without
    torchvision otherwise) builds it here, and it tokenises a picture with the run's processor's image tokens."""
    from PIL import Image
    from transformers import AutoProcessor

    from finetune_launcher.config import RunConfig
    from finetune_launcher.recipes.vision_language.model import load_processor

    _, run_dir = recipe_runs["vl-lora"]
    loaded = AutoProcessor.from_pretrained(run_dir / "best", trust_remote_code=True)
    trained_with = load_processor(RunConfig.from_dict(read_history(run_dir)["metadata"]["config"]))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    image = Image.open(REPO / "data" / "tiny_vl" / "images" / "held_0000.png")
    ids = [processor(images=[image], text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                     return_tensors="pt")["input_ids"].tolist() for processor in (trained_with, loaded)]
    assert ids[0] == ids[1] and loaded.image_token_id in ids[1][0]


def test_zero3_ran_steps_where_one_rank_had_no_image(recipe_runs):
    """The ZeRO-3 run's own sampler, replayed: at some step one rank's micro-batch had no picture (it got the blank
    image, or the two ranks would have gathered different modules and hung) while the other had pictures."""
    from finetune_launcher.config import RunConfig
    from finetune_launcher.recipes.vision_language.data import prepare_vl_data
    from finetune_launcher.recipes.vision_language.batching import LengthGroupedSampler
    from finetune_launcher.recipes.vision_language.model import load_processor

    proc, run_dir = recipe_runs["vl-lora-z3"]
    assert_ok(proc)
    cfg = RunConfig.from_dict(read_history(run_dir)["metadata"]["config"])
    rows = prepare_vl_data(cfg, load_processor(cfg)).train_rows
    samplers = [LengthGroupedSampler(rows, rank, 2, cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.seed)
                for rank in range(2)]
    mixed_steps = 0
    for step in range(cfg.max_steps):
        micro_batches = [s.micro_batches(0, step) for s in samplers]
        for k in range(cfg.gradient_accumulation_steps):  # the ranks' k-th forwards run side by side
            has_images = [any(rows[i]["images"] for i in groups[k]) for groups in micro_batches]
            mixed_steps += has_images[0] != has_images[1]
    assert mixed_steps > 0, "no step put a text-only micro-batch beside an image one"


def vl_logits(model, processor):
    from finetune_launcher.recipes.vision_language.data import tokenize_rows, read_conversations
    from finetune_launcher.recipes.vision_language.batching import VLCollator

    rows, _ = tokenize_rows(read_conversations(REPO / "data" / "tiny_vl" / "held_out.jsonl")[:2], processor, 256)
    with torch.no_grad():
        return model(**VLCollator(processor)(rows)).logits


@pytest.mark.parametrize("which", ["best", "final"])
def test_saved_adapters_load_with_peft_and_change_the_outputs(recipe_runs, which):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from finetune_launcher.models.references import resolve_model_path
    from finetune_launcher.recipes.vision_language.model import load_processor

    _, run_dir = recipe_runs["vl-lora"]
    path = resolve_model_path("builtin:tiny-qwen3-vl")
    processor = load_processor(vl_settings())
    base = vl_logits(AutoModelForImageTextToText.from_pretrained(path).eval(), processor)
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), run_dir / which).eval()
    assert not torch.allclose(vl_logits(tuned, processor), base, atol=1e-3)
    saved = load_processor(vl_settings(model=str(run_dir / which)))  # the processor is saved beside the adapter
    assert saved.image_processor.merge_size == processor.image_processor.merge_size


def test_qlora_quantizes_the_language_model_and_its_adapter_loads(recipe_runs):
    proc, run_dir = recipe_runs["vl-qlora"]
    assert_ok(proc)
    info = json.loads((run_dir / "best" / "training_info.json").read_text())
    assert info["mode"] == "qlora" and info["recipe"] == "vision_language"
    assert read_history(run_dir)["metadata"]["config"]["bnb_4bit_quant_storage"] == "uint8"


def test_a_killed_vl_run_resumes_with_the_same_losses(recipe_runs, tmp_path):
    """vl-lora-z3 killed after step 10 (checkpoint at 8) and rerun: steps 9-16 repeat the uninterrupted run's."""
    _, reference = recipe_runs["vl-lora-z3"]
    script, args = "train_lora.sh", [*recipe_args("vl-lora-z3"), "--output_dir", tmp_path, "--run_name", "killed"]
    train_then_sigkill(script, args, tmp_path / "killed", 10)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-8"
    resumed = run_launcher(script, *args)
    assert_ok(resumed)
    expected, got = losses_by_step(reference), losses_by_step(tmp_path / "killed")
    assert sorted(got) == list(range(1, 17))
    for step in range(9, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    assert read_history(tmp_path / "killed")["metadata"]["resumed_at_steps"] == [8]


def recipe_args(name):
    from tests.conftest import RECIPE_CASES

    return RECIPE_CASES[name][1]


# ---------------------------------------------------------------- bad input, before launch

def conversation(image, answer="red"):
    return {"messages": [{"role": "user", "content": "<image>What color is the shape?"},
                         {"role": "assistant", "content": answer}], "images": [image]}


def test_a_corrupt_image_is_named_with_its_line_before_launch(tmp_path, capsys):
    from tests.conftest import assert_refused_before_launch, launch_here

    (tmp_path / "broken.png").write_bytes(b"not a picture")
    picture = str(REPO / "data" / "tiny_vl" / "images" / "train_0000.png")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [conversation(picture)] * 20 +
                            [conversation("broken.png")]))
    proc = launch_here(capsys, "configs/tiny_vl_lora.yaml", "--dataset", data, "--output_dir", tmp_path)
    assert_refused_before_launch(proc, f"{data}:21", "broken.png")


def test_rows_whose_image_max_length_would_cut_are_refused_by_the_switch(tmp_path, capsys):
    from tests.conftest import assert_refused_before_launch, launch_here

    proc = launch_here(capsys, "configs/tiny_vl_lora.yaml", "--max_length", "12", "--image_overflow", "error",
                       "--output_dir", tmp_path)
    assert_refused_before_launch(proc, "would cut through an image", "image_overflow: drop")
