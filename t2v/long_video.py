"""Videos longer than the model's native clip: temporal co-denoising of overlapping latent windows.

At every sampler step each window's prediction is computed on its own (so windows can run in parallel, on
different Denoiser replicas), then the overlapping predictions are fused with ramp weights before ONE
scheduler step on the whole latent video (Gen-L-Video / MultiDiffusion). The initial noise repeats the
first window's noise frames in shuffled order (FreeNoise), so every window starts from statistically the same
noise and distant windows stay correlated. Continuity comes from the denoising itself: no finished clips are
cross-faded. Each window may carry its own prompt (multi-shot plans, see `planner.py`).

The pieces are short pure functions (`latent_windows`, `window_weights`, `fuse_windows`, `freenoise`,
`seam_ratio`); `LongVideoPipeline` composes them with a `TextToVideoPipeline`, and the Serve graph reuses the
same loop with a remote per-window predictor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError
from .params import resolve
from .pipeline import TextToVideoPipeline, VideoOutput, check_images, to_uint8
from .runtime import step_predictor
from .sampling import frame_correlated_noise, local_predictor, model_input, scheduler_for

MAX_WINDOWS = 32


# --- pure pieces ------------------------------------------------------------------------------------------

def latent_windows(total: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """Windows over `total` latent frames for a model whose clips have `window` latent frames. Every window is
    the first latent frame (the anchor: the causal VAE and the model read frame 0 as a single image) followed
    by a run [start, end) of later frames; neighbouring runs share >= `overlap` frames; the last run ends at
    `total`. Returns the runs."""
    body, run = total - 1, window - 1
    if body <= run:
        return [(1, total)]
    if not 0 < overlap < run:
        raise InputError("overlap", f"{overlap} latent frames for windows of {window}", f"1 to {run - 1}")
    n = -(-(body - run) // (run - overlap)) + 1  # ceil
    starts = np.linspace(1, total - run, n).round().astype(int)
    return [(int(s), int(s) + run) for s in starts]


def default_overlap(window: int) -> int:
    """Half of a window's run, at least 1 (2 for the default model's 5-latent-frame clips)."""
    return max(1, (window - 1) // 2)


def max_long_frames(window: int, temporal_factor: int, overlap: int | None = None) -> int:
    """The longest clip (pixel frames) MAX_WINDOWS windows of `window` latent frames, overlapping by `overlap`
    (default: `default_overlap`), can cover."""
    run = window - 1
    stride = max(1, run - (default_overlap(window) if overlap is None else overlap))
    return 1 + ((MAX_WINDOWS - 1) * stride + run) * temporal_factor


@dataclass(frozen=True)
class Limits:
    """How much one request may ask of a bundle, from its config alone (`limits`): validation refuses anything
    beyond before any planning, and the planner and the window loop stay inside it."""

    temporal_factor: int
    window: int  # latent frames of the native clip: one window
    max_frames: int  # the longest video (pixel frames): MAX_WINDOWS windows of the native clip
    max_windows: int = MAX_WINDOWS
    max_shots: int = MAX_WINDOWS  # a shot is seen through a window's prompt: more could never show

    def check_length(self, frames: int, fps: float) -> None:
        """A video of `frames` frames at `fps` must fit; checked before planning, whose work grows with it."""
        if frames > self.max_frames:
            raise InputError("seconds", f"{(frames - 1) / fps:g} s at {fps:g} fps is {frames} frames",
                             f"at most {self.max_frames} frames ({(self.max_frames - 1) / fps:g} s at {fps:g} fps)")


def limits(bundle) -> Limits:
    """The bundle's limits (see `Limits`)."""
    tf = bundle.family.temporal_factor(bundle)
    window = (bundle.config.num_frames - 1) // tf + 1
    return Limits(temporal_factor=tf, window=window, max_frames=max_long_frames(window, tf))


def window_latents(latents: torch.Tensor, run: tuple[int, int]) -> torch.Tensor:
    """A window's latents: the anchor frame, then its run."""
    return torch.cat([latents[:, :, :1], latents[:, :, run[0]:run[1]]], dim=2)


def window_weights(length: int, ramp: int) -> torch.Tensor:
    """Per-frame fusion weights of one run: 1 in the middle, rising linearly over `ramp` frames at each end
    (never 0, so a frame covered by one window keeps its prediction)."""
    w = torch.ones(length)
    for i in range(min(ramp, length)):
        w[i] = w[length - 1 - i] = min(w[i], (i + 1) / (ramp + 1))
    return w


def fuse_windows(preds: Sequence[torch.Tensor], runs: Sequence[tuple[int, int]], total: int, ramp: int):
    """Per-window predictions [B, C, 1 + run, h, w] -> one [B, C, total, h, w]: the anchor frame averaged over
    all windows, each later frame a ramp-weighted average of the windows covering it."""
    first = preds[0]
    out = first.new_zeros(first.shape[0], first.shape[1], total, *first.shape[3:])
    norm = first.new_zeros(total)
    for pred, (s, e) in zip(preds, runs):
        w = torch.cat([torch.ones(1), window_weights(e - s, ramp)]).to(pred)
        if s == 1:
            w[1:1 + ramp] = 1.0  # nothing before the first run to blend with
        if e == total:
            w[len(w) - ramp:] = 1.0
        out[:, :, :1] += pred[:, :, :1] * w[0]
        out[:, :, s:e] += pred[:, :, 1:] * w[1:].view(1, 1, -1, 1, 1)
        norm[0] += w[0]
        norm[s:e] += w[1:]
    return out / norm.view(1, 1, -1, 1, 1)


