"""Vision-language prompts and generation after training, on the tiny Qwen3-VL: the prompt generate.py gives the model
is the training row before its answer (tokens and pixels), greedy generation continues it as the model's full
forward would, answers are scored after normalising, and a QLoRA VL adapter merges into the de-quantized base with
the vision tower untouched."""
import json
import shutil

import pytest
import torch

from tests.conftest import REPO, vl_settings
from finetune_launcher.after.generation import GenerationSettings, PromptCase, case_from_record, read_prompt_file
from finetune_launcher.recipes.vision_language.prompts import VLPrompter, generate_vl
from finetune_launcher.recipes.vision_language.evaluation import answers_match, cannot_match, normalise_answer
from finetune_launcher.data.records import DataError
from finetune_launcher.data.text import IGNORE_INDEX
from finetune_launcher.recipes.vision_language.data import load_vl_rows
from finetune_launcher.recipes.vision_language.batching import VLCollator

DATA = REPO / "data" / "tiny_vl"
CPU = torch.device("cpu")
ROWS = {  # (record, which of the shipped files it comes from)
    "image": {"messages": [{"role": "user", "content": "<image>Where is the shape?"},
                           {"role": "assistant", "content": "top"}], "images": ["images/held_0000.png"]},
    "content lists": {"messages": [{"role": "user", "content": [{"type": "image", "image": "images/held_0001.png"},
                                                                {"type": "text", "text": "What shape is it?"}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": "circle"}]}]},
    "two images": {"messages": [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "<image><image>Which colors?"},
                                {"role": "assistant", "content": "blue yellow"}],
                   "images": ["images/held_0000.png", "images/held_0001.png"]},
    "text only": {"messages": [{"role": "user", "content": "Reverse the order of the words.\nred blue"},
                               {"role": "assistant", "content": "blue red"}]},
}


@pytest.fixture(scope="module")
def prompter(vl_processor):
    return VLPrompter(vl_processor)


@pytest.fixture(scope="module")
def base_model(tiny_vl_path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_vl_path).eval()


def training_row(record, processor, tmp_path):
    path = tmp_path / "row.jsonl"
    path.write_text(json.dumps(record) + "\n")
    shutil.copytree(DATA / "images", tmp_path / "images", dirs_exist_ok=True)
    (row,), _ = load_vl_rows(path, processor, 256)
    return row, f"{path}:1"


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_the_prompt_is_the_training_row_before_its_answer(kind, vl_processor, prompter, tmp_path):
    row, where = training_row(ROWS[kind], vl_processor, tmp_path)
    case = case_from_record(ROWS[kind], where, tmp_path)
    answer = ROWS[kind]["messages"][-1]["content"]
    assert case.reference == (answer if isinstance(answer, str) else answer[0]["text"])
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    inputs = prompter.inputs(case)
    assert inputs["input_ids"][0].tolist() == row["input_ids"][:first]
    if row["images"]:
        trained = VLCollator(vl_processor)([row])
        assert torch.equal(inputs["pixel_values"], trained["pixel_values"])
        assert torch.equal(inputs["image_grid_thw"], trained["image_grid_thw"])
        assert torch.equal(inputs["mm_token_type_ids"][0], trained["mm_token_type_ids"][0, :first])
    else:
        assert "pixel_values" not in inputs  # no blank image: that is only for a batch's vision-tower forward


def test_a_prompt_with_image_options_is_the_one_user_turn_training_reads(vl_processor, prompter, tmp_path):
    """generate.py's --prompt / --context / --image: images first, then the text, as the shipped rows are."""
    record = {"messages": [{"role": "user", "content": "<image>Sort the words.\nred blue"},
                           {"role": "assistant", "content": "blue red"}], "images": ["images/held_0002.png"]}
    row, _ = training_row(record, vl_processor, tmp_path)
    case = PromptCase("Sort the words.", "red blue", images=[str(tmp_path / "images" / "held_0002.png")])
    first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
    assert prompter.inputs(case)["input_ids"][0].tolist() == row["input_ids"][:first]


def test_greedy_generation_continues_the_prompt_as_the_full_forward_does(base_model, vl_processor, prompter):
    """The cached generate() (with mm_token_type_ids for the image positions) picks, token by token, what a plain
    forward of the training collator's batch of prompt + answer so far picks."""
    case = PromptCase("What color is the shape?", images=[str(DATA / "images" / "held_0003.png")])
    generated = generate_vl(base_model, prompter, case, GenerationSettings(max_new_tokens=6))
    row = prompter.prompt_row(case)
    collate = VLCollator(vl_processor, pad_to_multiple=1)
    ids = list(row["input_ids"])
    for _ in range(6):
        batch = collate([dict(row, input_ids=ids, labels=[IGNORE_INDEX] * len(ids))])
        batch.pop("labels")
        with torch.no_grad():
            ids.append(int(base_model(**batch).logits[0, -1].argmax()))
        if ids[-1] in prompter.stop_ids:
            break
    expected = vl_processor.tokenizer.decode(ids[len(row["input_ids"]):], skip_special_tokens=True).strip()
    assert generated == expected and generated


def test_answers_are_compared_after_normalising_case_space_and_punctuation():
    assert normalise_answer("  The  Blue\nsquare. ") == "the blue square"
    assert answers_match("Blue, square!", "blue square") and answers_match("TOP", "top.")
    assert not answers_match("blue squares", "blue square") and not answers_match("blue", "blue square")


def test_generation_for_the_accuracy_stops_once_the_answer_cannot_match(vl_processor):
    tokenizer = vl_processor.tokenizer
    prompt = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    stop = cannot_match("Blue square", tokenizer, len(prompt))

    def stops_after(text):
        ids = torch.tensor([prompt + tokenizer(text, add_special_tokens=False)["input_ids"]])
        return bool(stop(ids, None)[0])

    assert not stops_after("blue") and not stops_after("blue ") and not stops_after("Blue sq")
    assert not stops_after("blue square")
    assert stops_after("blue c") and stops_after("red") and stops_after("blue squares")


def test_prompt_files_take_images_relative_to_the_file(tmp_path):
    (tmp_path / "pics").mkdir()
    lines = [{"prompt": "What color?", "image": "pics/a.png"},
             {"prompt": "Which colors?", "images": ["pics/a.png", "pics/b.png"], "reference": "red blue"},
             ROWS["image"], {"prompt": "text only"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    one, two, row, plain = read_prompt_file(path)
    assert one.images == [str(tmp_path / "pics" / "a.png")]
    assert two.images == [str(tmp_path / "pics" / n) for n in ("a.png", "b.png")] and two.reference == "red blue"
    assert row.images == [str(tmp_path / "images" / "held_0000.png")] and row.reference == "top"
    assert row.instruction == "Where is the shape?" and plain.images is None
    path.write_text(json.dumps({"prompt": "x", "images": "pics/a.png"}) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1: 'image' must be an image file path"):
        read_prompt_file(path)


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory, vl_processor):
    """A QLoRA adapter of the tiny Qwen3-VL (NF4 language model, LoRA moved off zero), saved as a run saves it."""
    from finetune_launcher.recipes.vision_language.model import load_vl_model

    model, _ = load_vl_model(vl_settings(mode="qlora"), CPU)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    out = tmp_path_factory.mktemp("vl_qlora") / "best"
    model.save_pretrained(out)
    vl_processor.save_pretrained(out)
    (out / "training_info.json").write_text(json.dumps({"mode": "qlora", "recipe": "vision_language",
                                                        "base_model": "builtin:tiny-qwen3-vl", "max_length": 256}))
    return model.eval(), out


def test_qlora_vl_adapter_merges_into_the_dequantized_base_with_the_vision_tower_untouched(
        qlora_adapter, vl_processor, tiny_vl_path, tmp_path):
    from transformers import AutoModelForImageTextToText

    from finetune_launcher.after.merge import merge_adapter

    four_bit, adapter = qlora_adapter
    rows, _ = load_vl_rows(DATA / "held_out.jsonl", vl_processor, 256)
    batch = VLCollator(vl_processor)(rows[:2])
    batch.pop("labels")
    merge_adapter(adapter, tmp_path / "merged", log=lambda message: None)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    base = AutoModelForImageTextToText.from_pretrained(tiny_vl_path)
    with torch.no_grad():
        diff = float((merged(**batch).logits - four_bit(**batch).logits).abs().max())
    assert diff < 1e-4, diff
    merged_state, base_state = merged.state_dict(), base.state_dict()
    vision = [k for k in base_state if k.startswith("model.visual.")]
    assert vision and all(torch.equal(merged_state[k], base_state[k]) for k in vision)
    language = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged_state[language], base_state[language])


def test_the_saved_processor_loads_with_auto_processor_without_torchvision(tmp_path):
    """The processor a run saves beside its weights (with the run's pixel bounds): transformers builds every Qwen-VL
    processor with a video processor, which needs torchvision (absent here); AutoProcessor with trust_remote_code
    builds it without one, and it gives the training processor's tokens and pixels for an image and text. Without
    trust_remote_code AutoProcessor builds the class recorded, transformers' own (the whole one with torchvision)."""
    from PIL import Image
    from transformers import AutoProcessor

    from finetune_launcher.recipes.vision_language.model import SavedProcessor, load_processor

    trained_with = load_processor(vl_settings(max_pixels=32 * 32))
    SavedProcessor(trained_with).save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}]
    image = Image.open(DATA / "images" / "held_0000.png")
    inputs = [processor(images=[image], text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                        return_tensors="pt") for processor in (trained_with, loaded)]
    assert inputs[0]["input_ids"].tolist() == inputs[1]["input_ids"].tolist()
    assert int((inputs[1]["input_ids"] == loaded.image_token_id).sum()) == 4  # max_pixels 32x32: 4 image tokens
    torch.testing.assert_close(inputs[0]["pixel_values"], inputs[1]["pixel_values"])
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    assert (tmp_path / "video_preprocessor_config.json").is_file()
