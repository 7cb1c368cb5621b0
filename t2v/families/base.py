"""What a family must say about its models; `wan.py` and `unet3d.py` fill it in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import BundleError


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str  # the reference diffusers pipeline, written as model_index.json's _class_name
    denoiser_key: str  # component folder of the denoiser: "transformer" or "unet"
    samplers: dict[str, tuple[str, dict]]
    flow: bool  # flow matching (velocity) rather than noise-prediction diffusion
    defaults: dict[str, Any] = field(default_factory=dict)  # generation defaults of real checkpoints

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

    def predict(self, bundle, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, scheduler) -> torch.Tensor:
        raise NotImplementedError

    def step(self, scheduler, pred: torch.Tensor, t, latents: torch.Tensor, generator=None, eta: float = 0.0):
        raise NotImplementedError

    def decode(self, bundle, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> video in [-1, 1], shape [B, 3, F, H, W]."""
        raise NotImplementedError

    def encode(self, bundle, video: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Video in [-1, 1] [B, 3, F, H, W] -> normalized latents (the inverse of decode)."""
        raise NotImplementedError


def family_of(model_index: dict, uri: str = "") -> "Family":
    """Which family a diffusers model_index.json describes."""
    from . import FAMILIES

    cls = model_index.get("_class_name", "")
    for fam in FAMILIES.values():
        if cls == fam.pipeline_class:
            return fam
    for fam in FAMILIES.values():
        if model_index.get(fam.denoiser_key, [None])[0]:
            return fam
    raise BundleError(
        uri, f"pipeline {cls!r} is not a t2v family (supported: "
        + ", ".join(f"{f.name} = {f.pipeline_class}" for f in FAMILIES.values()) + ")"
    )
