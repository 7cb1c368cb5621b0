"""Folders in the exact layouts of real checkpoints, built from config with tiny sizes:
Wan-AI/Wan2.1-T2V-1.3B-Diffusers (UMT5 + T5 tokenizer, sharded transformer, UniPC flow scheduler),
Wan-AI/Wan2.1-I2V-14B-480P-Diffusers and Wan2.1-FLF2V-14B-720P-diffusers (the same + CLIP vision encoder and image
processor, a 36-channel transformer with an image branch) and damo-vilab/text-to-video-ms-1.7b (CLIP text model +
tokenizer, UNet3D, DDIM)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "red", "ball", "blue", "square", "bouncing", "on", "black", "background", "the", "moving", "left"]


def t5_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0 - i * 0.1) for i, w in enumerate(WORDS)]
    vocab += [(c, -10.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("▁", -5.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_tokenizer():
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def noise_image(seed: int, size: tuple[int, int] = (32, 32)):
    """A random RGB image of (width, height)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def umt5_encoder(tokenizer):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                       num_heads=4, relative_attention_num_buckets=8))


def wan_transformer(**config):
    """A tiny WanTransformer3DModel (config: the image branch's keys, the channels)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**{
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16,
        "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32, **config})


def wan_vae_and_scheduler():
    """A tiny causal AutoencoderKLWan, and Wan2.1's shipped scheduler config."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler

    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000, solver_order=2)
    return vae, scheduler


def build_wan21(path: Path, seed: int = 0) -> Path:
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = umt5_encoder(tokenizer)
    transformer = wan_transformer()
    vae, scheduler = wan_vae_and_scheduler()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    # The real checkpoint shards its big components: do the same so sharded loading is exercised.
    transformer.save_pretrained(path / "transformer", safe_serialization=True, max_shard_size="100KB")
    return path


def build_wan22_a14b(path: Path, seed: int = 0) -> Path:
    """Wan2.2-T2V-A14B's layout: a high-noise `transformer` and a low-noise `transformer_2`, switched at
    boundary_ratio 0.875 of the training timesteps."""
    from diffusers import WanPipeline

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    vae, scheduler = wan_vae_and_scheduler()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=umt5_encoder(tokenizer), transformer=wan_transformer(),
                       transformer_2=wan_transformer(), vae=vae, scheduler=scheduler, boundary_ratio=0.875)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_wan21_i2v(path: Path, seed: int = 0, first_last: bool = False) -> Path:
    """Wan2.1-I2V's layout (first_last: Wan2.1-FLF2V's, whose image embedder has positions for two images)."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = umt5_encoder(tokenizer)
    # CLIP ViT at 32 px in 8 px patches: 16 + 1 tokens (the real ViT-H/14 at 224 px: 257).
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                                                     num_attention_heads=4, image_size=32, patch_size=8,
                                                     projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformer = wan_transformer(in_channels=36, image_dim=24, added_kv_proj_dim=32,
                                  pos_embed_seq_len=2 * 17 if first_last else None)
    vae, scheduler = wan_vae_and_scheduler()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                                   scheduler=scheduler, image_encoder=image_encoder, image_processor=image_processor)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_modelscope(path: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=1, num_attention_heads=4,
                                                max_position_embeddings=77, bos_token_id=0, eos_token_id=1))
    unet = UNet3DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, in_channels=4, out_channels=4, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4, in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, layers_per_block=1)
    # text-to-video-ms-1.7b's shipped scheduler config.
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                 scheduler=scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def model_index(path: Path) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())


def build_wan22_ti2v(path: Path, seed: int = 0) -> Path:
    """Wan2.2-TI2V-5B's layout: one transformer on the Wan2.2 VAE's 48 channels (16x space, 2x2 pixel patches,
    residual), per-token timesteps (expand_timesteps)."""
    from diffusers import AutoencoderKLWan, WanPipeline

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=16, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                           temperal_downsample=[False, True, True], latents_mean=[0.1 * (i % 5) for i in range(48)],
                           latents_std=[1.0 + 0.1 * (i % 3) for i in range(48)])
    _, scheduler = wan_vae_and_scheduler()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=umt5_encoder(tokenizer),
                       transformer=wan_transformer(in_channels=48, out_channels=48), vae=vae, scheduler=scheduler,
                       expand_timesteps=True)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_wan22_i2v_a14b(path: Path, seed: int = 0) -> Path:
    """Wan2.2-I2V-A14B's layout: WanImageToVideoPipeline with two experts (switched at 0.9) that have no image
    branch (the image reaches them through 36 input channels alone), and no image encoder."""
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    vae, scheduler = wan_vae_and_scheduler()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=umt5_encoder(tokenizer),
                                   transformer=wan_transformer(in_channels=36),
                                   transformer_2=wan_transformer(in_channels=36), vae=vae, scheduler=scheduler,
                                   image_encoder=None, image_processor=None, boundary_ratio=0.9)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
