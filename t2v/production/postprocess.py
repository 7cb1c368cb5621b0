"""Post-processing of finished frames, each a small pure function of uint8 [T, H, W, 3] arrays:
frame interpolation (linear blend, or optical flow with OpenCV's Farneback), motion blur, temporal smoothing,
and colour correction (histogram matching of each shot to the first)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError

INTERPOLATIONS = ("linear", "flow")
# A moving average wider than this only blurs (about two seconds at 16 fps), and its edge padding grows with it.
MAX_SMOOTH = 31


def interpolate(frames: np.ndarray, factor: int, method: str = "linear") -> np.ndarray:
    """(T - 1) * factor + 1 frames: the originals, with factor - 1 new frames between each pair."""
    if method not in INTERPOLATIONS:
        raise InputError("interpolate", f"unknown method {method!r}", ", ".join(INTERPOLATIONS))
    if not isinstance(factor, int) or factor < 1:
        raise InputError("interpolate_factor", f"{factor}", "an integer ≥ 1")
    if factor == 1 or len(frames) < 2:
        return frames.copy()
    out = [frames[0]]
    for a, b in zip(frames[:-1], frames[1:]):
        flows = _flows(a, b) if method == "flow" else None
        for k in range(1, factor):
            t = k / factor
            out.append(_flow_blend(a, b, t, *flows) if flows else _blend(a, b, t))
        out.append(b)
    return np.stack(out)


def _blend(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    return np.clip((1 - t) * a.astype(np.float32) + t * b.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


def _flows(a: np.ndarray, b: np.ndarray):
    import cv2

    ga, gb = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    args = dict(pyr_scale=0.5, levels=3, winsize=9, iterations=3, poly_n=5, poly_sigma=1.1, flags=0)
    return (cv2.calcOpticalFlowFarneback(ga, gb, None, **args), cv2.calcOpticalFlowFarneback(gb, ga, None, **args))


def _flow_blend(a, b, t, flow_ab, flow_ba) -> np.ndarray:
    """Warp a forward by t and b backward by 1 - t along the flows, then blend."""
    import cv2

    h, w = a.shape[:2]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    # A pixel at p in the middle frame came from p - t * flow_ab in a and p - (1 - t) * flow_ba in b
    # (flows sampled at p: a first-order approximation that is exact for constant motion).
    wa = cv2.remap(a, gx - t * flow_ab[..., 0], gy - t * flow_ab[..., 1], cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)
    wb = cv2.remap(b, gx - (1 - t) * flow_ba[..., 0], gy - (1 - t) * flow_ba[..., 1], cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)
    return _blend(wa, wb, t)


def motion_blur(frames: np.ndarray, strength: float) -> np.ndarray:
    """Each frame mixed with its neighbours: strength 0 = unchanged, 1 = equal thirds."""
    if not 0 <= strength <= 1:
        raise InputError("motion_blur", f"{strength}", "0 to 1")
    f = frames.astype(np.float32)
    prev = np.concatenate([f[:1], f[:-1]])
    nxt = np.concatenate([f[1:], f[-1:]])
    w = strength / 3
    return np.clip((1 - 2 * w) * f + w * (prev + nxt) + 0.5, 0, 255).astype(np.uint8)


def temporal_smooth(frames: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average over `window` frames (odd), edges replicated: removes frame-to-frame flicker."""
    if not 1 <= window <= MAX_SMOOTH or window % 2 == 0:
        raise InputError("smooth", f"{window}", f"an odd number of frames, 1 to {MAX_SMOOTH}")
    if window == 1:
        return frames.copy()
    r = window // 2
    f = np.concatenate([np.repeat(frames[:1], r, 0), frames, np.repeat(frames[-1:], r, 0)]).astype(np.float32)
    c = np.cumsum(np.concatenate([np.zeros_like(f[:1]), f]), axis=0)
    return np.clip((c[window:] - c[:-window]) / window + 0.5, 0, 255).astype(np.uint8)


def match_histogram(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map each channel's value distribution of `frames` onto that of `reference` (CDF matching)."""
    out = np.empty_like(frames)
    for c in range(3):
        src, ref = frames[..., c].ravel(), reference[..., c].ravel()
        s_cdf = np.cumsum(np.bincount(src, minlength=256)) / src.size
        r_cdf = np.cumsum(np.bincount(ref, minlength=256)) / ref.size
        lut = np.interp(s_cdf, r_cdf, np.arange(256)).round().astype(np.uint8)
        out[..., c] = lut[frames[..., c]]
    return out


def color_match_shots(frames: np.ndarray, shot_ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Every shot's colours matched to the first shot's histogram (consistent grading across a plan)."""
    out = frames.copy()
    s0, e0 = shot_ranges[0]
    for s, e in shot_ranges[1:]:
        out[s:e] = match_histogram(frames[s:e], frames[s0:e0])
    return out
