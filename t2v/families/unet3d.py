"""`unet3d`: UNet3DConditionModel + per-frame AutoencoderKL + DDPM/DDIM (the ModelScope / zeroscope layout).

Conventions follow diffusers' TextToVideoSDPipeline: prompts padded to the tokenizer's model_max_length,
the scheduler steps frames as a batch of images, the VAE decodes frame by frame.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..sampling import DIFFUSION_SAMPLERS
from .base import DenoisingObjective, Family

PRESETS = {
    "tiny": {
        "unet": dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=4,
                     down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D")),
        "vae": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1),
    },
    "small": {
        "unet": dict(block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8,
                     norm_num_groups=8,
                     down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D")),
        "vae": dict(block_out_channels=(32, 64, 64), norm_num_groups=8, layers_per_block=1),
    },
}


class UNet3DFamily(Family):
    def spatial_factor(self, bundle) -> int:
        return 2 ** (len(bundle.vae.config.block_out_channels) - 1)

    def temporal_factor(self, bundle) -> int:
        return 1

    def size_multiple(self, bundle) -> int:
        return self.spatial_factor(bundle) * 2 ** (len(bundle.denoiser.config.block_out_channels) - 1)

    def latent_shape(self, bundle, batch, num_frames, height, width):
        s = self.spatial_factor(bundle)
        return (batch, bundle.denoiser.config.in_channels, num_frames, height // s, width // s)

    def encode_prompt(self, bundle, prompts, max_length):
        tok = bundle.tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="pt")
        te = bundle.text_encoder
        use_mask = getattr(te.config, "use_attention_mask", False)
        mask = tok.attention_mask.to(te.device) if use_mask else None
        return te(tok.input_ids.to(te.device), attention_mask=mask)[0]

    def init_latents(self, noise, scheduler):
        return noise * scheduler.init_noise_sigma

    def predict(self, bundle, latents, t, embeds):
        model = bundle.denoiser
        return model(latents.to(model.dtype), t, encoder_hidden_states=embeds.to(model.dtype), return_dict=False)[0]

    def step(self, scheduler, pred, t, latents, generator=None, eta=0.0):
        # ModelScope steps each frame as an image; stochastic samplers then draw noise in that layout.
        b, c, f, h, w = latents.shape
        as_images = lambda x: x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # noqa: E731
        params = inspect.signature(scheduler.step).parameters
        kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        out = scheduler.step(as_images(pred), t, as_images(latents), **kwargs).prev_sample
        return out.reshape(b, f, c, h, w).permute(0, 2, 1, 3, 4)

    def decode(self, bundle, latents):
        vae = bundle.vae
        b, c, f, h, w = latents.shape
        x = (latents / vae.config.scaling_factor).permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        frames = vae.decode(x.to(vae.device, vae.dtype)).sample
        return frames.reshape(b, f, *frames.shape[1:]).permute(0, 2, 1, 3, 4).float()

    def encode(self, bundle, video, sample=False, generator=None):
        vae = bundle.vae
        b, c, f, h, w = video.shape
        x = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).to(vae.device, vae.dtype)
        dist = vae.encode(x).latent_dist
        z = (dist.sample(generator) if sample else dist.mode()) * vae.config.scaling_factor
        return z.reshape(b, f, *z.shape[1:]).permute(0, 2, 1, 3, 4)

    def lora_loader(self):
        # TextToVideoSDPipeline's own loader: LoRA files with "unet." keys, as save_lora_weights(unet_lora_layers=...)
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def peft_denoiser(self, bundle):
        # diffusers' UNet3DConditionModel lacks PeftAdapterMixin (its pipeline cannot load a LoRA into it): give the
        # loaded model that mixin, as its 2D sibling has it; the class name stays, so a saved bundle is unchanged.
        unet = bundle.denoiser
        if not isinstance(unet, _peft_unet3d()):
            unet.__class__ = _peft_unet3d()
        return unet

    def after_load(self, pipe, config):
        # TextToVideoSDPipeline pads to model_max_length: make that the bundle's sequence length.
        pipe.tokenizer.model_max_length = config.max_sequence_length

    def vae_batch(self, x):
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # a per-frame image VAE: frames as a batch of images

    def training_overrides(self, cfg):
        return {"scheduler": {"prediction_type": cfg.prediction or "epsilon"}}

    def training_objective(self, bundle, cfg=None):
        """DDPM: the U-Net predicts the noise (epsilon) or v at an integer timestep of the training schedule."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(bundle.scheduler.config)
        prediction = (cfg.prediction if cfg is not None else None) or sched.config.prediction_type
        steps = sched.config.num_train_timesteps

        def alpha(t, like):
            return sched.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.ndim - 1)))

        def levels(batch, device):
            return torch.rand(batch, device=device)

        def pair(x0, noise, level):
            t = (level * steps).long().clamp(0, steps - 1)
            target = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
            return sched.add_noise(x0, noise, t), t, target

        def clean(x_t, pred, t):
            a = alpha(t, x_t)
            if prediction == "epsilon":
                return (x_t - (1 - a).sqrt() * pred) / a.sqrt()
            return a.sqrt() * x_t - (1 - a).sqrt() * pred  # exact at zero terminal SNR too (no division by alpha)

        return DenoisingObjective(levels, pair, clean)

    def set_latent_statistics(self, vae, mean, std):
        vae.register_to_config(scaling_factor=1.0 / float(sum(std) / len(std)))

    def build(self, preset: str = "tiny", text_dim: int = 384, text_encoder: bool = False, device=None,
              **overrides):
        """Random-initialised {unet, vae, scheduler} of a preset size (device="meta": shapes only). No preset
        here names its own text encoder (text_encoder is accepted for the families' common signature)."""
        from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel

        cfg = {k: dict(v) for k, v in PRESETS[preset].items()}
        for part, values in overrides.items():
            cfg.setdefault(part, {}).update(values)
        n = len(cfg["vae"]["block_out_channels"])
        z = cfg["vae"].setdefault("latent_channels", 4)  # the denoiser works on the VAE's channels
        with torch.device(device or "cpu"):
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                                up_block_types=["UpDecoderBlock2D"] * n, **cfg["vae"])
            unet = UNet3DConditionModel(in_channels=z, out_channels=z, cross_attention_dim=text_dim, **cfg["unet"])
        scheduler = DDIMScheduler(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                     "clip_sample": False, "set_alpha_to_one": False, **cfg.get("scheduler", {})})
        return {"unet": unet, "vae": vae, "scheduler": scheduler}


@functools.cache
def _peft_unet3d():
    from diffusers import UNet3DConditionModel
    from diffusers.loaders.peft import PeftAdapterMixin

    return type("UNet3DConditionModel", (UNet3DConditionModel, PeftAdapterMixin), {"__module__": __name__})


UNET3D = UNet3DFamily(
    name="unet3d",
    pipeline_class="TextToVideoSDPipeline",
    denoiser_key="unet",
    samplers=DIFFUSION_SAMPLERS,
    flow=False,
    presets=PRESETS,
    # ModelScope text-to-video-ms-1.7b's settings.
    defaults=dict(num_frames=16, height=256, width=256, fps=8, num_inference_steps=50, guidance_scale=9.0,
                  max_sequence_length=77, max_frames=64, min_size=32, max_size=1024),
)
