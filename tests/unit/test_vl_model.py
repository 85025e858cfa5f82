"""Vision-language model loading: the tiny Qwen-VL models reload through the ecosystem's from_pretrained, LoRA
targets the language model only (the vision tower with lora_vision), the merger trains and saves with the adapter,
QLoRA quantizes the language model only, and a few LoRA steps on a fixed batch lower the loss."""
import shutil

import pytest
import torch

from tests.conftest import REPO, vl_settings
from finetune_launcher.config import ConfigError
from finetune_launcher.data.text import supervised_tokens
from finetune_launcher.recipes.vision_language.data import load_vl_rows
from finetune_launcher.recipes.vision_language.batching import VLCollator
from finetune_launcher.recipes.vision_language.model import load_processor, load_vl_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch(vl_processor, tmp_path_factory):
    """A fixed micro-batch of 8 shipped rows (image and text rows)."""
    root = tmp_path_factory.mktemp("vl")
    shutil.copytree(REPO / "data" / "tiny_vl" / "images", root / "images")
    lines = (REPO / "data" / "tiny_vl" / "train.jsonl").read_text().splitlines()[:8]
    (root / "d.jsonl").write_text("\n".join(lines) + "\n")
    rows, stats = load_vl_rows(root / "d.jsonl", vl_processor, 256)
    assert stats.image_rows and stats.text_rows
    return VLCollator(vl_processor)(rows)


@pytest.fixture(scope="module")
def tiny_qwen25_vl():
    from finetune_launcher.models.references import resolve_model_path

    return resolve_model_path("builtin:tiny-qwen2.5-vl")


def lora_modules(model):
    return sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                  if hasattr(module, "lora_A") and module.lora_A)


def trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


def loss_of(model, batch):
    return model(**batch, num_items_in_batch=supervised_tokens(batch)).loss


