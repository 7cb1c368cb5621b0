"""Guidance distillation (`TrainConfig.guidance_range`): a trained denoiser becomes a student that takes the
guidance scale as an input, trained to predict what the denoiser's own classifier-free guidance predicts at that
scale (Meng et al., "On Distillation of Guided Diffusion Models"). Sampling it takes one forward a step instead
of two."""

from __future__ import annotations

import dataclasses

import torch

from ..sampling import classifier_free_guidance


def check(cfg) -> None:
    """Refuse a guidance_range the run cannot distil, before anything is built."""
    low_high = cfg.guidance_range
    if len(low_high) != 2 or not 1.0 <= low_high[0] <= low_high[1]:
        raise ValueError(f"guidance_range: [lowest, highest] guidance scale, each 1 or more, got {low_high}")
    if cfg.stage != "denoiser" or not cfg.init or cfg.lora_rank:
        raise ValueError("guidance_range: distils a trained denoiser (stage denoiser, from init) into a student "
                         "that takes the scale; not a VAE, a fresh model or an adapter")


def make_student(bundle, guidance_range: list) -> torch.nn.Module:
    """Replace the bundle's denoiser by a student that takes the scale (computing what the denoiser does until
    trained) and record the range in its config; returns the denoiser, the frozen teacher."""
    teacher = bundle.denoiser
    bundle.denoiser = bundle.family.with_guidance_input(teacher)
    bundle.config = dataclasses.replace(bundle.config, guidance_range=[float(v) for v in guidance_range])
    return teacher


def guided_target(teacher, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """The teacher bundle's classifier-free guidance at each clip's scale: its predictions without a prompt (the
    empty caption, as text dropout trained it) and with the clip's, in one forward."""
    fam = teacher.family
    empty = fam.encode_prompt(teacher, [""], teacher.config.max_sequence_length).expand_as(text)
    uncond, cond = fam.predict(teacher, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([empty, text])).chunk(2)
    return classifier_free_guidance(uncond, cond, scale.view(-1, *[1] * (x_t.ndim - 1)))


def distillation_loss(bundle, teacher: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                      guidance_range: list) -> torch.Tensor:
    """The student's (bundle.denoiser's) squared error from the teacher's guided prediction at a scale drawn
    uniformly from the range for each clip."""
    low, high = guidance_range
    scale = low + (high - low) * torch.rand(x_t.shape[0], device=x_t.device)
    with torch.no_grad():
        target = guided_target(dataclasses.replace(bundle, denoiser=teacher), x_t, t, text, scale)
    pred = bundle.family.predict(bundle, x_t, t, text, guidance=scale)
    return torch.nn.functional.mse_loss(pred.float(), target.float())
