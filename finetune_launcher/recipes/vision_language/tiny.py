"""Tiny vision-language models the project builds itself (random weights, nothing downloaded):
`builtin:tiny-qwen3-vl` (Qwen3VLForConditionalGeneration) and `builtin:tiny-qwen2.5-vl`
(Qwen2_5_VLForConditionalGeneration).

Each is saved like a hub checkpoint -- config.json, model.safetensors, a byte-level BPE tokenizer trained locally
with Qwen's special tokens, a Qwen-style chat template that renders images, preprocessor_config.json (the Qwen2-VL
image processor; its PIL variant runs without torchvision), video_preprocessor_config.json and
processor_config.json -- so the ecosystem's own `from_pretrained` paths load it. Sized for the synthetic pictures
of data/tiny_vl (64x64): 8-pixel patches merged 2x2 give 16 image tokens per picture.
"""
import json
from pathlib import Path

from finetune_launcher.fsutil import built_into
from finetune_launcher.resources import resource
from finetune_launcher.recipes.causal_lm.tiny import _corpus_lines, train_bpe_tokenizer
from finetune_launcher.recipes.vision_language.estimate_table import VL_ARCHITECTURES
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
VOCAB_SIZE = 1024
TEXT = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, rms_norm_eps=1e-6)
VISION = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8, spatial_merge_size=2,
              temporal_patch_size=2, out_hidden_size=TEXT["hidden_size"])
# The pixel bounds the image processor resizes into by default: 32x32 .. 64x64 (4 .. 16 image tokens).
MIN_PIXELS, MAX_PIXELS = 32 * 32, 64 * 64
IMAGE_MEAN = IMAGE_STD = [0.5, 0.5, 0.5]
TOKENIZER_CORPUS = [f"data/tiny_vl/{name}" for name in ("train.jsonl", "retention.jsonl")]

# Qwen's format: <|im_start|>role\n ... <|im_end|>\n, each image as <|vision_start|><|image_pad|><|vision_end|>
# (the processor repeats <|image_pad|> once per image token). Content may be a string or a list of
# {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _vl_corpus_lines():
    for path in TOKENIZER_CORPUS:
        with open(resource(path), encoding="utf-8") as f:
            for line in f:
                for message in json.loads(line)["messages"]:
                    yield message["content"].replace("<image>", "")
    yield from _corpus_lines()


def train_vl_tokenizer():
    return train_bpe_tokenizer(_vl_corpus_lines(), VOCAB_SIZE, SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>",
                               chat_template=CHAT_TEMPLATE)


