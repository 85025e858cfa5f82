"""Offline table of vision-language models (Qwen3-VL, Qwen2.5-VL), as their published config.json and
preprocessor_config.json give them, so the pre-flight needs no download. `text` holds the language model's shapes
(the keys of arch_table.py), `vision` the vision tower's (transformers' vision_config keys), `pixels` the image
processor's default bounds (min_pixels / max_pixels: size.shortest_edge / size.longest_edge). Sources are cited in
docs/estimation.md; a unit test builds each entry with transformers on the meta device and compares every count.
"""

QWEN3_VL_VISION = dict(model_type="qwen3_vl", depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                       patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[8, 16, 24])
QWEN2_5_VL_VISION = dict(model_type="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                         fullatt_block_indexes=[7, 15, 23, 31])
QWEN3_VL_PIXELS = dict(min_pixels=65536, max_pixels=16777216)
QWEN2_5_VL_PIXELS = dict(min_pixels=3136, max_pixels=12845056)

VL_ARCHITECTURES = {
    "qwen3-vl-32b": dict(
        names=["Qwen/Qwen3-VL-32B-Instruct", "Qwen/Qwen3-VL-32B-Thinking"],
        text=dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, qk_norm=True),
        vision=dict(QWEN3_VL_VISION, out_hidden_size=5120), pixels=QWEN3_VL_PIXELS),
    "qwen3-vl-8b": dict(
        names=["Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-8B-Thinking"],
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False, qk_norm=True),
        vision=dict(QWEN3_VL_VISION, out_hidden_size=4096), pixels=QWEN3_VL_PIXELS),
    "qwen2.5-vl-7b": dict(
        names=["Qwen/Qwen2.5-VL-7B-Instruct"],
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, qkv_bias=True),
        vision=dict(QWEN2_5_VL_VISION, out_hidden_size=3584), pixels=QWEN2_5_VL_PIXELS),
    "qwen2.5-vl-3b": dict(
        names=["Qwen/Qwen2.5-VL-3B-Instruct"],
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True),
        vision=dict(QWEN2_5_VL_VISION, out_hidden_size=2048), pixels=QWEN2_5_VL_PIXELS),
}

