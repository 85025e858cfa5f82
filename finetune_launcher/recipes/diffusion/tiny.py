"""`builtin:tiny-sd`: a tiny Stable-Diffusion-architecture pipeline with random weights, built locally.

The directory is laid out like runwayml/stable-diffusion-v1-5 (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/; no safety_checker / feature_extractor), so `StableDiffusionPipeline.from_pretrained(path)`
and `UNet2DConditionModel.from_pretrained(path, subfolder="unet")` load it offline as they would the real one.
Sized for 2 CPU processes: 64x64 pictures, a VAE that downsamples 4x (16x16x4 latents), a UNet of channels
(32, 64) with cross-attention in every block, a 2-layer CLIP text encoder of width 32.
"""
import json
from pathlib import Path

from finetune_launcher.fsutil import built_into
from finetune_launcher.resources import resource

CAPTIONS_DIR = "data/tiny_sd"
TEXT_WIDTH = 32
MAX_TOKENS = 77  # SD1.5's tokenizer.model_max_length
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
# SD1.5's scheduler/scheduler_config.json: the DDPM training schedule (scaled_linear betas, epsilon prediction)
# with the PNDM sampler its model_index names.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                      trained_betas=None)


def caption_corpus():
    """The shipped captions (the tokenizer's merges are learnt from them) and a pangram for the other letters."""
    for metadata in sorted(resource(CAPTIONS_DIR).glob("*/metadata.jsonl")):
        for line in metadata.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)["text"]
    yield "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9"


def train_clip_tokenizer(vocab_size=512):
    """A CLIPTokenizer (byte-level BPE with CLIP's lowercasing, word splitting and '</w>' word ends) whose merges
    are learnt from the shipped captions; every byte, word-final or not, is in the vocabulary, so any prompt
    encodes without unknown tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    template = CLIPTokenizer()  # only for CLIP's normalizer and pre-tokenizer
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tokenizer.normalizer = template.backend_tokenizer.normalizer
    tokenizer.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CLIP_SPECIALS, end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(caption_corpus(), trainer=trainer)
    learnt = json.loads(tokenizer.to_str())["model"]
    vocab = dict(learnt["vocab"])
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def tiny_components(tokenizer):
    """(unet, vae, text_encoder) with random weights (seeded), in fp32."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1234)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=TEXT_WIDTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
                        block_out_channels=(16, 32, 32), sample_size=64,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8, norm_num_groups=16)
    return unet, vae, text_encoder


def calibrate_latent_scale(vae):
    """SD scales latents to unit variance (0.18215 for its VAE); the same factor for this random VAE, measured on
    the shipped training pictures."""
    import numpy as np
    import torch
    from PIL import Image

    files = sorted((resource(CAPTIONS_DIR) / "train").glob("*.png"))[:32]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) for f in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    return round(float(1.0 / latents.std()), 5)


def build_tiny_sd(target):
    """Write the tiny pipeline into `target` atomically (a temporary sibling directory renamed into place)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    with built_into(target) as tmp:
        tokenizer = train_clip_tokenizer()
        unet, vae, text_encoder = tiny_components(tokenizer)
        vae.register_to_config(scaling_factor=calibrate_latent_scale(vae))
        pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=PNDMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                           feature_extractor=None, image_encoder=None,
                                           requires_safety_checker=False)
        pipeline.save_pretrained(tmp, safe_serialization=True)
    return Path(target)
