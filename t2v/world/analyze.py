"""Recover a clip's scene description from its pixels alone: analyze(frames) -> background, camera, objects,
relation (the structure parse.parse_prompt gives a prompt, so score.py can compare the two).

The analyzer never looks at a Scene: it classifies the background from colour statistics, segments objects by
nearest colour (object colours blended with the background's palette, so antialiased edges get a coverage),
estimates the camera by testing the five camera hypotheses against the background's structure, and classifies
each object's motion from its camera-compensated trajectory.
"""

from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np

from .render import BOUNCE_HEIGHT, PAN, ZOOM
from .scene import ALL_BACKGROUNDS, CAMERAS, COLORS, SIZES, SPEEDS, background_palette, contrasts
from .shapes import SHAPE_AREA, classify_shape, shape_features

# --------------------------------------------------------------------------------------------------------------
# Colour model
# --------------------------------------------------------------------------------------------------------------

_Q = 4  # LUT quantisation step (64 levels per channel)
_NQ = 256 // _Q
_OBJ_NAMES = tuple(COLORS)
_MAX_DIST = 70.0  # farther than this from every model colour: unknown


def _segments_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of points p [N,3] to segment a->b, and the parameter t in [0, 1] (0 at a)."""
    d = b - a
    dd = float(d @ d)
    t = np.zeros(len(p)) if dd == 0 else np.clip((p - a) @ d / dd, 0.0, 1.0)
    q = a + t[:, None] * d
    return np.sqrt(((p - q) ** 2).sum(1)), t


def _bg_segments(background: str) -> list[tuple[np.ndarray, np.ndarray]]:
    pal = [np.array(c, float) for c in background_palette(background)]
    segs = [(c, c) for c in pal]
    segs += [(pal[i], pal[j]) for i in range(len(pal)) for j in range(i + 1, len(pal))]
    return segs


def _object_colors_for(background: str) -> list[str]:
    """Object colours a scene on this background can have (the contrast rule scenes are built with)."""
    return [c for c in _OBJ_NAMES if contrasts(c, background)]


@lru_cache(maxsize=None)
def _lut(background: str) -> tuple[np.ndarray, np.ndarray]:
    """Per quantised colour: label (-1 background, -2 unknown, else index into _OBJ_NAMES) and coverage 0..255."""
    g = (np.arange(_NQ) * _Q + _Q / 2.0)
    p = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    best = np.full(len(p), np.inf)
    label = np.full(len(p), -1, np.int8)
    alpha = np.zeros(len(p))
    for a, b in _bg_segments(background):
        d, _ = _segments_dist(p, a, b)
        better = d < best
        best[better] = d[better]
    pal = [np.array(c, float) for c in background_palette(background)]
    for name in _object_colors_for(background):
        k = _OBJ_NAMES.index(name)
        c = np.array(COLORS[name], float)
        for b in pal:
            d, t = _segments_dist(p, b, c)
            better = d < best
            best[better] = d[better]
            label[better] = k
            alpha[better] = t[better]
    label[(label >= 0) & (alpha < 0.2)] = -1  # barely tinted background is background
    label[best > _MAX_DIST] = -2
    alpha[label < 0] = 0.0
    return label, np.round(alpha * 255).astype(np.uint8)


def _quantise(frames: np.ndarray) -> np.ndarray:
    f = frames.astype(np.int32) // _Q
    return (f[..., 0] * _NQ + f[..., 1]) * _NQ + f[..., 2]


def classify_background(frames: np.ndarray) -> str:
    """The background whose palette (and blends of it) explains the most pixels."""
    px = frames[:: max(1, len(frames) // 4), ::3, ::3].reshape(-1, 3).astype(float)
    scores = {}
    for name in ALL_BACKGROUNDS:
        best = np.full(len(px), np.inf)
        for a, b in _bg_segments(name):
            best = np.minimum(best, _segments_dist(px, a, b)[0])
        scores[name] = float((best < 12).mean()) - 1e-3 * float(np.minimum(best, 40).mean())
    return max(scores, key=scores.get)


# --------------------------------------------------------------------------------------------------------------
# Camera geometry (view fractions; the view is 1 x 1, the world as render.py builds it)
# --------------------------------------------------------------------------------------------------------------


def _window(camera: str, u: float) -> tuple[float, float, float]:
    """(x0, y0, size) of the view at time u, in units of the view's size (size 1 = unzoomed)."""
    if camera.startswith("pan"):
        x0 = PAN * u if camera == "pan right" else PAN * (1 - u)
        return x0, 0.0, 1.0
    if camera.startswith("zoom"):
        f = 1 + (ZOOM - 1) * (u if camera == "zoom in" else 1 - u)
        return 0.5 - f / 2, 0.5 - f / 2, f
    return 0.0, 0.0, 1.0