@pytest.mark.parametrize("ref, model_class, processor_base", [
    ("builtin:tiny-qwen3-vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    ("builtin:tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
])
def test_tiny_models_reload_with_from_pretrained(ref, model_class, processor_base, tmp_path):
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer
    from transformers.utils import is_torchvision_available

    from finetune_launcher.models.references import resolve_model_path

    path = resolve_model_path(ref)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(model).__name__ == model_class
    for token in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert AutoImageProcessor.from_pretrained(path).patch_size == config.vision_config.patch_size
    processor = load_processor(vl_settings(model=ref))
    assert processor_base in [c.__name__ for c in type(processor).__mro__]
    if is_torchvision_available():  # the GPU stack: the ecosystem's AutoProcessor itself
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(path)).__name__ == processor_base
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    # the saved weights are the built ones (not re-initialised on load)
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_lora_steps_on_a_fixed_batch_lower_the_loss(batch, tiny_vl_path):
    torch.manual_seed(0)
    model, keepalive = load_vl_model(vl_settings(lora_r=16, lora_alpha=32), CPU)
    assert keepalive is None
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_compiled_language_model_layers_give_the_eager_loss_and_gradients(batch, tiny_vl_path, monkeypatch):
    """compile_layers: the language model's decoder layers only (not the vision blocks), with LoRA inside them;
    aot_eager backend (dynamo + AOT autograd without inductor's CPU code generation)."""
    from finetune_launcher.models.compiled_layers import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "aot_eager")
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model, _ = load_vl_model(vl_settings(lora_vision=True, compile_layers=compiled), CPU)
        loss = loss_of(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (loss, grads) = results
    compiled_layers = [n for n, m in model.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert compiled_layers and all(n.startswith("base_model.model.model.language_model.layers.")
                                   for n in compiled_layers), compiled_layers
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and any(".visual." in n for n in grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_default_lora_targets_the_language_model_only(tiny_vl_path):
    model, _ = load_vl_model(vl_settings(), CPU)
    targets = lora_modules(model)
    assert targets and all(n.startswith("model.language_model.layers.") for n in targets)
    assert {n.rpartition(".")[2] for n in targets} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"}
    assert all(".lora_" in n for n in trainable(model))


def test_lora_vision_adds_the_vision_tower_but_not_the_mergers(tiny_vl_path):
    model, _ = load_vl_model(vl_settings(lora_vision=True), CPU)
    vision = [n for n in lora_modules(model) if n.startswith("model.visual.")]
    assert vision and all(n.startswith("model.visual.blocks.") for n in vision)
    assert any(n.startswith("model.language_model.") for n in lora_modules(model))


def test_named_targets_skip_same_named_vision_layers(tiny_qwen25_vl):
    """Qwen2.5-VL's vision blocks have gate/up/down_proj too: names match the language model unless lora_vision."""
    ref = "builtin:tiny-qwen2.5-vl"
    model, _ = load_vl_model(vl_settings(model=ref, lora_target_modules=("q_proj", "gate_proj")), CPU)
    assert {n.rpartition(".")[2] for n in lora_modules(model)} == {"q_proj", "gate_proj"}
    assert all(n.startswith("model.language_model.") for n in lora_modules(model))
    model, _ = load_vl_model(vl_settings(model=ref, lora_target_modules=("q_proj", "gate_proj"), lora_vision=True),
                             CPU)
    assert any(n.startswith("model.visual.blocks.") and n.endswith("gate_proj") for n in lora_modules(model))


def test_unknown_target_names_are_refused_with_the_available_names(tiny_vl_path):
    with pytest.raises(ConfigError, match=r"none of \['query'\] is a linear layer of the language model.*q_proj"):
        load_vl_model(vl_settings(lora_target_modules=("query",)), CPU)
    with pytest.raises(ConfigError, match=r"vision tower .*qkv.*lora_vision: false"):
        load_vl_model(vl_settings(lora_target_modules=("q_proj",), lora_vision=True), CPU)


def test_trained_merger_is_saved_with_the_adapter_and_reloads(batch, tiny_vl_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model, _ = load_vl_model(vl_settings(train_merger=True), CPU)
    assert any(n.startswith("base_model.model.model.visual.merger.") for n in trainable(model))
    assert any(".deepstack_merger_list.0." in n for n in trainable(model))
    assert not any(".blocks." in n for n in trainable(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(3):
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        trained = model(**inputs).logits
        base = AutoModelForImageTextToText.from_pretrained(tiny_vl_path).eval()
        untouched = base(**inputs).logits
        reloaded = PeftModel.from_pretrained(base, tmp_path).eval()(**inputs).logits
    torch.testing.assert_close(reloaded, trained)
    assert not torch.allclose(untouched, trained, atol=1e-3)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert any("visual.merger." in k for k in f.keys())


def test_qlora_quantizes_the_language_model_only(batch, tiny_vl_path):
    import bitsandbytes as bnb

    model, _ = load_vl_model(vl_settings(mode="qlora", precision="bf16"), CPU)
    base = model.get_base_model()
    language = [m.base_layer for n, m in base.named_modules() if n.startswith("model.language_model.") and
                hasattr(m, "base_layer")]  # the LoRA-wrapped linears: 7 per layer
    vision = [m for n, m in base.named_modules() if n.startswith("model.visual.") and isinstance(m, torch.nn.Linear)]
    assert len(language) == 7 * base.config.text_config.num_hidden_layers
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in language)
    assert vision and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision)
    assert all(m.weight.dtype == torch.bfloat16 for m in vision)  # the compute dtype, not fp32
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)
    weight = language[0].weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
    loss = loss_of(model, batch)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads)


def test_full_mode_freezes_the_vision_tower_and_trains_the_merger_on_request(tiny_vl_path):
    model, _ = load_vl_model(vl_settings(mode="full"), CPU)
    names = trainable(model)
    assert any(n.startswith("model.language_model.") for n in names) and "lm_head.weight" in names
    assert not any(n.startswith("model.visual.") for n in names)
    model, _ = load_vl_model(vl_settings(mode="full", train_merger=True), CPU)
    vision = [n for n in trainable(model) if n.startswith("model.visual.")]
    assert vision and all(".merger." in n or ".deepstack_merger_list." in n for n in vision)


def test_saved_processor_records_the_real_class_and_reloads(vl_processor, batch, tmp_path):
    import json

    vl_processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] == "Qwen3VLProcessor"
    again = load_processor(vl_settings(model=str(tmp_path)))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where?"}]}]
    assert again.apply_chat_template(messages, tokenize=False) == vl_processor.apply_chat_template(messages,
                                                                                                   tokenize=False)
    assert again.image_processor.size["longest_edge"] == vl_processor.image_processor.size["longest_edge"]


def test_gradient_checkpointing_gives_the_same_lora_gradients(batch, tiny_vl_path):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, _ = load_vl_model(vl_settings(gradient_checkpointing=checkpointing), CPU)
        model.train()
        loss_of(model, batch).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4)