def freenoise(shape: tuple, window: int, generator: torch.Generator | None) -> torch.Tensor:
    """Initial noise [B, C, F, h, w] whose frames past the first window repeat the first window's frames,
    shuffled in each repeat (FreeNoise's noise rescheduling)."""
    base = randn_tensor((*shape[:2], min(window, shape[2]), *shape[3:]), generator=generator)
    frames = [base]
    while sum(f.shape[2] for f in frames) < shape[2]:
        perm = torch.randperm(base.shape[2], generator=generator)
        frames.append(base[:, :, perm])
    return torch.cat(frames, dim=2)[:, :, : shape[2]]


def seam_ratio(frames: np.ndarray, boundaries: Sequence[int]) -> float:
    """Mean absolute frame-to-frame change across window boundaries / mean change within windows.
    frames: [T, H, W, 3]; boundaries: pixel frame indices b where frames b-1 -> b cross a seam. ~1: seamless."""
    diffs = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))  # diffs[i]: i -> i+1
    at = {b - 1 for b in boundaries if 0 < b < len(frames)}
    across = [diffs[i] for i in sorted(at)]
    within = [d for i, d in enumerate(diffs) if i not in at]
    return float(np.mean(across) / max(np.mean(within), 1e-6))


def pixel_boundaries(runs: Sequence[tuple[int, int]], temporal_factor: int) -> list[int]:
    """Pixel frames where ownership passes from one window to the next (the middle of each overlap). Latent
    frame j >= 1 decodes to pixel frames 1 + tf (j - 1) ... tf j."""
    out = []
    for (_, e0), (s1, _) in zip(runs, runs[1:]):
        latent = (s1 + e0 + 1) // 2 if e0 > s1 else s1
        out.append(1 + (latent - 1) * temporal_factor)
    return out


def decode_windows(pipe: TextToVideoPipeline, latents: torch.Tensor, runs, overlap: int, output_type="np"):
    """Decode each window (anchor + run) on its own, as the VAE was trained, and blend the overlapping pixel
    frames with ramp weights (temporal tiling of the decoder; the latents are already continuous)."""
    tf = pipe.bundle.family.temporal_factor(pipe.bundle)
    total = latents.shape[2]
    frames = 1 + (total - 1) * tf
    out, norm = None, torch.zeros(frames)
    for s, e in runs:
        video = pipe.decode_latents(window_latents(latents, (s, e)), "pt")  # [B, 1 + tf (e - s), 3, H, W]
        w = torch.cat([torch.ones(1), window_weights(video.shape[1] - 1, overlap * tf)])
        if s == 1:
            w[1:1 + overlap * tf] = 1.0
        if e == total:
            w[len(w) - overlap * tf:] = 1.0
        if out is None:
            out = video.new_zeros(video.shape[0], frames, *video.shape[2:])
        index = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + (s - 1) * tf, 1 + (e - 1) * tf)])
        out[:, index] += video * w.view(1, -1, 1, 1, 1).to(video)
        norm[index] += w
    out = out / norm.view(1, -1, 1, 1, 1).to(out)
    return out if output_type == "pt" else to_uint8(out)


