"""Sampler names -> diffusers schedulers, per family, and classifier-free guidance.

A bundle ships one scheduler config; a sampler name swaps the scheduler class while keeping that
config's training schedule (timesteps, betas or flow shift, prediction type), as diffusers'
`Scheduler.from_config(pipe.scheduler.config)` idiom does.
"""

from __future__ import annotations

import diffusers
import torch

from .errors import InputError

# name -> (diffusers scheduler class, config overrides). Flow-matching families integrate the
# probability-flow ODE; there DDIM's deterministic update is exactly the first-order Euler step, so
# "ddim" and "euler" name FlowMatchEulerDiscreteScheduler.
FLOW_SAMPLERS: dict[str, tuple[str, dict]] = {
    "flow-match-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "ddim": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-match-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {"prediction_type": "flow_prediction", "use_flow_sigmas": True}),
    "dpm-solver++": (
        "DPMSolverMultistepScheduler",
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "algorithm_type": "dpmsolver++"},
    ),
}

DIFFUSION_SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def flow_shift(config: dict) -> float:
    """The timestep shift of a flow-matching scheduler config, whichever key its class uses."""
    key = "flow_shift" if config.get("use_flow_sigmas") else "shift"
    return float(config.get(key) or 1.0)


def make_scheduler(base_config: dict, samplers: dict[str, tuple[str, dict]], name: str | None, flow: bool):
    """A fresh scheduler (they are stateful) for one generation: the bundle's own when name is None."""
    if name is None:
        cls = getattr(diffusers, base_config["_class_name"])
        return cls.from_config(base_config)
    if name not in samplers:
        raise InputError("sampler", f"unknown sampler {name!r}", ", ".join(sorted(samplers)))
    cls_name, overrides = samplers[name]
    overrides = dict(overrides)
    if flow:
        shift = flow_shift(base_config)
        overrides.update(shift=shift, flow_shift=shift)
    return getattr(diffusers, cls_name).from_config(base_config, **overrides)


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans: move the conditional prediction away from the unconditional one by `scale`."""
    return uncond + scale * (cond - uncond)
