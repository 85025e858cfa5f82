"""The fused LoRA forward computes the same loss and gradients as peft's own."""
import copy

import torch


def tiny_peft_model(dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=97))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():  # B starts at zero: make the adapter's path matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_matches_peft_loss_and_gradients():
    from train.fused_lora import fuse_lora_layers

    reference = tiny_peft_model()
    fused = copy.deepcopy(reference)
    assert fuse_lora_layers(fused) == 2 * 7  # every linear of both layers
    ids = torch.randint(0, 97, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    loss_ref, grads_ref = loss_and_grads(reference, batch)
    loss_fused, grads_fused = loss_and_grads(fused, batch)
    assert torch.allclose(loss_ref, loss_fused, rtol=1e-5, atol=1e-6)
    assert grads_ref.keys() == grads_fused.keys() and len(grads_ref) == 2 * 7 * 2
    for name, grad in grads_ref.items():
        assert torch.allclose(grad, grads_fused[name], rtol=1e-4, atol=1e-6), name


def test_disabled_adapters_and_dropout_fall_back_to_peft():
    from train.fused_lora import fuse_lora_layers

    assert fuse_lora_layers(tiny_peft_model(dropout=0.1)) == 0
    reference = tiny_peft_model()
    model = copy.deepcopy(reference)
    fuse_lora_layers(model)
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter(), reference.disable_adapter():
            without, base_only = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(without, base_only, atol=1e-6)
    assert not torch.allclose(with_adapter, without, atol=1e-3)
