"""The models the causal-LM recipe builds itself, so nothing is downloaded: `builtin:tiny-llama` (and
`builtin:small-llama`), a tiny Llama-architecture causal LM, and `builtin:tiny-qwen3-moe`, a tiny Qwen3-MoE
(mixture of experts: 8 experts, 2 per token, the fused 3D expert weights transformers stores Qwen3-30B-A3B's in),
each with random weights and a BPE tokenizer trained on the shipped data, saved like any hub checkpoint
(config.json, safetensors, tokenizer files) so the real `from_pretrained` path loads it. Its recipe-table entry
lists them (`builtins`)."""
import json
from pathlib import Path

from finetune_launcher.data.prompts import TINY_CHAT_TEMPLATE, render_instruction_prompt
from finetune_launcher.fsutil import built_into
from finetune_launcher.resources import resource

TINY_SPECS = {
    # ~2M parameters: big enough to learn the synthetic task, small enough for 2 CPU processes.
    "tiny-llama": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=1024),
    # Hidden 512: the "mid-size" shape the activation-memory checks use.
    "small-llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048),
    # Qwen3-30B-A3B's architecture (q/k norms, a top-k softmax router whose top-k weights are renormalised, no
    # shared expert, router_aux_loss_coef 0.001) at a size 2 CPU processes train in seconds (~0.9M parameters).
    "tiny-qwen3-moe": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, vocab_size=1024, max_position_embeddings=1024,
                           num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                           router_aux_loss_coef=0.001),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
TOKENIZER_CORPUS = "data/tiny_instruct.jsonl"


def _corpus_lines():
    with open(resource(TOKENIZER_CORPUS), encoding="utf-8") as f:
        for line in f:
            example = json.loads(line)
            yield render_instruction_prompt(example["instruction"], example["context"]) + example["response"]
    yield "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9"


def train_tokenizer(vocab_size):
    return train_bpe_tokenizer(_corpus_lines(), vocab_size, SPECIAL_TOKENS, eos="<|endoftext|>", pad="<|endoftext|>",
                               chat_template=TINY_CHAT_TEMPLATE)


def train_bpe_tokenizer(lines, vocab_size, special_tokens, eos, pad, chat_template):
    """A byte-level BPE tokenizer trained on `lines` (the embedded models' own; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad, bos_token=None)
    fast.chat_template = chat_template
    return fast


def build_tiny_model(name, target):
    """Write config, random weights (safetensors) and tokenizer into `target`, atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    spec = TINY_SPECS[name]
    config_class, model_class = ((Qwen3MoeConfig, Qwen3MoeForCausalLM) if "num_experts" in spec
                                 else (LlamaConfig, LlamaForCausalLM))
    with built_into(target) as tmp:
        tokenizer = train_tokenizer(spec["vocab_size"])
        config = config_class(**spec, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=None, tie_word_embeddings=False, rope_theta=10000.0,
                              torch_dtype="float32")
        torch.manual_seed(1234)
        model = model_class(config)
        with torch.no_grad():
            # A pretrained LM head has a large norm; at the default init (std 0.02) the frozen head caps the logit
            # range so low that LoRA cannot fit anything. std 0.1 behaves like a real head.
            model.lm_head.weight.mul_(5.0)
        if "num_experts" in spec:
            balance_routers(model, tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(target)


def balance_routers(model, tokenizer, rows=64):
    """Remove from each router the direction of its layer's mean input. At random init every token's hidden state
    shares a large common part, so each router sends most tokens to the same few experts; a trained router does
    not, and with the common part gone the tiny model routes about as evenly as a pretrained MoE does."""
    import torch

    texts = [line for line, _ in zip(_corpus_lines(), range(rows))]
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=128)
    real = batch["attention_mask"].reshape(-1).bool()
    for layer in model.model.layers:  # in order: each layer's inputs after the routers before it are balanced
        seen = []
        hook = layer.mlp.gate.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
        with torch.no_grad():
            model(**batch)
            mean = seen[0].reshape(-1, seen[0].shape[-1])[real].mean(dim=0)
            router = layer.mlp.gate.weight
            router -= torch.outer(router @ mean, mean) / mean.dot(mean)
        hook.remove()
