"""Padding-free packing must not change the maths: a packed row (restarting position ids, no attention mask) gives
the same loss and gradients as the same examples padded one per row."""
import torch

from finetune_launcher.data.text import IGNORE_INDEX, Example, collate, make_rows


def _examples(tokenizer):
    texts = [("### Instruction:\nSort.\n\n### Response:\n", "1 2 3"),
             ("### Instruction:\nSay hi.\n\n### Response:\n", "hi"),
             ("### Instruction:\nReverse the words.\n\n### Context:\nred blue\n\n### Response:\n", "blue red")]
    examples = []
    for prompt, response in texts:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(p + r, [IGNORE_INDEX] * len(p) + r))
    return examples


def _loss_and_grads(model, batch):
    model.zero_grad()
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = model(**batch, num_items_in_batch=tokens, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_model_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa", dtype=torch.float32)
    examples = _examples(tiny_tokenizer)
    packed_rows = make_rows(examples, 512, packing=True)
    padded_rows = make_rows(examples, 512, packing=False)
    assert len(packed_rows) == 1 and len(padded_rows) == 3
    packed_loss, packed_grads = _loss_and_grads(model, collate(packed_rows, tiny_tokenizer.pad_token_id, True))
    padded_loss, padded_grads = _loss_and_grads(model, collate(padded_rows, tiny_tokenizer.pad_token_id, False))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_without_restarting_positions_packing_would_leak_across_examples(tiny_model_path, tiny_tokenizer):
    """Guards the test above: it must be able to fail."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa", dtype=torch.float32)
    examples = _examples(tiny_tokenizer)
    packed = collate(make_rows(examples, 512, packing=True), tiny_tokenizer.pad_token_id, True)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    padded = collate(make_rows(examples, 512, packing=False), tiny_tokenizer.pad_token_id, False)
    assert not torch.allclose(_loss_and_grads(model, leaky)[0], _loss_and_grads(model, padded)[0], rtol=1e-5)


def _dense_flex_attention(query, key, value, score_mod=None, block_mask=None, enable_gqa=False, scale=None,
                          **_):
    """FlexAttention's maths with its mask evaluated densely: what the fused kernel computes (it has no backward on
    the CPU). The mask is the BlockMask's own mask_mod over every (batch, query, key) position."""
    from torch.nn.attention.flex_attention import create_mask

    if enable_gqa and key.shape[1] != query.shape[1]:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    batch, _, q_len, _ = query.shape
    mask = create_mask(block_mask.mask_mod, batch, None, q_len, key.shape[-2], device=query.device)
    scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ value


def _flex_and_sdpa_on_packed_and_padded(model_path, tokenizer):
    """(the tiny model with FlexAttention, the same with SDPA, the examples packed in rows, the same padded)."""
    from transformers import AutoModelForCausalLM

    flex, sdpa = (AutoModelForCausalLM.from_pretrained(model_path, attn_implementation=kind, dtype=torch.float32)
                  for kind in ("flex_attention", "sdpa"))
    examples = _examples(tokenizer)
    packed = collate(make_rows(examples, 512, packing=True), tokenizer.pad_token_id, True)
    padded = collate(make_rows(examples, 512, packing=False), tokenizer.pad_token_id, False)
    return flex, sdpa, packed, padded


def test_flex_attention_packed_rows_give_the_padded_batch_loss_and_gradients(tiny_model_path, tiny_tokenizer,
                                                                             monkeypatch):
    """attn_implementation: flex_attention: transformers builds a document mask (a BlockMask) from the restarting
    position ids. With the kernel's maths evaluated densely from that BlockMask (FlexAttention has no CPU backward),
    the packed row gives the loss and gradients of the padded SDPA batch; and without the restarting positions the
    same path would leak across examples."""
    monkeypatch.setattr("transformers.integrations.flex_attention.compile_friendly_flex_attention",
                        _dense_flex_attention)
    flex, sdpa, packed, padded = _flex_and_sdpa_on_packed_and_padded(tiny_model_path, tiny_tokenizer)
    packed_loss, packed_grads = _loss_and_grads(flex, packed)
    padded_loss, padded_grads = _loss_and_grads(sdpa, padded)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    leaky = {k: v for k, v in packed.items() if k != "position_ids"}
    assert not torch.allclose(_loss_and_grads(flex, leaky)[0], padded_loss, rtol=1e-5)


def test_flex_attention_kernel_packed_row_gives_the_padded_batch_loss(tiny_model_path, tiny_tokenizer):
    """The real FlexAttention kernel (compiled by inductor for the CPU, forward only: it has no CPU backward) on the
    packed row gives the padded SDPA batch's loss."""
    flex, sdpa, packed, padded = _flex_and_sdpa_on_packed_and_padded(tiny_model_path, tiny_tokenizer)
    tokens = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        flex_loss = flex(**packed, num_items_in_batch=tokens, use_cache=False).loss
        sdpa_loss = sdpa(**padded, num_items_in_batch=tokens, use_cache=False).loss
    torch.testing.assert_close(flex_loss, sdpa_loss, rtol=1e-5, atol=1e-6)
