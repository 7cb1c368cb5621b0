"""Shot planning: a prompt and a duration -> a VideoPlan of shots, each
with its frame range, camera motion and prompt. "then"-separated prompts become consecutive shots; a single
prompt longer than one shot gets establishing / medium / closing shots, about one per `shot_seconds`.
The long-video pipeline gives every window the prompt of the shot it falls in.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from ..errors import InputError

# Camera motions the world (and so the default model) knows, in the phrasing of its captions.
CAMERA_PHRASES = {"zoom out": "the camera zooms out", "zoom in": "the camera zooms in",
                  "pan left": "camera panning to the left", "pan right": "camera panning to the right"}
SHOT_CAMERA = {"establishing": "zoom out", "medium": None, "closing": "zoom in", "single": None}
_CAMERA_WORDS = re.compile(r"\b(zoom|zooms|zooming|pan|pans|panning|camera|view sweeps|pushes in|pulls back)\b",
                           re.I)
_THEN = re.compile(r"\s*(?:[,;.]\s*)?\b(?:and\s+)?then\b\s*", re.I)


@dataclass
class Shot:
    index: int
    kind: str  # establishing | medium | closing | single | scene (one "then" part)
    start_frame: int  # first frame, inclusive
    end_frame: int  # exclusive
    camera: str | None  # a CAMERA_PHRASES key, or None (static, or as the prompt says)
    prompt: str


@dataclass
class VideoPlan:
    prompt: str
    num_frames: int
    fps: float
    shots: list[Shot] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        lines = [f"plan: {self.num_frames} frames at {self.fps:g} fps ({(self.num_frames - 1) / self.fps:.1f} s), "
                 f"{len(self.shots)} shot(s)"]
        for s in self.shots:
            lines.append(f"  {s.index + 1}. {s.kind:<12} frames {s.start_frame:>3}-{s.end_frame - 1:<3} "
                         f"camera {s.camera or 'static':<9} \"{s.prompt}\"")
        return "\n".join(lines)

    def prompt_at(self, frame: int) -> str:
        for s in self.shots:
            if s.start_frame <= frame < s.end_frame:
                return s.prompt
        return self.shots[-1].prompt


def split_then(prompt: str) -> list[str]:
    """'a red ball rolls left, then a blue star spins' -> ['a red ball rolls left', 'a blue star spins']."""
    return [p.strip(" ,;.") for p in _THEN.split(prompt) if p.strip(" ,;.")]


def with_camera(prompt: str, camera: str | None) -> str:
    if camera is None or _CAMERA_WORDS.search(prompt):  # the user's own camera wins
        return prompt
    return f"{prompt}, {CAMERA_PHRASES[camera]}"


def plan_video(prompt: str, num_frames: int, fps: float, shot_seconds: float = 3.0,
               max_shots: int | None = None, clip_frames: int | None = None) -> VideoPlan:
    """max_shots: the most shots the video can show (`long_video.limits(bundle).max_shots`); None: one a frame.
    clip_frames: the model's own clip length: a video no longer is one shot unless its prompt has "then" parts
    (Wan's 81 frames at 16 fps are one clip, not two 2.5 s shots). The shot count is bounded before any shot is
    made: a plan is as large as a request may ask, no larger."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt", "is empty", "a non-empty string")
    if num_frames < 1:
        raise InputError("num_frames", f"{num_frames}", "≥ 1")
    parts = split_then(prompt)
    if not parts:  # "then" alone, or with punctuation
        raise InputError("prompt", "is empty once split at \"then\"", "a non-empty string")
    if len(parts) > 1:  # a shot per part
        n = len(parts)
        if max_shots is not None and n > max_shots:
            raise InputError("prompt", f"has {n} \"then\" parts (shots)", f"at most {max_shots}")
        kinds, prompts = ["scene"] * n, parts
    else:  # about one shot per shot_seconds, as many as the video can show
        n = max(1, min(round((num_frames - 1) / fps / shot_seconds), max_shots or num_frames))
        if clip_frames is not None and num_frames <= clip_frames:
            n = 1
        kinds = ["single"] if n == 1 else ["establishing"] + ["medium"] * (n - 2) + ["closing"]
        prompts = [parts[0]] * n
    if n > num_frames:
        raise InputError("seconds", f"{num_frames} frames are too few for {n} shots", f"≥ {n} frames")
    bounds = [round(i * num_frames / n) for i in range(n + 1)]
    shots = [Shot(index=i, kind=kinds[i], start_frame=bounds[i], end_frame=bounds[i + 1],
                  camera=None if kinds[i] == "scene" or _CAMERA_WORDS.search(prompts[i]) else SHOT_CAMERA[kinds[i]],
                  prompt="") for i in range(n)]
    for s in shots:
        s.prompt = with_camera(prompts[s.index], s.camera)
    return VideoPlan(prompt=prompt, num_frames=num_frames, fps=fps, shots=shots)


def window_prompts(plan: VideoPlan, runs: list[tuple[int, int]], temporal_factor: int) -> list[str]:
    """The prompt of each long-video window: the shot holding the middle pixel frame of its run."""
    out = []
    for s, e in runs:
        middle = 1 + ((s + e - 1) / 2 - 1) * temporal_factor
        out.append(plan.prompt_at(int(round(middle))))
    return out
