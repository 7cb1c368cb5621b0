"""Sampler names -> diffusers schedulers, per family, and classifier-free guidance.

A bundle ships one scheduler config; a sampler name swaps the scheduler class while keeping that
config's training schedule (timesteps, betas or flow shift, prediction type), as diffusers'
`Scheduler.from_config(pipe.scheduler.config)` idiom does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


def with_sampler(bundle, sampler: str | None = None, spacing: str | None = None, steps: int | None = None):
    """The bundle with a new default sampling: the named sampler's scheduler on the bundle's training schedule
    (None: its own), timestep spacing ("leading", "trailing", "linspace") and step count; the weights unchanged."""
    import dataclasses

    config = {**bundle.scheduler.config, "_class_name": type(bundle.scheduler).__name__}
    scheduler = make_scheduler(config, bundle.family.samplers, sampler, bundle.family.flow)
    if spacing:
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing=spacing)
    bundle.scheduler = scheduler
    if steps is not None:
        bundle.config = dataclasses.replace(bundle.config, num_inference_steps=steps)
    return bundle


def scheduler_for(bundle, sampler: str | None, num_inference_steps: int):
    """The scheduler of one generation, its timesteps set: the bundle's own, or the named sampler's class with
    the bundle's training schedule."""
    # (a scheduler built in memory has no _class_name in its config until saved)
    config = {**bundle.scheduler.config, "_class_name": type(bundle.scheduler).__name__}
    fam = bundle.family
    scheduler = make_scheduler(config, fam.samplers, sampler, fam.flow)
    scheduler.set_timesteps(num_inference_steps, device=bundle.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def num_timesteps(bundle, sampler: str | None, num_inference_steps: int) -> int:
    """How many denoiser calls a generation makes (a second-order sampler takes two per step): a progress bar's
    total."""
    return len(scheduler_for(bundle, sampler, num_inference_steps).timesteps)


def model_input(scheduler, latents: torch.Tensor, t) -> torch.Tensor:
    """The latents as the denoiser takes them at step t (some schedulers scale them; flow schedulers don't)."""
    return scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """Clean latents x0 brought to timestep t's noise level by the scheduler's own forward process (flow
    schedulers call it scale_noise). Called before step t's forward, while the scheduler's step index is t's."""
    t = torch.as_tensor(t, device=x0.device).reshape(1).expand(x0.shape[0])
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


def with_first_frame(latents: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, F, h, w] whose latent frame 0 is `first` [B, C, 1, h, w] (image-to-video by latent
    replacement: the image fixes frame 0, noised to each step's level; the model denoises the rest around it)."""
    return torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)


@dataclass
class Handover:
    """A mixture of experts' sampling state at the switch, for the low-noise expert to go on from, possibly in
    another process (it pickles): the latents after the high-noise expert's last step, the scheduler that took
    those steps (a multistep solver keeps its history), the generator's state and the call's initial noise (an
    image's conditioning is made from it again)."""

    latents: torch.Tensor
    scheduler: Any
    generator_state: torch.Tensor
    noise: torch.Tensor

    def to(self, device) -> "Handover":
        """Its tensors, the scheduler's state among them, on `device` (the CPU to travel; the replica's to go on)."""
        def move(value):
            if torch.is_tensor(value):
                return value.to(device)
            if isinstance(value, list):
                return [move(v) for v in value]
            return value

        for name, value in vars(self.scheduler).items():
            setattr(self.scheduler, name, move(value))
        return Handover(self.latents.to(device), self.scheduler, self.generator_state, self.noise.to(device))


class ImageCondition:
    """How a call's images condition its sampling loop (image-to-video), in four hooks the loops call; each is the
    identity here, a call without images. The family decides which kind a model takes (`Family.image_conditioning`).

    embeds(e): the cross-attention tokens of every forward, from the prompts' embeddings;
    before_step(scheduler, latents, t): the latents before step t's forward;
    model_input(x): the denoiser's input from the scheduled latents;
    timestep(t): the denoiser's timestep: t, or one per token ([1, tokens]) where the images hold some still;
    after_last_step(latents): the latents after the last step, before decoding."""

    per_token_timesteps = False  # timestep() gives one per token

    def embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def before_step(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return latents

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def after_last_step(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


NO_IMAGE = ImageCondition()


class FirstFrame(ImageCondition):
    """Image-to-video for a model without an image branch, by latent replacement: the image's latents fix
    latent frame 0 -- noised to each step's level before its forward, clean after the last -- and the model
    denoises the other frames around it. noise: the initial noise's frame 0, so the image starts from it."""

    def __init__(self, latents: torch.Tensor, noise: torch.Tensor):
        self.latents, self.noise = latents, noise

    def before_step(self, scheduler, latents: torch.Tensor, t) -> torch.Tensor:
        return with_first_frame(latents, noised(scheduler, self.latents, self.noise.to(self.latents), t))

    def after_last_step(self, latents: torch.Tensor) -> torch.Tensor:
        return with_first_frame(latents, self.latents)


def frame_correlated_noise(noise: torch.Tensor, correlation: float,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise [B, C, F, h, w] whose frames share `correlation` of their variance (PYoCo's mixed noise prior): one
    draw per clip shared by every frame plus each frame's own (`noise`), every value still unit-variance Gaussian.
    A model trained on it starts every frame of a video from the same shared draw, so what it draws is drawn at
    the same place in every frame. correlation 0 returns `noise` itself and draws nothing."""
    if not correlation:
        return noise
    shared = torch.randn(*noise.shape[:2], 1, *noise.shape[3:], generator=generator, dtype=noise.dtype,
                         device=generator.device if generator is not None else noise.device).to(noise.device)
    return correlation ** 0.5 * shared + (1 - correlation) ** 0.5 * noise


def classifier_free_guidance(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Ho & Salimans: move the conditional prediction away from the unconditional one by `scale`."""
    return uncond + scale * (cond - uncond)


def guidance_scale_embedding(scale: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features [B, dim] of guidance scales [B], as a guidance-distilled UNet takes them through its
    `time_cond_proj_dim` input: diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding of
    w = scale - 1 (the LCM convention)."""
    w = (scale.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


# -- predictions (the denoising loops call these through a `predictor`, so a server may batch or fan out) --

def predict_guided(bundle, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance_scale: float):
    """One prediction for latents x (already scaled by the scheduler), guided when guidance_scale > 1; then
    embeds holds the negative prompts' embeddings first, as the pipeline encodes them. A denoiser that takes the
    scale as an input gets it so, with the prompts' embeddings alone."""
    fam = bundle.family
    if fam.guidance_input(bundle):  # the scale is the denoiser's input: one forward, no negative half
        return fam.predict(bundle, x, t, embeds, guidance=torch.full((x.shape[0],), float(guidance_scale)))
    if guidance_scale > 1.0:
        return classifier_free_guidance(*fam.predict(bundle, torch.cat([x, x]), t, embeds).chunk(2),
                                        guidance_scale)
    return fam.predict(bundle, x, t, embeds)


def local_requests(bundle):
    """(x, t, embeds, guidance) requests -> predictions, on this process's device. On a GPU all of them (a long
    video's windows) run as one batched forward, where 8 cost about what 1 does; on a CPU, where a forward is
    compute-bound, one forward each is a few percent faster (bench/step_batching.py)."""
    if torch.device(bundle.device).type == "cuda":
        return lambda requests: predict_batch(bundle, requests)
    return lambda requests: [predict_guided(bundle, *r) for r in requests]


def bundle_forward(bundle, batched: bool = False):
    """How the bundle's forwards run: through its parallel layout's ranks once one is attached
    (`t2v.parallel.attach`), else here (batched: as one forward where shapes allow, for per-step batching)."""
    forward = getattr(getattr(bundle, "runtime", None), "forward", None)
    if forward is not None:
        return forward
    return (lambda requests: predict_batch(bundle, requests)) if batched else local_requests(bundle)


def as_predictor(predict_requests):
    """requests -> predictions, as a sampling loop's predictor: (latents list, t, embeds list, guidance)."""
    return lambda xs, t, embeds, g: predict_requests([(x, t, e, g) for x, e in zip(xs, embeds)])


def local_predictor(bundle):
    """The default predictor: the bundle's forward (`bundle_forward`) for each step's latents."""
    return as_predictor(bundle_forward(bundle))


def predict_batch(bundle, requests: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> list[torch.Tensor]:
    """Predictions for several (x, t, embeds, guidance_scale) requests -- steps of different jobs, windows of a
    long video -- with one forward per group of requests whose latents and embeddings share a shape. Each
    request keeps its own timestep, prompts and guidance: the same results as `predict_guided` on each, in
    one batch (per-step batching of concurrent jobs, where a forward is launch-bound, as on a GPU). Requests
    for different experts of a mixture go to separate forwards. A denoiser that takes the scale as an input gets
    each request's scale so, one copy of each request."""
    fam, out = bundle.family, [None] * len(requests)
    scale_input = fam.guidance_input(bundle)
    groups: dict[tuple, list[int]] = {}
    for i, (x, t, e, _) in enumerate(requests):  # a mixture of experts: only steps of the same expert share one
        key = (tuple(x.shape[1:]), tuple(e.shape[1:]), fam.expert(bundle, t), t.ndim == 2 and t.shape[1])
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        xs, ts, es, gs, sizes = [], [], [], [], []
        for i in members:
            x, t, e, g = requests[i]
            copies = 2 if g > 1.0 and not scale_input else 1  # guided: negative and positive halves ride together
            xs += [x] * copies
            es.append(e)
            t = t.to(x.device)  # one timestep, or one per token ([1, tokens])
            n = copies * x.shape[0]
            ts.append(t.expand(n, -1) if t.ndim == 2 else t.reshape(-1)[:1].expand(n))
            gs.append(torch.full((n,), float(g)))
            sizes.append(n)
        scales = {"guidance": torch.cat(gs)} if scale_input else {}
        pred = fam.predict(bundle, torch.cat(xs), torch.cat(ts), torch.cat(es), **scales)
        for i, part, n in zip(members, pred.split(sizes), sizes):
            out[i] = classifier_free_guidance(*part.chunk(2), requests[i][3]) if n > requests[i][0].shape[0] else part
    return out
