"""What the families on a per-frame image VAE share: diffusers' AutoencoderKL encodes and decodes a video frame
by frame (no temporal compression), latents are scaled by its `scaling_factor`, and the denoiser learns DDPM
noise or v-prediction at integer timesteps (TextToVideoSDPipeline's and LattePipeline's conventions)."""

from __future__ import annotations

import torch

from .base import DenoisingObjective, Family


class PerFrameDiffusionFamily(Family):
    def spatial_factor(self, bundle) -> int:
        return 2 ** (len(bundle.vae.config.block_out_channels) - 1)

    def temporal_factor(self, bundle) -> int:
        return 1

    def latent_shape(self, bundle, batch, num_frames, height, width):
        s = self.spatial_factor(bundle)
        return (batch, bundle.denoiser.config.in_channels, num_frames, height // s, width // s)

    def init_latents(self, noise, scheduler):
        return noise * scheduler.init_noise_sigma

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

    def vae_batch(self, x):
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)  # a per-frame image VAE: frames as a batch of images

    def training_overrides(self, cfg):
        return {"scheduler": {"prediction_type": cfg.prediction or "epsilon"}}

    def training_objective(self, bundle, cfg=None):
        """DDPM: the denoiser predicts the noise (epsilon) or v at an integer timestep of the training schedule."""
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

    def build_vae(self, cfg: dict):
        """A per-frame AutoencoderKL of cfg (its block_out_channels set the depth)."""
        from diffusers import AutoencoderKL

        n = len(cfg["block_out_channels"])
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                             up_block_types=["UpDecoderBlock2D"] * n, **cfg)

    def build(self, preset: str = "tiny", text_dim: int = 384, text_encoder: bool = False, device=None,
              **overrides):
        """Random-initialised {denoiser, vae, scheduler} of a preset size (device="meta": shapes only). No preset
        here names its own text encoder (text_encoder is accepted for the families' common signature)."""
        cfg = self.preset_config(preset, overrides)
        z = cfg["vae"].setdefault("latent_channels", 4)  # the denoiser works on the VAE's channels
        with torch.device(device or "cpu"):
            vae = self.build_vae(cfg["vae"])
            denoiser = self.build_denoiser(cfg[self.denoiser_key], z, text_dim)
        return {self.denoiser_key: denoiser, "vae": vae, "scheduler": self.build_scheduler(cfg.get("scheduler", {}))}

    def build_denoiser(self, cfg: dict, latent_channels: int, text_dim: int):
        """The family's denoiser of config `cfg` on `latent_channels`, attending to text of `text_dim`."""
        raise NotImplementedError

    def build_scheduler(self, overrides: dict):
        """DDIM on Stable Diffusion's training schedule (ModelScope's and Latte's), with `overrides`."""
        from diffusers import DDIMScheduler

        return DDIMScheduler(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                "clip_sample": False, "set_alpha_to_one": False, **overrides})
