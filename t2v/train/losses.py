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


def offset_noise(like: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise plus `offset` x one Gaussian per sample and channel, shared by every frame and pixel
    (diffusers' `--noise_offset`). A DDPM schedule whose last step still holds a little of the clip never teaches
    the model to move a whole frame's mean (dark and bright backgrounds drift to grey); this noise does."""
    noise = torch.randn_like(like)
    if offset:
        noise = noise + offset * torch.randn(*like.shape[:2], *([1] * (like.ndim - 2)), device=like.device,
                                             dtype=like.dtype)
    return noise


def temporal_difference_loss(pred_x0: torch.Tensor, x0: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Match the frame-to-frame change (order 1: temporal consistency; order 2: motion smoothness) of the
    predicted clean latents [B, C, F, h, w] to the true ones."""
    if x0.shape[2] <= order:
        return x0.new_zeros(())
    return F.mse_loss(torch.diff(pred_x0, n=order, dim=2), torch.diff(x0, n=order, dim=2))


def vae_loss(recon: torch.Tensor, target: torch.Tensor, posterior, kl_weight: float,
             weight: torch.Tensor | None = None, edge_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """L1 + MSE reconstruction + kl_weight * KL per element. `weight` (broadcast over channels, e.g.
    [B, 1, T, H, W]) weighs pixels: objects that cover a few percent of a frame can count as much as its
    background. edge_weight: plus that times the L1 of the images' horizontal and vertical differences (the
    corners and edges that tell a small star from a blob), weighted the same."""
    rec = weighted_mean((recon - target).abs() + (recon - target) ** 2, weight)
    parts = {"recon": rec.item()}
    if edge_weight:
        edge = edge_error(recon, target, weight)
        rec = rec + edge_weight * edge
        parts["edge"] = edge.item()
    kl = posterior.kl().mean() / target[0].numel()
    return rec + kl_weight * kl, {**parts, "kl": kl.item()}


def edge_error(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean L1 between the images' finite differences along width and height (last two dims)."""
    total = recon.new_zeros(())
    for dim in (-1, -2):
        err = (torch.diff(recon, dim=dim) - torch.diff(target, dim=dim)).abs()
        total = total + weighted_mean(err, None if weight is None else weight.narrow(dim, 0, weight.shape[dim] - 1))
    return total / 2


def object_pixel_weights(masks: torch.Tensor, object_weight: float, area_ref: float = 0.0,
                         margin: int = 0) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, T, H, W] from object masks [B, T, H, W] (bool, or the share of each cell an
    object covers, latent_object_share): 1 on the background, 1 + object_weight on objects; with area_ref > 0, a
    clip's object pixels weigh object_weight x area_ref / (its objects' share of its pixels), clamped to 1/8..8 of
    that, so a small object counts as much as a large one. With margin > 0, the pixels within `margin` of an
    object (in its frame) weigh as the object does: drawing it larger then costs as much as drawing it smaller."""
    objects = masks[:, None].float()
    scale = torch.ones(masks.shape[0], device=masks.device)
    if area_ref > 0:
        share = objects.flatten(1).mean(1)
        scale = (area_ref / share.clamp_min(1e-6)).clamp(1 / 8, 8)
    if margin > 0:
        window = (1, 2 * margin + 1, 2 * margin + 1)
        objects = F.max_pool3d(objects, window, stride=1, padding=(0, margin, margin))
    return 1 + object_weight * scale.view(-1, 1, 1, 1, 1) * objects


def latent_object_share(masks: torch.Tensor, latent_size) -> torch.Tensor:
    """The share of each latent cell [B, F, h, w] that objects cover, from pixel masks [B, T, H, W] (area
    pooling to the latent grid `latent_size` (F, h, w); a VAE that compresses time pools frames the same way)."""
    return F.adaptive_avg_pool3d(masks[:, None].float(), tuple(latent_size))[:, 0]


def weighted_mean(err: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of `err` with per-element weights broadcast over it (e.g. [B, 1, F, h, w] over channels),
    normalized by the weights' sum: the plain mean where weight is None or all ones."""
    if weight is None:
        return err.mean()
    weight = weight.expand_as(err)
    return (err * weight).sum() / weight.sum()


def weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error weighted as weighted_mean does."""
    return weighted_mean((pred - target) ** 2, weight)
