"""Offline table of diffusers pipelines, as their unet/, vae/ and text_encoder/ config.json files give them, so the
pre-flight needs no download. The counts are not stored: they come from the models diffusers and transformers
build from these configs on the meta device (estimate_meta.py); a unit test holds them to the
published totals below.
"""

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    block_out_channels=[128, 256, 512, 512], sample_size=512, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
SD15_TEXT_ENCODER = dict(
    model_type="clip_text_model", vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

PIPELINES = {
    "sd15": dict(names=["runwayml/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"],
                 unet=SD15_UNET, vae=SD15_VAE, text_encoder=SD15_TEXT_ENCODER, max_tokens=77),
}

# Published parameter counts: SD1.5's UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text encoder 123.06 M; the seed
# log's run printed 862,709,700 parameters for the UNet with LoRA r=16 on to_k/to_q/to_v/to_out.0 (3,188,736).
PUBLISHED_PIPELINE_PARAMS = {
    "sd15": dict(unet=859_520_964, vae=83_653_863, text_encoder=123_060_480, unet_lora_r16_attention=3_188_736),
}
