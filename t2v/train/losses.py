"""Training objectives as short pure functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Uniform u in (0, 1) -> flow-matching sigmas with the timestep shift FlowMatchEulerDiscreteScheduler
    applies at inference (more weight on high noise for shift > 1)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """Rectified flow: x_sigma = (1 - sigma) x0 + sigma noise; the model predicts d x / d sigma = noise - x0."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def flow_x0(x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x_t - sigma.view(-1, *([1] * (x_t.ndim - 1))) * velocity


def temporal_difference_loss(pred_x0: torch.Tensor, x0: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Match the frame-to-frame change (order 1: temporal consistency; order 2: motion smoothness) of the
    predicted clean latents [B, C, F, h, w] to the true ones."""
    if x0.shape[2] <= order:
        return x0.new_zeros(())
    return F.mse_loss(torch.diff(pred_x0, n=order, dim=2), torch.diff(x0, n=order, dim=2))


def vae_loss(recon: torch.Tensor, target: torch.Tensor, posterior, kl_weight: float,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L1 + MSE reconstruction + kl_weight * KL per element. `weight` (broadcast over channels, e.g.
    [B, 1, T, H, W]) weighs pixels: objects that cover a few percent of a frame can count as much as its
    background."""
    if weight is None:
        rec = F.l1_loss(recon, target) + F.mse_loss(recon, target)
    else:
        err = (recon - target).abs() + (recon - target) ** 2
        rec = (err * weight).sum() / (weight.expand_as(err).sum())
    kl = posterior.kl().mean() / target[0].numel()
    return rec + kl_weight * kl, {"recon": rec.item(), "kl": kl.item()}
