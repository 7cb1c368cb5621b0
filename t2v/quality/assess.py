"""Video quality assessment, offline and from pixels: each score is a
short function of uint8 frames [T, H, W, 3] in [0, 1], higher is better, and `assess` combines them with a
weighted total and plain-language recommendations.

- temporal: VBench's temporal flickering, (255 - mean |frame(t+1) - frame(t)|) / 255, and the mean SSIM of
  consecutive frames;
- motion (OpenCV Farneback optical flow): smoothness (how little the flow changes from pair to pair) and
  dynamics (the share of frame pairs that move at all);
- visual: sharpness (variance of the Laplacian), exposure (mid-grey mean, few clipped pixels), colourfulness
  (Hasler & Suesstrunk);
- text alignment: the world analyzer's share of attributes right for prompts in the world's vocabulary, else
  MiniLM cosine between the prompt and the analyzer's description of the video.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

WEIGHTS = {"flicker": 0.15, "consistency": 0.15, "smoothness": 0.1, "dynamics": 0.1, "sharpness": 0.1,
           "exposure": 0.1, "colorfulness": 0.05, "text_alignment": 0.25}


def _gray(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def flicker_score(frames: np.ndarray) -> float:
    if len(frames) < 2:
        return 1.0
    return float((255 - np.abs(np.diff(frames.astype(np.float32), axis=0)).mean()) / 255)


def consistency_score(frames: np.ndarray) -> float:
    """Mean SSIM (7x7 Gaussian windows, grey) of consecutive frames."""
    import cv2

    if len(frames) < 2:
        return 1.0
    g = _gray(frames)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (7, 7), 1.5)  # noqa: E731
    out = []
    for a, b in zip(g[:-1], g[1:]):
        ma, mb = blur(a), blur(b)
        va, vb, cov = blur(a * a) - ma * ma, blur(b * b) - mb * mb, blur(a * b) - ma * mb
        ssim = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma * ma + mb * mb + c1) * (va + vb + c2))
        out.append(ssim.mean())
    return float(np.clip(np.mean(out), 0, 1))


def optical_flows(frames: np.ndarray) -> list[np.ndarray]:
    import cv2

    g = _gray(frames).astype(np.uint8)
    return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0) for a, b in zip(g[:-1], g[1:])]


def motion_scores(frames: np.ndarray, moving_px: float = 1.0) -> dict:
    """Per frame pair, the motion of what moves: the mean flow magnitude of its fastest 5% of pixels (VBench's
    dynamic degree reads the top flows too: a small object on a still background is still motion).
    dynamics: share of pairs moving more than `moving_px` (per 128 pixels of width); smoothness: 1 - the mean
    change of that motion from pair to pair relative to its size; magnitude in pixels per frame."""
    if len(frames) < 3:
        return {"smoothness": 1.0, "dynamics": 0.0, "magnitude": 0.0}
    flows = optical_flows(frames)
    mags = []
    for f in flows:
        m = np.linalg.norm(f, axis=-1).ravel()
        mags.append(float(np.sort(m)[-max(1, m.size // 20):].mean()))
    mags = np.array(mags)
    threshold = moving_px * frames.shape[2] / 128
    change = np.abs(np.diff(mags)).mean()
    return {"smoothness": float(np.clip(1 - change / (mags.mean() + threshold), 0, 1)),
            "dynamics": float(np.mean(mags > threshold)), "magnitude": float(mags.mean())}


def sharpness_score(frames: np.ndarray) -> float:
    """Edge strength: the mean of the strongest 1% of Laplacian responses (flat regions say nothing about
    focus), squashed to [0, 1): 0.5 at 20 grey levels."""
    import cv2

    def edge(g):
        lap = np.abs(cv2.Laplacian(g, cv2.CV_32F)).ravel()
        return np.sort(lap)[-max(1, lap.size // 100):].mean()

    s = float(np.mean([edge(g) for g in _gray(frames)]))
    return s / (s + 20.0)


def exposure_score(frames: np.ndarray) -> float:
    g = _gray(frames)
    clipped = float(((g < 3) | (g > 252)).mean())
    return float(np.clip(1 - abs(g.mean() - 127.5) / 127.5 - 0.5 * clipped, 0, 1))


def colorfulness_score(frames: np.ndarray) -> float:
    """Hasler & Suesstrunk's colourfulness M, squashed: 0.5 at M = 30 ('moderately colourful')."""
    f = frames.astype(np.float32)
    rg, yb = f[..., 0] - f[..., 1], 0.5 * (f[..., 0] + f[..., 1]) - f[..., 2]
    m = np.sqrt(rg.std() ** 2 + yb.std() ** 2) + 0.3 * np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(m / (m + 30.0))