def _to_first(camera: str, u: float, vx, vy):
    """View-at-u fractions -> first-frame view fractions."""
    x0, y0, s = _window(camera, u)
    a0, b0, s0 = _window(camera, 0.0)
    return (np.asarray(vx) * s + x0 - a0) / s0, (np.asarray(vy) * s + y0 - b0) / s0


def _scale_to_first(camera: str, u: float) -> float:
    """Lengths in the view at u times this = lengths in the first frame's view."""
    return _window(camera, u)[2] / _window(camera, 0.0)[2]


def _affine_t_to_0(camera: str, u: float, w: int, h: int) -> np.ndarray:
    """2x3 matrix mapping pixel coords (centres at integers) of frame u to those of frame 0."""
    sx = _scale_to_first(camera, u)
    ox, oy = _to_first(camera, u, 0.5 / w, 0.5 / h)  # pixel (0, 0) centre
    return np.array([[sx, 0, ox * w - 0.5], [0, sx, oy * h - 0.5]], np.float32)


def estimate_camera(frames: np.ndarray, labels: np.ndarray, background: str) -> str:
    if background not in ("night", "sky", "sunset"):
        return "static"
    t_count, h, w = frames.shape[:3]
    bg0 = (labels[0] == -1).astype(np.uint8)
    f0 = frames[0].astype(np.float32)
    errs = {}
    for cam in CAMERAS:
        total, n = 0.0, 0
        for t in (t_count // 2, t_count - 1):
            u = t / (t_count - 1)
            m = _affine_t_to_0(cam, u, w, h)
            flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
            pred = cv2.warpAffine(f0, m, (w, h), flags=flags, borderValue=(-1000, -1000, -1000))
            valid = cv2.warpAffine(bg0, m, (w, h), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderValue=0)
            valid = (valid > 0) & (labels[t] == -1) & (pred[..., 0] > -500)
            if valid.sum() < 50:
                continue
            diff = np.abs(pred - frames[t].astype(np.float32)).sum(-1)[valid]
            total += float(np.minimum(diff, 150).mean())
            n += 1
        errs[cam] = total / n if n else np.inf
    return min(errs, key=errs.get)


# --------------------------------------------------------------------------------------------------------------
# The analyzer
# --------------------------------------------------------------------------------------------------------------

_SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])
_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def _component(mask: np.ndarray, near: tuple[float, float] | None = None, min_area: float = 8,
               max_dist: float = np.inf):
    """The object's connected component in a binary mask: the largest, or the one nearest `near` (within
    max_dist pixels); None when there is none of at least min_area pixels."""
    opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _KERNEL)
    n, lab, stats, cents = cv2.connectedComponentsWithStats(opened, connectivity=8)
    idx = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= min_area]
    if near is not None:
        dist = {i: math.hypot(cents[i][0] - near[0], cents[i][1] - near[1]) for i in idx}
        idx = [i for i in idx if dist[i] <= max_dist]
    if not idx:
        return None
    big = max(stats[i, cv2.CC_STAT_AREA] for i in idx)
    idx = [i for i in idx if stats[i, cv2.CC_STAT_AREA] >= 0.25 * big]
    if near is not None:
        i = min(idx, key=dist.get)
    else:
        i = max(idx, key=lambda i: stats[i, cv2.CC_STAT_AREA])
    comp = lab == i
    # Put the thin antialiased rim the opening removed back.
    return cv2.dilate(comp.astype(np.uint8), _KERNEL).astype(bool) & mask


