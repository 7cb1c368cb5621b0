"""`latte`: LatteTransformer3DModel + per-frame AutoencoderKL + DDPM/DDIM (the Latte-1 layout, diffusers'
LattePipeline).

A transformer of alternating spatial blocks (self-attention within a frame, cross-attention to the prompt) and
temporal blocks (self-attention across frames at one patch). Conventions follow LattePipeline: prompts padded to
max_sequence_length with their embeddings zeroed past their length (its `mask_feature` for a batch of prompts),
the output's first half of channels is the prediction (the second, Latte-1's learned variance, is unused by
the samplers), the scheduler steps the whole video, the VAE decodes frame by frame. Its temporal position table
has `video_length` rows, so a model makes clips of exactly that many frames; longer videos are co-denoised
windows of it.
"""

from __future__ import annotations

import inspect

import torch

from ..sampling import DIFFUSION_SAMPLERS
from .per_frame import PerFrameDiffusionFamily

_TRANSFORMER = dict(norm_type="ada_norm_single", num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
                    norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True)
PRESETS = {
    "tiny": {
        "transformer": dict(_TRANSFORMER, num_attention_heads=2, attention_head_dim=8, num_layers=1, patch_size=2,
                            sample_size=8, video_length=5),
        "vae": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1),
    },
    # The embedded default's size: 64x64 video, 17 frames, 4x VAE -> 16x16 latents in 4x4 patches (16 tokens a
    # frame), width 256, 6 layers: 11.9M parameters, 0.9 s a training step of 8 clips on 2 CPU cores.
    "small": {
        "transformer": dict(_TRANSFORMER, num_attention_heads=8, attention_head_dim=32, num_layers=6, patch_size=4,
                            sample_size=16, video_length=17),
        "vae": dict(block_out_channels=(16, 32, 64), norm_num_groups=8, layers_per_block=1),
    },
}


class LatteFamily(PerFrameDiffusionFamily):
    def size_multiple(self, bundle) -> int:
        return self.spatial_factor(bundle) * int(bundle.denoiser.config.patch_size)

    def frame_range(self, bundle) -> tuple[int, int]:
        n = int(bundle.denoiser.config.video_length)
        return n, n

    def encode_prompt(self, bundle, prompts, max_length):
        tok = bundle.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                               return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
        te = bundle.text_encoder
        mask = tok.attention_mask.to(te.device)
        embeds = te(tok.input_ids.to(te.device), attention_mask=mask)[0]
        return embeds * mask[..., None].to(embeds.dtype)

    def predict(self, bundle, latents, t, embeds):
        model = bundle.denoiser
        t = torch.as_tensor(t, device=latents.device)
        out = model(hidden_states=latents.to(model.dtype), timestep=t.reshape(-1).expand(latents.shape[0]),
                    encoder_hidden_states=embeds.to(model.dtype), return_dict=False)[0]
        # LattePipeline: the first half of the channels when the model also outputs a variance
        return out[:, :latents.shape[1]]

    def step(self, scheduler, pred, t, latents, generator=None, eta=0.0):
        params = inspect.signature(scheduler.step).parameters
        kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        return scheduler.step(pred, t, latents, **kwargs).prev_sample

    def check_cache(self, bundle, name):
        # The first-block cache compares one block's output between steps as the residual stream of the model;
        # Latte reshapes that stream between its spatial and temporal blocks.
        if name == "first_block":
            from ..errors import InputError

            raise InputError("cache", "first_block needs a transformer whose blocks share one token layout; "
                                      "Latte alternates frame and time layouts", "taylorseer, pab")

    def after_load(self, pipe, config):
        n = int(pipe.transformer.config.video_length)
        if not 1 <= config.num_frames <= n:
            raise ValueError(f"_t2v.num_frames: {config.num_frames}; this transformer makes clips of {n} frames "
                             "(its video_length)")

    def lora_loader(self):
        # LattePipeline has no loader of its own; CogVideoX's saves and reads transformer-only LoRA files in
        # diffusers' format ("transformer." keys, peft metadata), which is what a Latte adapter is.
        from diffusers.loaders import CogVideoXLoraLoaderMixin

        return CogVideoXLoraLoaderMixin

    def build_denoiser(self, cfg: dict, latent_channels: int, text_dim: int):
        """Latte predicts noise and variance: twice the latent channels out (the prediction is the first half)."""
        from diffusers import LatteTransformer3DModel

        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return LatteTransformer3DModel(**{"in_channels": latent_channels, "out_channels": 2 * latent_channels,
                                          "caption_channels": text_dim, "cross_attention_dim": width, **cfg})


LATTE = LatteFamily(
    name="latte",
    pipeline_class="LattePipeline",
    denoiser_key="transformer",
    samplers=DIFFUSION_SAMPLERS,
    flow=False,
    presets=PRESETS,
    # Latte-1's settings (maxin-cn/Latte-1: 16 frames of 512x512, 50 DDIM steps, guidance 7.5, T5 at 120 tokens).
    defaults=dict(num_frames=16, height=512, width=512, fps=8, num_inference_steps=50, guidance_scale=7.5,
                  max_sequence_length=120, max_frames=16, min_size=32, max_size=1024),
)
