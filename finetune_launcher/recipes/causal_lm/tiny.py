"""The models the causal-LM recipe builds itself, so nothing is downloaded: `builtin:tiny-llama` (and
`builtin:small-llama`), a tiny Llama-architecture causal LM with random weights and a BPE tokenizer trained on the
shipped data, saved like any hub checkpoint (config.json, safetensors, tokenizer files) so the real
`from_pretrained` path loads it. Its recipe-table entry lists them (`builtins`)."""
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token=None)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(name, target):
    """Write config, random weights (safetensors) and tokenizer into `target`, atomically."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = TINY_SPECS[name]
    with built_into(target) as tmp:
        tokenizer = train_tokenizer(spec["vocab_size"])
        config = LlamaConfig(**spec, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=None, tie_word_embeddings=False, rope_theta=10000.0,
                             torch_dtype="float32")
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            # A pretrained LM head has a large norm; at the default init (std 0.02) the frozen head caps the logit
            # range so low that LoRA cannot fit anything. std 0.1 behaves like a real head.
            model.lm_head.weight.mul_(5.0)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(target)
