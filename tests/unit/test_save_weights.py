"""best/ and final/ through the savers the loop calls (checkpoint.save_weights with an engine's full_state_dict): a
vision-language LoRA whose merger trains too (peft's modules_to_save) is written once, in peft's format, and
reloads to the same outputs."""
from types import SimpleNamespace

import torch

from tests.conftest import vl_settings

CPU = torch.device("cpu")


def test_a_vl_adapter_with_a_trained_merger_saves_and_reloads(tiny_vl_path, vl_processor, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    from finetune_launcher.checkpoint import save_weights
    from finetune_launcher.engines.plain import PlainEngine
    from finetune_launcher.recipes.vision_language.model import load_vl_model

    torch.manual_seed(0)
    model, _ = load_vl_model(vl_settings(train_merger=True), CPU)
    engine = PlainEngine(model, SimpleNamespace(precision="fp32", gradient_accumulation_steps=1, max_grad_norm=1.0),
                         torch.optim.AdamW, CPU, 1)
    with torch.no_grad():  # as if trained: adapters and merger away from their initial values
        for param in engine.params:
            param.add_(0.05 * torch.randn_like(param))
    save_weights(engine, model, vl_processor, tmp_path / "best", "lora", 0, {"step": 1})
    with safe_open(str(tmp_path / "best" / "adapter_model.safetensors"), "pt") as saved:
        keys = list(saved.keys())
    assert any("visual.merger." in k for k in keys) and any("lora_A" in k for k in keys)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vl_path), tmp_path / "best")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
