"""Generation parameters: defaults from the bundle, limits from the model, one clear error per field."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from .errors import InputError

MAX_PROMPT_CHARS = 2000
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0
MAX_FPS = 120.0
MAX_SEED = 2**63 - 1
# How forms and query strings spell a boolean.
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass
class GenerationParams:
    prompts: list[str]
    negative_prompts: list[str]
    num_frames: int
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    sampler: str | None  # None: the bundle's own scheduler
    fps: float
    seed: int
    guidance_scale_2: float | None = None  # the low-noise expert's (a mixture of experts only)
    guidance_input: bool = False  # the denoiser takes the scale as an input (a guidance-distilled student)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on: the negative prompts are encoded and every forward is doubled (never for
        a denoiser that takes the scale as an input: one forward a step)."""
        return self.guidance_scale > 1.0 and not self.guidance_input

    def guidance(self, expert: int) -> float:
        """The guidance scale of a step taken by this expert (`Family.expert`)."""
        return self.guidance_scale if expert == 0 or self.guidance_scale_2 is None else self.guidance_scale_2


def _prompts(field: str, value, bundle, required: bool) -> list[str]:
    if value is None and not required:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise InputError(field, "must be a non-empty string or a non-empty list of strings")
    limit = bundle.config.max_sequence_length
    for p in items:
        if required and not p.strip():
            raise InputError(field, "is empty", "1 to 2000 characters")
        if len(p) > MAX_PROMPT_CHARS:
            raise InputError(field, f"is {len(p)} characters long", f"at most {MAX_PROMPT_CHARS}")
        n = len(bundle.tokenizer(p, add_special_tokens=True)["input_ids"])
        if n > limit:
            raise InputError(field, f"is {n} tokens long; this model reads at most {limit}", f"≤ {limit} tokens")
    return list(items)


def _int(field: str, value, lo: int, hi: int, multiple: int = 1, offset: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise InputError(field, f"must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi or (value - offset) % multiple:
        allowed = f"{lo}..{hi}"
        if multiple > 1:
            allowed += f", {offset} + a multiple of {multiple}" if offset else f", a multiple of {multiple}"
        raise InputError(field, f"{value} is not supported by this model", allowed)
    return value


def check_steps(value) -> int:
    """num_inference_steps within 1..MAX_STEPS (checked before anything sized by it is built)."""
    return _int("num_inference_steps", value, 1, MAX_STEPS)


def _float(field: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(field, f"must be a number, got {value!r}")
    if value > hi or value < lo or (lo_open and value == lo):
        raise InputError(field, f"{value} is out of range", f"{'>' if lo_open else '≥'} {lo} and ≤ {hi}")
    return float(value)


def frames_for_seconds(seconds: float, fps: float, temporal_factor: int) -> int:
    """A duration -> the nearest frame count the model makes: 1 + k * temporal_factor (the causal VAE's
    chunks), at least one chunk."""
    chunks = seconds * fps / temporal_factor
    if not seconds > 0 or not math.isfinite(chunks):  # inf: round() would raise OverflowError, not this
        raise InputError("seconds", f"{seconds:g} is out of range", "> 0, finite")
    return 1 + temporal_factor * max(1, round(chunks))


def resolve(bundle, prompt, *, negative_prompt=None, num_frames=None, height=None, width=None,
            num_inference_steps=None, guidance_scale=None, sampler=None, fps=None, seed=None,
            guidance_scale_2=None) -> GenerationParams:
    """Fill unset fields from the bundle's defaults and check every field against the model's limits."""
    cfg, fam = bundle.config, bundle.family
    prompts = _prompts("prompt", prompt, bundle, required=True)
    negatives = _prompts("negative_prompt", negative_prompt, bundle, required=False)
    if len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if negatives and len(negatives) != len(prompts):
        raise InputError("negative_prompt", f"has {len(negatives)} entries for {len(prompts)} prompts",
                         "one, or one per prompt")
    negatives = negatives or [cfg.negative_prompt] * len(prompts)
    t = fam.temporal_factor(bundle)
    m = fam.size_multiple(bundle)
    lo_size = max(cfg.min_size, m)
    if sampler is not None and sampler not in fam.samplers:
        raise InputError("sampler", f"unknown sampler {sampler!r} for the {fam.name} family",
                         ", ".join(sorted(fam.samplers)))
    guidance = _float("guidance_scale", cfg.guidance_scale if guidance_scale is None else guidance_scale, 0.0,
                      MAX_GUIDANCE)
    guidance_2 = _guidance_2(bundle, guidance, guidance_scale_2)
    guidance_input = fam.guidance_input(bundle)
    if guidance_input:
        _check_guidance_input(bundle, guidance, negatives)
    if seed is None:
        seed = random.randrange(2**31)
    return GenerationParams(
        prompts=prompts,
        negative_prompts=negatives,
        num_frames=_int("num_frames", cfg.num_frames if num_frames is None else num_frames,
                        *fam.frame_range(bundle), t, 1 if t > 1 else 0),
        height=_int("height", cfg.height if height is None else height, lo_size, cfg.max_size, m),
        width=_int("width", cfg.width if width is None else width, lo_size, cfg.max_size, m),
        num_inference_steps=check_steps(cfg.num_inference_steps if num_inference_steps is None
                                        else num_inference_steps),
        guidance_scale=guidance,
        sampler=sampler,
        fps=_float("fps", cfg.fps if fps is None else fps, 0.0, MAX_FPS, lo_open=True),
        seed=_int("seed", seed, 0, MAX_SEED),
        guidance_scale_2=guidance_2,
        guidance_input=guidance_input,
    )


def _check_guidance_input(bundle, guidance: float, negatives: list[str]) -> None:
    """A denoiser that takes the guidance scale as an input was trained on a range of scales, and has no
    unconditional forward for a negative prompt to steer."""
    if any(n.strip() for n in negatives):
        raise InputError("negative_prompt", "this model takes the guidance scale as an input (one forward a step, "
                         "distilled from classifier-free guidance) and has no unconditional pass to steer", "unset")
    low, high = bundle.config.guidance_range or (1.0, 1.0)
    if not low <= guidance <= high:
        raise InputError("guidance_scale", f"{guidance:g} is outside the scales this model was trained on",
                         f"{low:g}..{high:g}")


def _guidance_2(bundle, guidance: float, value) -> float | None:
    """The low-noise expert's guidance scale: guidance_scale's when unset (as diffusers' WanPipeline), None for a
    model of one expert. Guidance is on or off for the whole video (the negative prompts are encoded or not), so
    both scales are on the same side of 1."""
    if bundle.denoiser_2 is None:
        if value is not None:
            raise InputError("guidance_scale_2", "this model has one denoiser, not a mixture of experts",
                             "unset (guidance_scale guides every step)")
        return None
    if value is None:
        return guidance
    value = _float("guidance_scale_2", value, 0.0, MAX_GUIDANCE)
    if (value > 1.0) != (guidance > 1.0):
        raise InputError("guidance_scale_2", f"{value:g} turns guidance {'on' if value > 1 else 'off'} for the "
                         f"low-noise steps, but guidance_scale {guidance:g} turns it {'on' if guidance > 1 else 'off'}",
                         "> 1 when guidance_scale > 1, else ≤ 1")
    return value