def _patch(alpha: np.ndarray, cx: float, cy: float, k: float, size: int = 48) -> np.ndarray:
    """A size x size patch of alpha centred at (cx, cy), k source pixels per patch pixel."""
    m = np.array([[k, 0, cx - k * (size - 1) / 2], [0, k, cy - k * (size - 1) / 2]], np.float32)
    return cv2.warpAffine(alpha, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def _fit_line(u: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """Least-squares v = a + b u: returns (a, b)."""
    if len(u) < 2 or np.ptp(u) == 0:
        return (float(v[0]) if len(v) else 0.0), 0.0
    b, a = np.polyfit(u, v, 1)
    return float(a), float(b)


def _classify_motion(track: dict) -> tuple[str, str, dict]:
    u, x, y, s = track["u"], track["x"], track["y"], track["scale"]
    vx, vy, va = track["valid_x"], track["valid_y"], track["valid_area"]
    _, dx = _fit_line(u[vx], x[vx])
    _, dy = _fit_line(u[vy], y[vy])
    # Bounce: y rises by BOUNCE_HEIGHT * |sin(2 pi u)| with no net displacement.
    bounce_shape = np.abs(np.sin(2 * np.pi * u))
    yb = y[vy]
    if vy.sum() >= 3:
        A = np.stack([np.ones(vy.sum()), u[vy], bounce_shape[vy]], 1)
        coef, *_ = np.linalg.lstsq(A, yb, rcond=None)
        lift = -float(coef[2])
        lin_a, lin_b = _fit_line(u[vy], yb)
        res_lin = float(np.sqrt(np.mean((yb - lin_a - lin_b * u[vy]) ** 2)))
        res_b = float(np.sqrt(np.mean((yb - A @ coef) ** 2)))
    else:
        lift, res_lin, res_b = 0.0, 0.0, 0.0
    _, ks = _fit_line(u[va], np.log(np.maximum(s[va], 1e-3)))
    info = {"dx": dx, "dy": dy, "lift": lift, "res_lin": res_lin, "res_bounce": res_b, "log_scale_slope": ks,
            "spin_iou": track.get("spin_iou", 1.0)}
    if lift > 0.5 * BOUNCE_HEIGHT and res_b < 0.5 * res_lin + 0.01:
        return "bounce", "normal", info
    if max(abs(dx), abs(dy)) > 0.11:
        if abs(dx) >= abs(dy):
            motion, d = ("right" if dx > 0 else "left"), abs(dx)
        else:
            motion, d = ("down" if dy > 0 else "up"), abs(dy)
        sp = sorted(SPEEDS.items(), key=lambda kv: kv[1])
        speed = sp[0][0]
        for (n0, v0), (n1, v1) in zip(sp, sp[1:]):
            if d > (v0 + v1) / 2:
                speed = n1
        return motion, speed, info
    if ks > 0.17:
        return "grow", "normal", info
    if ks < -0.25:
        return "shrink", "normal", info
    if info["spin_iou"] < 0.88:
        return "spin", "normal", info
    return "still", "normal", info


def _relations_between(a: dict, b: dict, margin: float = 0.1) -> list[str]:
    """Relations that hold for object a relative to b over the frames where both are seen."""
    ua = {round(t, 6): (xx, yy) for t, xx, yy, v in zip(a["_track"]["u"], a["_track"]["x"], a["_track"]["y"],
                                                        a["_track"]["seen"]) if v}
    ub = {round(t, 6): (xx, yy) for t, xx, yy, v in zip(b["_track"]["u"], b["_track"]["x"], b["_track"]["y"],
                                                        b["_track"]["seen"]) if v}
    common = sorted(set(ua) & set(ub)) or [None]
    if common == [None]:
        dxs, dys = np.array([a["x"] - b["x"]]), np.array([a["y"] - b["y"]])
    else:
        dxs = np.array([ua[t][0] - ub[t][0] for t in common])
        dys = np.array([ua[t][1] - ub[t][1] for t in common])
    held = []
    if np.all(dxs < -margin):
        held.append("left of")
    if np.all(dxs > margin):
        held.append("right of")
    if np.all(dys < -margin):
        held.append("above")
    if np.all(dys > margin):
        held.append("below")
    return held


def analyze(frames: np.ndarray, debug: bool = False) -> dict:
    """What a clip shows, from its pixels alone. frames: uint8 [T, H, W, 3]."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    t_count, h, w = frames.shape[:3]
    background = classify_background(frames)
    lab_lut, alpha_lut = _lut(background)
    q = _quantise(frames)
    labels = lab_lut[q]
    alphas = alpha_lut[q].astype(np.float32) / 255.0
    camera = estimate_camera(frames, labels, background)
    short = min(h, w)
    us = np.arange(t_count) / max(t_count - 1, 1)

    objects = []
    for k, name in enumerate(_OBJ_NAMES):
        comp0 = _object_component(labels[0], alphas[0], k)
        if comp0 is None:
            continue
        # Track through the clip.
        xs, ys, areas = np.zeros(t_count), np.zeros(t_count), np.zeros(t_count)
        ext_w, ext_h = np.zeros(t_count), np.zeros(t_count)
        seen = np.zeros(t_count, bool)
        vx, vy, va = (np.zeros(t_count, bool) for _ in range(3))
        comps = [None] * t_count
        prev, last_seen, area0_px = None, 0, float(comp0.sum())
        for t in range(t_count):
            if t - last_seen > 2:
                break  # it left the view (nothing in this world comes back once it has left)
            mt = (labels[t] == k) & (alphas[t] >= 0.5)
            zoom = _scale_to_first(camera, us[t])
            comp = comp0 if t == 0 else _component(mt, near=prev, min_area=max(8.0, 0.08 * area0_px / zoom ** 2),
                                                   max_dist=8.0 + 10.0 * (t - last_seen))
            if comp is None:
                continue
            last_seen = t
            yy, xx = np.nonzero(comp)
            cx, cy = float(xx.mean()), float(yy.mean())
            prev = (cx, cy)
            comps[t] = comp
            seen[t] = True
            touch_x = xx.min() <= 0 or xx.max() >= w - 1
            touch_y = yy.min() <= 0 or yy.max() >= h - 1
            vx[t], vy[t], va[t] = not touch_x, not touch_y, not (touch_x or touch_y)
            fx, fy = _to_first(camera, us[t], (cx + 0.5) / w, (cy + 0.5) / h)
            ext_w[t] = (xx.max() - xx.min() + 1) * _scale_to_first(camera, us[t])
            ext_h[t] = (yy.max() - yy.min() + 1) * _scale_to_first(camera, us[t])
            xs[t], ys[t] = float(fx), float(fy)
            areas[t] = float(alphas[t][cv2.dilate(comp.astype(np.uint8), _KERNEL).astype(bool)
                                       & (labels[t] == k)].sum()) * _scale_to_first(camera, us[t]) ** 2
        scale = np.sqrt(np.maximum(areas, 1e-6) / max(areas[0], 1e-6))
        if (va & seen).sum() < 4:
            # The object is cut by the frame's edge most of the time (it left the view, or a large object grows
            # out of it): measure its scale along an axis the edge does not cut.
            # Only frames whose aspect is unchanged: the edge cuts as much of it as at first (it is not leaving).
            for valid_axis, ext, cut in ((vy, ext_h, ext_w), (vx, ext_w, ext_h)):
                aspect = cut / np.maximum(ext, 1e-6)
                ok = valid_axis & seen & (np.abs(aspect / max(aspect[0], 1e-6) - 1) < 0.1)
                if ok[0] and ok.sum() > (va & seen).sum() and ok.sum() >= 4:
                    scale = np.where(ok, ext / max(ext[0], 1e-6), scale)
                    va = ok
                    break
        if not va[0]:
            va[0] = True  # the first frame is all we have for size and shape
        # Spin: the shape, normalised for position and scale, changes through the clip.
        a0 = np.where(labels[0] == k, alphas[0], 0).astype(np.float32)
        k0 = math.sqrt(max(areas[0], 1.0)) / 24.0
        ys0, xs0 = np.nonzero(comp0)
        p0 = _patch(a0, float(xs0.mean()), float(ys0.mean()), k0)
        ious = []
        for t in range(1, t_count):
            if not va[t] or comps[t] is None:
                continue
            at = np.where(labels[t] == k, alphas[t], 0).astype(np.float32)
            yy, xx = np.nonzero(comps[t])
            kt = k0 * scale[t] / _scale_to_first(camera, us[t])
            pt = _patch(at, float(xx.mean()), float(yy.mean()), kt)
            ious.append(float(np.minimum(p0, pt).sum() / max(np.maximum(p0, pt).sum(), 1e-6)))
        spin_iou = float(np.mean(sorted(ious)[:3])) if ious else 1.0
        track = {"u": us, "x": xs, "y": ys, "scale": scale, "seen": seen, "valid_x": vx & seen,
                 "valid_y": vy & seen, "valid_area": va & seen, "spin_iou": spin_iou}
        feats = shape_features(comp0, np.where(cv2.dilate(comp0.astype(np.uint8), _KERNEL) > 0, a0, 0))
        shape = classify_shape(feats)
        radius = math.sqrt(areas[0] / SHAPE_AREA[shape]) / short
        motion, speed, info = _classify_motion(track)
        obj = {"color": name, "shape": shape, "size": "large" if radius > _SIZE_SPLIT else "small",
               "motion": motion, "speed": speed, "x": xs[0], "y": ys[0], "area": areas[0] / (h * w),
               "_track": track}
        if debug:
            obj["debug"] = {**feats, **info, "radius": radius}
        objects.append(obj)

    objects.sort(key=lambda o: (round(o["x"], 2), o["y"]))
    relation, relations = None, []
    if len(objects) == 2:
        relations = _relations_between(objects[0], objects[1])
        relation = _pick_relation(objects, relations)
    for o in objects:
        del o["_track"]
        o["x"], o["y"], o["area"] = float(o["x"]), float(o["y"]), float(o["area"])
    return {"background": background, "camera": camera, "objects": objects, "relation": relation,
            "relations": relations}


def _min_object_area(h: int, w: int) -> int:
    return max(20, int(0.004 * h * w))


def _object_component(labels: np.ndarray, alphas: np.ndarray, k: int):
    """The largest blob of object colour k in one frame, or None where none is large enough to be an object."""
    min_area = _min_object_area(*labels.shape)
    mask = (labels == k) & (alphas >= 0.5)
    if mask.sum() < min_area:
        return None
    comp = _component(mask, min_area=min_area)
    return comp if comp is not None and comp.sum() >= min_area else None


def objects_per_frame(frames: np.ndarray) -> list[dict[str, int]]:
    """Frame by frame, how many separate object-sized blobs of each colour it shows ({colour: count}), found as
    `analyze` finds objects in a first frame (the background is classified once for the clip). A drawn object
    that breaks up or changes colour part-way through a clip shows here."""
    frames = np.asarray(frames)
    lab_lut, alpha_lut = _lut(classify_background(frames))
    q = _quantise(frames)
    labels, alphas = lab_lut[q], alpha_lut[q].astype(np.float32) / 255.0
    min_area = _min_object_area(*frames.shape[1:3])
    out = []
    for t in range(len(frames)):
        counts = {}
        for k, name in enumerate(_OBJ_NAMES):
            mask = (labels[t] == k) & (alphas[t] >= 0.5)
            if mask.sum() < min_area:
                continue
            opened = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _KERNEL)
            n, _, stats, _ = cv2.connectedComponentsWithStats(opened, connectivity=8)
            blobs = int((stats[1:n, cv2.CC_STAT_AREA] >= min_area).sum())
            if blobs:
                counts[name] = blobs
        out.append(counts)
    return out


def _pick_relation(objects: list[dict], held: list[str]) -> str | None:
    """The one relation to report: the one that holds (preferring what the objects' motions allow)."""
    a, b = objects
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    horizontal = "left of" if dx < 0 else "right of"
    vertical = "above" if dy < 0 else "below"
    motions = {a["motion"], b["motion"]}
    if len(held) == 1:
        return held[0]
    if motions & {"left", "right"} and not motions & {"up", "down", "bounce"}:
        return vertical  # scenes never move objects along their relation's axis
    if motions & {"up", "down", "bounce"} and not motions & {"left", "right"}:
        return horizontal
    return horizontal if abs(dx) >= abs(dy) else vertical
