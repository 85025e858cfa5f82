"""Offline table of common decoder-only architectures, as their config.json files give them, so the estimator needs
no download. Each entry lists the names it answers to (hub ids, with or without -Instruct); lookups ignore case.

Keys follow transformers' config.json: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, head_dim, vocab_size, tie_word_embeddings; MoE models add num_experts, num_experts_per_tok,
moe_intermediate_size. `qkv_bias`, `qk_norm`, `norms_per_layer` and `final_logit_softcap` describe what the
modeling code adds beyond the sizes (Qwen2 q/k/v biases, Qwen3 q/k norms, Gemma-2's four norms per layer).
"""

ARCHITECTURES = {
    "qwen2.5-0.5b": dict(names=["Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"],
                         hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True),
    "qwen2.5-1.5b": dict(names=["Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct"],
                         hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True),
    "qwen2.5-3b": dict(names=["Qwen/Qwen2.5-3B", "Qwen/Qwen2.5-3B-Instruct"],
                       hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True),
    "qwen2.5-7b": dict(names=["Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"],
                       hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, qkv_bias=True),
    "qwen2.5-14b": dict(names=["Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct"],
                        hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, qkv_bias=True),
    "qwen2.5-32b": dict(names=["Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct"],
                        hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, qkv_bias=True),
    "qwen2.5-72b": dict(names=["Qwen/Qwen2.5-72B", "Qwen/Qwen2.5-72B-Instruct"],
                        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False, qkv_bias=True),
    "qwen3-8b": dict(names=["Qwen/Qwen3-8B", "Qwen/Qwen3-8B-Base"],
                     hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                     qk_norm=True),
    "qwen3-32b": dict(names=["Qwen/Qwen3-32B"],
                      hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                      qk_norm=True),
    "qwen3-30b-a3b": dict(names=["Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B-Base", "Qwen/Qwen3-30B-A3B-Instruct-2507"],
                          hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
                          qk_norm=True, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768),
    "llama-3-8b": dict(names=["meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
                              "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct"],
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3-70b": dict(names=["meta-llama/Meta-Llama-3-70B", "meta-llama/Meta-Llama-3-70B-Instruct",
                               "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                               "meta-llama/Llama-3.3-70B-Instruct"],
                        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "llama-3.2-1b": dict(names=["meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct"],
                         hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3.2-3b": dict(names=["meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"],
                         hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "gemma-2-2b": dict(names=["google/gemma-2-2b", "google/gemma-2-2b-it"],
                       hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                       norms_per_layer=4, final_logit_softcap=True),
    "gemma-2-9b": dict(names=["google/gemma-2-9b", "google/gemma-2-9b-it"],
                       hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=256, vocab_size=256000, tie_word_embeddings=True,
                       norms_per_layer=4, final_logit_softcap=True),
    "mistral-7b": dict(names=["mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1",
                              "mistralai/Mistral-7B-Instruct-v0.2"],
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b-v0.3": dict(names=["mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"],
                            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=32768, tie_word_embeddings=False),
}

# config.json values that change no shape (the estimator does not read them) but what a `random:` model computes.
# Qwen3-30B-A3B (its config.json): the top-8 routing weights renormalised to sum to 1, RoPE base 1e6.
CONFIG_VALUES = {
    "qwen3-30b-a3b": dict(norm_topk_prob=True, router_aux_loss_coef=0.001, max_position_embeddings=40960,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}

# Published parameter counts (model cards / safetensors index), used by the unit tests as an outside check.
PUBLISHED_PARAMS = {
    "llama-3-8b": 8_030_261_248,
    "qwen2.5-7b": 7_615_616_512,
}