def concatenated_clips(pipe: TextToVideoPipeline, prompt: str | list[str], num_frames: int, seed: int = 0,
                       **kwargs) -> tuple[np.ndarray, list[int]]:
    """The naive baseline: independent native-length clips (seed, seed+1, ...) cut to num_frames and joined.
    Returns (frames [T, H, W, 3], the pixel frames where clips join)."""
    native = kwargs.pop("window_frames", None) or pipe.bundle.config.num_frames
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = -(-num_frames // native)
    clips = [pipe(prompts[i % len(prompts)], num_frames=native, seed=seed + i, **kwargs).frames[0] for i in range(n)]
    return np.concatenate(clips)[:num_frames], [native * i for i in range(1, n)]


# --- the pipeline ----------------------------------------------------------------------------------------

@dataclass
class LongVideoOutput(VideoOutput):
    windows: list = None  # latent [start, end) per window
    boundaries: list = None  # pixel frames where windows hand over
    window_prompts: list = None


class LongVideoPipeline:
    """A TextToVideoPipeline's model, sampled over overlapping windows of its native clip length."""

    def __init__(self, pipe: TextToVideoPipeline):
        self.pipe = pipe
        self.bundle = pipe.bundle

    def native_latent_frames(self) -> int:
        return limits(self.bundle).window

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_frames: int, negative_prompt: str | None = None,
                 window_frames: int | None = None, overlap: int | None = None, height: int | None = None,
                 width: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, sampler: str | None = None,
                 fps: float | None = None, output_type: str = "np",
                 predictor: Callable | None = None,  # (window latents, t, window embeds, guidance) -> preds
                 callback_on_step_end: Callable[["LongVideoPipeline", int, Any, dict], dict] | None = None,
                 callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",), image=None,
                 last_image=None, guidance_scale_2: float | None = None) -> LongVideoOutput:
        """prompt: one prompt, or one per window (multi-shot). callback_on_step_end as TextToVideoPipeline's
        (its "prompt_embeds" are the per-window embeddings). image, last_image: the first (and last) frame, as
        TextToVideoPipeline's (latent frame 0 is every window's anchor, so the first frame holds across them)."""
        b, fam = self.bundle, self.bundle.family
        start = time.perf_counter()
        tf = fam.temporal_factor(b)

        # 1. Check inputs: every per-window field through the model's own limits; the length here.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        native = window_frames or b.config.num_frames
        p = resolve(b, prompts[0], negative_prompt=negative_prompt, num_frames=native, height=height, width=width,
                    num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler, fps=fps,
                    seed=seed, guidance_scale_2=guidance_scale_2)
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % tf:
            raise InputError("num_frames", f"{num_frames} is not supported by this model", f"1 + {tf}k")
        total = (num_frames - 1) // tf + 1
        window = (native - 1) // tf + 1
        overlap = default_overlap(window) if overlap is None else overlap
        windows = latent_windows(total, window, overlap)
        if len(windows) > MAX_WINDOWS:
            raise InputError("num_frames", f"{num_frames} frames need {len(windows)} windows",
                             f"at most {MAX_WINDOWS} windows ({max_long_frames(window, tf, overlap)} frames)")
        if len(prompts) not in (1, len(windows)):
            raise InputError("prompt", f"{len(prompts)} prompts for {len(windows)} windows", f"1 or {len(windows)}")
        window_prompts = prompts * len(windows) if len(prompts) == 1 else prompts
        images = check_images(b, image, last_image, p.width, p.height)
        cfg = p.guided

        # 2. Encode each distinct prompt once; with guidance the negative prompt rides first.
        distinct = list(dict.fromkeys(window_prompts))
        encoded = self.pipe.encode_prompt(p.negative_prompts * cfg + distinct)
        negative, positive = (encoded[:1], encoded[1:]) if cfg else (None, encoded)
        embeds = [torch.cat([negative, positive[i:i + 1]]) if cfg else positive[i:i + 1]
                  for i in (distinct.index(wp) for wp in window_prompts)]

        # 3. Scheduler and timesteps.
        scheduler = scheduler_for(b, p.sampler, p.num_inference_steps)

        # 4. Initial noise, FreeNoise-shared across windows.
        generator = torch.Generator("cpu").manual_seed(p.seed)
        shape = fam.latent_shape(b, 1, num_frames, p.height, p.width)
        noise = frame_correlated_noise(freenoise(shape, window, generator), b.config.frame_noise_correlation,
                                       generator)
        latents = fam.init_latents(noise.to(b.device), scheduler)
        condition = self.pipe.image_condition(images, num_frames, p.height, p.width, noise.to(b.device))
        if condition.per_token_timesteps:  # its timesteps cover the whole video's tokens, not one window's
            raise InputError("image", "this model's image conditioning (per-token timesteps, Wan2.2 TI2V) "
                             "does not reach across the windows of a long video", f"≤ {native} frames with an image")
        embeds = [condition.embeds(e) for e in embeds]

        # 5. Denoise: per-window predictions (in parallel where the predictor fans out), fused, one step.
        predict = step_predictor(b, predictor or local_predictor(b), len(scheduler.timesteps))
        t0 = time.perf_counter()
        for i, t in enumerate(scheduler.timesteps):
            latents = condition.before_step(scheduler, latents, t)
            scaled = condition.model_input(model_input(scheduler, latents, t))
            # Every window at the same step: the same expert, so one switch for the whole video.
            guidance = p.guidance(fam.expert(b, t))
            preds = predict([window_latents(scaled, run) for run in windows], t, embeds, guidance)
            fused = fuse_windows(preds, windows, total, ramp=overlap)
            latents = fam.step(scheduler, fused, t, latents, generator=generator)
            if callback_on_step_end is not None:
                local = {"latents": latents, "prompt_embeds": embeds}
                outputs = callback_on_step_end(self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                latents = (outputs or {}).get("latents", latents)
        latents = condition.after_last_step(latents)
        denoise_s = time.perf_counter() - t0

        # 6. Decode window by window (the VAE decodes the lengths it was trained on), blending the overlaps.
        t0 = time.perf_counter()
        frames = latents if output_type == "latent" else decode_windows(self.pipe, latents, windows, overlap,
                                                                         output_type)
        timings = {"denoise_s": denoise_s, "decode_s": time.perf_counter() - t0,
                   "total_s": time.perf_counter() - start}
        p.num_frames = num_frames
        return LongVideoOutput(frames=frames, params=p, timings=timings, windows=windows,
                               boundaries=pixel_boundaries(windows, tf), window_prompts=window_prompts)
