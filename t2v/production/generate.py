"""One video request end to end, for the CLI and the job API: plan the shots, generate keyframes at
`keyframe_fps` (one clip, or co-denoised windows when longer than the model's clip), then post-process
(interpolate to the output fps, colour-match shots, motion blur, temporal smoothing)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError
from ..long_video import LongVideoPipeline, default_overlap, latent_windows, limits
from ..pipeline import TextToVideoPipeline, progress_callback
from ..params import check_steps
from ..sampling import num_timesteps
from .planner import VideoPlan, plan_video, window_prompts
from .postprocess import INTERPOLATIONS, MAX_SMOOTH, color_match_shots, interpolate, motion_blur, temporal_smooth


@dataclass
class PostOptions:
    keyframe_fps: float | None = None  # generate at this rate, then interpolate up to the output fps
    interpolate: str = "flow"  # linear | flow
    motion_blur: float = 0.0  # 0 to 1
    smooth: int = 1  # odd window of frames, 1 = off
    color_match: bool = False  # match every shot's colours to the first shot's

    def check(self) -> None:
        if self.interpolate not in INTERPOLATIONS:
            raise InputError("interpolate", f"unknown method {self.interpolate!r}", ", ".join(INTERPOLATIONS))
        if not 0 <= self.motion_blur <= 1:
            raise InputError("motion_blur", f"{self.motion_blur}", "0 to 1")
        if not 1 <= self.smooth <= MAX_SMOOTH or self.smooth % 2 == 0:
            raise InputError("smooth", f"{self.smooth}", f"an odd number of frames, 1 to {MAX_SMOOTH}")


@dataclass
class ComposedVideo:
    frames: np.ndarray  # uint8 [T, H, W, 3] at `fps`
    fps: float
    plan: VideoPlan
    params: dict  # the generation parameters of the keyframes
    timings: dict = field(default_factory=dict)
    windows: list | None = None


def generate(pipe: TextToVideoPipeline, prompt: str, num_frames: int | None = None, fps: float | None = None,
            post: PostOptions = PostOptions(), negative_prompt: str | None = None, seed: int | None = None,
            progress: Callable[[int, int], None] | None = None, predictor: Callable | None = None,
            **generation) -> ComposedVideo:
    """generation: height, width, num_inference_steps, guidance_scale, sampler (as TextToVideoPipeline).
    predictor: where windows are predicted (default: this process; the Serve graph fans them out)."""
    b = pipe.bundle
    tf = b.family.temporal_factor(b)
    t0 = time.perf_counter()

    # 1. Output and keyframe rates; frames at the keyframe rate.
    post.check()
    fps = float(fps or b.config.fps)
    num_frames = num_frames or b.config.num_frames
    key_fps = float(post.keyframe_fps or fps)
    lim = limits(b)
    lim.check_length(num_frames, fps)  # before the plan and the buffers, which grow with it
    key_frames, factor = keyframes(num_frames, fps, key_fps, tf)
    steps = check_steps(generation.get("num_inference_steps") or b.config.num_inference_steps)
    on_step = progress_callback(progress, num_timesteps(b, generation.get("sampler"), steps))

    # 2. Plan the shots (then-parts, or establishing / medium / closing for long single prompts).
    plan = plan_video(prompt, key_frames, key_fps, max_shots=lim.max_shots,
                      clip_frames=b.config.num_frames)

    # 3. Keyframes: one clip when it fits the model and the plan is one shot; else co-denoised windows.
    if key_frames <= b.config.num_frames and len(plan.shots) == 1:
        out = pipe(plan.shots[0].prompt, negative_prompt=negative_prompt, num_frames=key_frames, fps=key_fps,
                   seed=seed, callback_on_step_end=on_step, **generation)
        frames, windows = out.frames[0], None
    else:
        long = LongVideoPipeline(pipe)
        total = (key_frames - 1) // tf + 1
        runs = latent_windows(total, long.native_latent_frames(), default_overlap(long.native_latent_frames()))
        out = long(window_prompts(plan, runs, tf), num_frames=key_frames, negative_prompt=negative_prompt,
                   fps=key_fps, seed=seed, callback_on_step_end=on_step, predictor=predictor, **generation)
        frames, windows = out.frames[0], out.windows
    params = asdict(out.params)
    t1 = time.perf_counter()

    # 4. Post-processing, in the order a colourist would: grade, then retime, then blur and smooth.
    if post.color_match and len(plan.shots) > 1:
        frames = color_match_shots(frames, [(s.start_frame, s.end_frame) for s in plan.shots])
    frames = interpolate(frames, factor, post.interpolate)
    if post.motion_blur:
        frames = motion_blur(frames, post.motion_blur)
    if post.smooth > 1:
        frames = temporal_smooth(frames, post.smooth)
    frames = frames[:num_frames] if factor > 1 else frames
    if factor > 1:  # the plan in output frames
        for s in plan.shots:
            s.start_frame, s.end_frame = s.start_frame * factor, min(len(frames), s.end_frame * factor)
        plan.num_frames, plan.fps = len(frames), fps
    timings = {**out.timings, "generate_s": t1 - t0, "postprocess_s": time.perf_counter() - t1}
    return ComposedVideo(frames=frames, fps=fps, plan=plan, params=params, timings=timings, windows=windows)


def keyframes(num_frames: int, fps: float, keyframe_fps: float, temporal_factor: int) -> tuple[int, int]:
    """(frames to generate at keyframe_fps, interpolation factor). Without keyframes the count goes to the
    model unchanged, so a bad one is refused rather than rounded; with them it lands on the 1 + tf*k grid."""
    factor = fps / keyframe_fps if keyframe_fps > 0 else 0
    if factor < 1 or abs(factor - round(factor)) > 1e-6:
        raise InputError("keyframe_fps", f"{keyframe_fps:g} does not divide the output fps {fps:g}",
                         f"fps / k for a whole k (e.g. {fps / 2:g})")
    factor = int(round(factor))
    if factor == 1:
        return num_frames, 1
    return 1 + temporal_factor * max(0, round((num_frames - 1) / factor / temporal_factor)), factor