def describe(analysis: dict) -> str:
    """The world analyzer's reading of a clip in words (for text similarity)."""
    objects = [" ".join(filter(None, [o.get("size"), o.get("color"), o.get("shape"), o.get("motion")]))
               for o in analysis.get("objects", [])]
    return f"{' and '.join(objects) or 'nothing'} on a {analysis.get('background', 'plain')} background"


def text_alignment(frames: np.ndarray, prompt: str) -> tuple[float, str, list[str]]:
    """(score, method, the attributes the video gets wrong)."""
    from ..world.analyze import analyze
    from ..world.parse import parse_prompt
    from ..world.score import score

    asked = parse_prompt(prompt)
    if asked.get("objects") or asked.get("background"):
        scores = {k: bool(v) for k, v in score(frames, prompt).items() if isinstance(v, (bool, np.bool_))}
        if scores:
            return float(np.mean(list(scores.values()))), "world analyzer", [k for k, v in scores.items() if not v]
    import torch

    tokenizer, model = _minilm()

    with torch.no_grad():
        tok = tokenizer([prompt, describe(analyze(frames))], padding=True, return_tensors="pt")
        h = model(**tok).last_hidden_state
        e = (h * tok.attention_mask[..., None]).sum(1) / tok.attention_mask.sum(1, keepdim=True)
        cos = torch.nn.functional.cosine_similarity(e[0], e[1], dim=0).item()
    return float(np.clip(cos, 0, 1)), "MiniLM similarity", []


@functools.lru_cache(maxsize=1)
def _minilm():
    from ..text import load_default_text_encoder

    return load_default_text_encoder()


@dataclass
class Assessment:
    scores: dict
    total: float
    recommendations: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'score':<16}{'value':>7}"] + [f"{k:<16}{v:>7.3f}" for k, v in self.scores.items()]
        lines.append(f"{'total':<16}{self.total:>7.3f}")
        lines += [f"- {r}" for r in self.recommendations]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"scores": self.scores, "total": self.total, "recommendations": self.recommendations,
                "details": self.details}


def assess(frames: np.ndarray, prompt: str | None = None) -> Assessment:
    frames = np.asarray(frames)
    motion = motion_scores(frames)
    scores = {"flicker": flicker_score(frames), "consistency": consistency_score(frames),
              "smoothness": motion["smoothness"], "dynamics": motion["dynamics"],
              "sharpness": sharpness_score(frames), "exposure": exposure_score(frames),
              "colorfulness": colorfulness_score(frames)}
    details = {"motion_px_per_frame": motion["magnitude"]}
    if prompt:
        scores["text_alignment"], details["alignment_method"], details["wrong"] = text_alignment(frames, prompt)
    weights = {k: WEIGHTS[k] for k in scores}
    total = sum(scores[k] * w for k, w in weights.items()) / sum(weights.values())
    return Assessment(scores={k: round(v, 4) for k, v in scores.items()}, total=round(float(total), 4),
                      recommendations=recommend(scores, details.get("wrong", [])), details=details)


def recommend(scores: dict, wrong: list[str] = ()) -> list[str]:
    out = []
    if scores["flicker"] < 0.9 or scores["consistency"] < 0.6:
        out.append("frames flicker: raise num_inference_steps, or post-process with temporal smoothing (smooth=3)")
    if scores["dynamics"] < 0.3:
        out.append("little or no motion: name the motion in the prompt (e.g. 'moving to the right', 'bouncing')")
    elif scores["smoothness"] < 0.5:
        out.append("jerky motion: generate keyframes at a lower fps and interpolate (keyframe_fps, interpolate=flow)")
    if scores["sharpness"] < 0.2:
        out.append("blurry: raise guidance_scale or num_inference_steps")
    if scores["exposure"] < 0.3:
        out.append("badly exposed: ask for a background explicitly, or use a negative prompt such as 'dark, washed out'")
    if wrong:
        out.append(f"the video does not show what the prompt asks for ({', '.join(wrong)}): raise guidance_scale, "
                   "try other seeds, or simplify the prompt")
    elif scores.get("text_alignment", 1.0) < 0.6:
        out.append("does not match the prompt well: simplify it to one or two objects, raise guidance_scale, or try "
                   "other seeds")
    return out or ["no problems found"]
