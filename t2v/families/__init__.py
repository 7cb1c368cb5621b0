"""The two denoiser families. Each one is the set of conventions its reference diffusers pipeline uses
(prompt encoding, latent shape, denoiser call, scheduler step, VAE decode), so bundles in the layout of
real checkpoints behave as they do in diffusers.
"""

from __future__ import annotations

from .base import Family, family_of
from .unet3d import UNET3D
from .wan import WAN

FAMILIES: dict[str, Family] = {WAN.name: WAN, UNET3D.name: UNET3D}

__all__ = ["FAMILIES", "Family", "WAN", "UNET3D", "family_of"]
