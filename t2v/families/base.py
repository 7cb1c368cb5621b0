"""What a family must say about its models; `wan.py` and `unet3d.py` fill it in. Everything that differs
between families lives behind these methods: nothing outside families/ branches on a family."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class DenoisingObjective:
    """What a family's denoiser learns, as tensor functions (built once per training run).

    levels(batch, device): training noise levels in (0, 1), drawn as the family's schedule weighs them;
    pair(x0, noise, levels): (noised latents, the denoiser's timestep, its regression target);
    clean(x_t, prediction, timestep): the clean latents that prediction implies (for losses on x0).
    """

    levels: Callable
    pair: Callable
    clean: Callable


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # the reference diffusers pipeline, written as model_index.json's _class_name
    denoiser_key: str  # component folder of the denoiser: "transformer" or "unet"
    samplers: dict[str, tuple[str, dict]]
    flow: bool  # flow matching (velocity) rather than noise-prediction diffusion
    defaults: dict[str, Any] = field(default_factory=dict)  # generation defaults of real checkpoints
    presets: dict[str, dict] = field(default_factory=dict)  # sizes `build` makes: name -> component configs

    # --- geometry -------------------------------------------------------------------------------
    def spatial_factor(self, bundle) -> int:
        """Pixels per latent cell along height/width."""
        raise NotImplementedError

    def size_multiple(self, bundle) -> int:
        """Height and width must be multiples of this."""
        raise NotImplementedError

    def temporal_factor(self, bundle) -> int:
        """Frames per latent frame (1 for per-frame VAEs); num_frames must be 1 + k * this."""
        raise NotImplementedError

    def latent_shape(self, bundle, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    # --- the steps of sampling ------------------------------------------------------------------
    def encode_prompt(self, bundle, prompts: list[str], max_length: int) -> torch.Tensor:
        raise NotImplementedError

    def init_latents(self, noise: torch.Tensor, scheduler) -> torch.Tensor:
        return noise

    def predict(self, bundle, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The denoiser's output for latents already passed through the scheduler's scale_model_input (the
        scheduler lives with the sampling loop; the forward may run elsewhere, batched with other jobs)."""
        raise NotImplementedError

    def step(self, scheduler, pred: torch.Tensor, t, latents: torch.Tensor, generator=None, eta: float = 0.0):
        raise NotImplementedError

    def decode(self, bundle, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video in [-1, 1], shape [B, 3, F, H, W]."""
        raise NotImplementedError

    def encode(self, bundle, video: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Video in [-1, 1] [B, 3, F, H, W] -> normalized latents (the inverse of decode)."""
        raise NotImplementedError

    def lora_loader(self):
        """The diffusers LoRA loader mixin of the family's pipeline (save_lora_weights / lora_state_dict), or None
        when diffusers has no LoRA support for its denoiser."""
        return None

    def after_load(self, pipe, config) -> None:
        """Adjust a pipeline diffusers just loaded to the bundle's config (default: nothing to do)."""

    # --- training -------------------------------------------------------------------------------
    def training_overrides(self, cfg) -> dict:
        """Component config overrides that a TrainConfig implies for a model built from a preset."""
        return {}

    def training_objective(self, bundle, cfg=None) -> DenoisingObjective:
        """The denoiser's training target; cfg None: the bundle's own schedule."""
        raise NotImplementedError

    def vae_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Video-shaped [B, C, T, H, W] tensors (clips, pixel weights) -> the layout the VAE itself takes."""
        return x

    def set_latent_statistics(self, vae, mean: list[float], std: list[float]) -> None:
        """Store a trained VAE's per-channel latent statistics the way the family's pipeline normalizes."""
        raise NotImplementedError