def vl_config(kind, tokenizer, text=None, vision=None, rope_theta=10000.0, mrope_section=(8, 4, 4),
              tie_word_embeddings=False):
    """The tiny model's config, or (text / vision overrides) one of a real shape for benchmarks."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    text = {**TEXT, "vocab_size": len(tokenizer), "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"], "bos_token_id": None, **(text or {})}
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE splits the rotary half of each head (tiny: head_dim / 2 = 16) into temporal, height and width sections.
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": list(mrope_section)}
    if kind == "qwen3-vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=head_dim, rope_parameters=dict(rope, mrope_interleaved=True))
        vision = {**VISION, "num_position_embeddings": 64, "deepstack_visual_indexes": [0], **(vision or {})}
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
                             **tokens)
    if kind == "qwen2.5-vl":
        from transformers import Qwen2_5_VLConfig

        text.update(rope_parameters=rope)
        # window_size is in pixels: 32 px = 2x2 merged tokens per attention window; block 1 attends globally.
        vision = {**VISION, "window_size": 32, "fullatt_block_indexes": [1], "hidden_act": "silu", **(vision or {})}
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
                                **tokens)
    raise ValueError(f"unknown tiny VL kind '{kind}'; known: qwen3-vl, qwen2.5-vl")


def image_processor(patch_size=VISION["patch_size"], min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=VISION["spatial_merge_size"],
                                    temporal_patch_size=VISION["temporal_patch_size"], min_pixels=min_pixels,
                                    max_pixels=max_pixels, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def processor_files(kind, patch_size=VISION["patch_size"], pixels=(MIN_PIXELS, MAX_PIXELS)):
    """processor_config.json and video_preprocessor_config.json contents. They are written by hand: building the
    video processor object needs torchvision, which this CPU stack lacks (the GPU stack has it)."""
    processor_class = {"qwen3-vl": "Qwen3VLProcessor", "qwen2.5-vl": "Qwen2_5_VLProcessor"}[kind]
    video_class = {"qwen3-vl": "Qwen3VLVideoProcessor", "qwen2.5-vl": "Qwen2VLVideoProcessor"}[kind]
    video = {"video_processor_type": video_class, "patch_size": patch_size,
             "temporal_patch_size": VISION["temporal_patch_size"], "merge_size": VISION["spatial_merge_size"],
             "size": {"shortest_edge": pixels[0], "longest_edge": pixels[1] * 4},
             "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD, "do_convert_rgb": True, "do_normalize": True,
             "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255, "resample": 3}
    return {"processor_config.json": {"processor_class": processor_class},
            "video_preprocessor_config.json": video}


def build_tiny_vl(kind, target):
    """Write config, random weights (safetensors), tokenizer, chat template and processor configs into `target`,
    atomically (a temporary directory renamed into place)."""
    return build_vl_directory(kind, target)


def build_vl_directory(kind, target, shape=None, pixels=(MIN_PIXELS, MAX_PIXELS), dtype_name="float32",
                       device="cpu", weights=True):
    """The tiny model's directory, or with `shape` (vl_config's keyword arguments, vision.patch_size included) a
    random-init model of a real shape, its weights made on `device` in `dtype_name` (tools/bench_vl.py); with
    `weights=False` only the config (a `random:` shape, built where it trains)."""
    import torch
    from transformers import AutoModelForImageTextToText

    shape = shape or {}
    with built_into(target) as tmp:
        tokenizer = train_vl_tokenizer()
        config = vl_config(kind, tokenizer, **shape)
        if weights:
            torch.manual_seed(1234)
            with torch.device(device):
                model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype_name))
            with torch.no_grad():
                # As in recipes/causal_lm/tiny.py: a frozen head at the default init (std 0.02) caps the logits so low
                # that LoRA cannot fit anything; std 0.1 behaves like a pretrained head.
                model.lm_head.weight.mul_(5.0)
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        else:
            config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        patch = (shape.get("vision") or {}).get("patch_size", VISION["patch_size"])
        image_processor(patch, *pixels).save_pretrained(tmp)
        for name, content in processor_files(kind, patch, pixels).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return Path(target)


# The rotary settings of the published configs the offline table (estimate_table.py) was read from.
RANDOM_VL_ROPE = {"qwen3-vl": dict(rope_theta=5e6, mrope_section=(24, 20, 20)),
                  "qwen2.5-vl": dict(rope_theta=1e6, mrope_section=(16, 24, 24))}
TEXT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size")


def random_vl_shape(arch_key):
    """(kind, vl_config keyword arguments, (min_pixels, max_pixels)) of a vision-language shape of the offline table."""
    entry = VL_ARCHITECTURES[arch_key]
    kind = "qwen3-vl" if entry["vision"]["model_type"] == "qwen3_vl" else "qwen2.5-vl"
    text = {k: v for k, v in entry["text"].items() if k in TEXT_KEYS}
    text["max_position_embeddings"] = 32768
    vision = {k: v for k, v in entry["vision"].items() if k != "model_type"}
    shape = dict(text=text, vision=vision, tie_word_embeddings=entry["text"].get("tie_word_embeddings", False),
                 **RANDOM_VL_ROPE[kind])
    return kind, shape, (entry["pixels"]["min_pixels"], entry["pixels"]["max_pixels"])


SHAPES = VL_ARCHITECTURES  # the recipe table's `random` part: the random:<shape> names this recipe builds


def build(arch_key, target):
    return build_random_vl_directory(arch_key, target)


def build_random_vl_directory(arch_key, target):
    """`random:<vision-language shape>`: config.json, the tiny VL tokenizer and the processor files with the model's
    patch size and pixel bounds, no weights (the trainer builds the model where it trains)."""
    kind, shape, pixels = random_vl_shape(arch_key)
    return build_vl_directory(kind, target, shape, pixels, weights=False)
