"""The denoiser families and their one registry (a new family is its module here plus one line in FAMILIES).
Each family is the set of conventions its reference diffusers pipeline uses (prompt encoding, latent shape,
denoiser call, scheduler step, VAE decode, training objective), so bundles in the layout of real checkpoints
behave as they do in diffusers.
"""

from __future__ import annotations

from ..errors import BundleError
from .base import DenoisingObjective, Family
from .latte import LATTE
from .unet3d import UNET3D
from .wan import WAN
from .wan_i2v import WAN_I2V

FAMILIES: dict[str, Family] = {WAN.name: WAN, WAN_I2V.name: WAN_I2V, UNET3D.name: UNET3D, LATTE.name: LATTE}


def family_of(model_index: dict, uri: str = "") -> Family:
    """Which family a diffusers model_index.json describes."""
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


__all__ = ["FAMILIES", "DenoisingObjective", "Family", "WAN", "WAN_I2V", "UNET3D", "LATTE", "family_of"]
