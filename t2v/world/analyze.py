"""Recover a clip's scene description from its pixels, parse prompts in the world's vocabulary, and score
clips against prompts or ground-truth scenes.

analyze(frames)          -> what the pixels show (background, camera, objects, relation)
parse_prompt(prompt)     -> what a prompt asks for (only the attributes it mentions)
score(frames, expected)  -> per-attribute matches, expected being a prompt (str) or a Scene

The analyzer never looks at a Scene: it classifies the background from colour statistics, segments objects by
nearest colour (object colours blended with the background's palette, so antialiased edges get a coverage),
estimates the camera by testing the five camera hypotheses against the background's structure, and classifies
each object's motion from its camera-compensated trajectory.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import cv2
import numpy as np

from .captions import (BACKGROUND_WORDS, CAMERA_WORDS, COLOR_WORDS, MOTION_WORDS, RELATION_WORDS, SHAPE_WORDS,
                       SIZE_WORDS, SPEED_WORDS)
from .render import BOUNCE_HEIGHT, PAN, ZOOM, background_palette, shape_points
from .scene import BACKGROUNDS, CAMERAS, COLORS, SHAPES, SIZES, SPEEDS, TRANSLATIONS, Scene

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
    """Object colours distinguishable from the background (the same contrast rule scenes are built with)."""
    pal = background_palette(background)
    return [c for c in _OBJ_NAMES if all(math.dist(COLORS[c], b) > 90 for b in pal)]


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
    for name in BACKGROUNDS:
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
# Shapes
# --------------------------------------------------------------------------------------------------------------


def _poly_area(pts) -> float:
    p = np.asarray(pts)
    return 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))


SHAPE_AREA = {s: _poly_area(shape_points(s, 0, 0, 1.0, 0.0)) for s in SHAPES}  # area / radius^2
_SIZE_SPLIT = math.sqrt(SIZES["small"] * SIZES["large"])


def shape_features(mask: np.ndarray, soft: np.ndarray | None = None) -> dict:
    """Contour features of an object's first-frame mask (soft coverage, if given, for subpixel edges)."""
    src = (mask.astype(np.float32) if soft is None else soft.astype(np.float32))
    ys, xs = np.nonzero(mask)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, mask.shape[0])
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, mask.shape[1])
    src = np.pad(src[y0:y1, x0:x1], 2)
    up = cv2.resize(src, None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    cnts, _ = cv2.findContours((up > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    c = max(cnts, key=cv2.contourArea)
    area = cv2.contourArea(c)
    hull = cv2.convexHull(c)
    harea = max(cv2.contourArea(hull), 1e-6)
    (_, _), rad = cv2.minEnclosingCircle(c)
    peri = cv2.arcLength(c, True)
    hperi = cv2.arcLength(hull, True)
    approx = cv2.approxPolyDP(hull, 0.06 * hperi, True)
    defect = 0.0
    hull_idx = cv2.convexHull(c, returnPoints=False)
    if len(hull_idx) > 3:
        d = cv2.convexityDefects(c, np.sort(hull_idx, axis=0))
        if d is not None:
            defect = float(d.reshape(-1, 4)[:, 3].max()) / 256.0 / math.sqrt(max(area, 1e-6))
    return {"defect": defect, "solidity": area / harea, "fill": area / (math.pi * rad * rad + 1e-6),
            "circularity": 4 * math.pi * area / (peri * peri + 1e-6), "hull_vertices": len(approx)}


def classify_shape(f: dict) -> str:
    if f["solidity"] < 0.75:
        return "star"
    if f["defect"] > 0.12:  # the notch between a heart's lobes
        return "heart"
    if f["fill"] > 0.8:
        return "circle"
    if f["fill"] < 0.55:
        return "triangle"
    return "square"


# --------------------------------------------------------------------------------------------------------------
# The analyzer
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------

# The caption writer's tables (captions.py) are the single source of truth for the world's vocabulary: every
# phrasing it writes, training and held-out, is read here. The _EXTRA_* tables hold only parse-only synonyms (free
# wording of user prompts) that the caption writer never uses; each phrase lives in exactly one place.

_EXTRA_COLORS = {
    "red": ["ruby", "cherry", "vermilion", "maroon", "reddish"],
    "orange": ["apricot", "orangey"],
    "yellow": ["gold", "lemon", "canary", "mustard", "yellowish"],
    "green": ["lime", "jade", "olive", "greenish"],
    "blue": ["navy", "sapphire", "cerulean", "indigo", "bluish"],
    "purple": ["lilac", "lavender", "plum", "mauve", "amethyst", "purplish"],
    "pink": ["rose", "magenta", "fuchsia", "salmon", "pinkish"],
    "white": ["snow-white", "pearl", "milky"],
}
_EXTRA_SHAPES = {
    "circle": ["circles", "balls", "spheres", "discs", "disk", "disks", "dot", "orb", "orbs", "ring", "round shape",
               "circular shape"],
    "square": ["squares", "boxes", "blocks", "cube", "cubes", "tile", "tiles", "rectangle", "diamond"],
    "triangle": ["triangles", "pyramid", "pyramids", "wedge"],
    "star": ["stars", "starfish", "pentagram"],
    "heart": ["hearts", "heart-shaped shape"],
}
GENERIC_OBJECT_WORDS = ["object", "objects", "shape", "shapes", "thing", "things", "item", "figure"]
_EXTRA_SIZES = {
    "small": ["mini", "miniature", "petite", "wee", "smallish", "compact"],
    "large": ["giant", "enormous", "massive", "gigantic", "oversized", "jumbo", "bigger", "larger", "great big"],
}
_EXTRA_MOTIONS = {
    "left": ["moves to the left", "moving to the left", "moves left", "move left", "drifts to the left", "drifts left",
             "drifting left", "heads left", "goes left", "going left", "slides left", "slides to the left",
             "sliding to the left", "travels left", "travelling left", "traveling left", "glides left",
             "gliding left", "rolls left", "rolling left", "floats left", "floating left", "leftward", "leftwards",
             "to the left", "left"],
    "right": ["moves to the right", "moving to the right", "moves right", "move right", "drifts to the right",
              "drifts right", "drifting right", "heads right", "goes right", "going right", "slides right",
              "slides to the right", "sliding to the right", "travels right", "travelling right", "traveling right",
              "glides right", "gliding right", "rolls right", "rolling right", "floats right", "floating right",
              "rightward", "rightwards", "to the right", "right"],
    "up": ["moves up", "move up", "goes up", "going up", "floats up", "floating up", "drifts up", "drifting up",
           "heads up", "heading up", "rises", "rise", "ascends", "ascending", "climbs", "climbing", "lifts off",
           "soars", "soaring", "upward", "upwards", "up"],
    "down": ["moves down", "move down", "goes down", "going down", "drifts down", "drifting down", "heads down",
             "heading down", "falls", "fall", "sinks", "sink", "descends", "descending", "drops", "dropping",
             "plummets", "plummeting", "downward", "downwards", "down"],
    "bounce": ["bounces", "bounce", "bouncy", "hops", "hopping", "jumps", "jumping", "leaps", "leaping"],
    "spin": ["spins", "spin", "rotates", "rotate", "twirls", "twirl", "whirls", "whirling", "turns around", "turns",
             "turning", "revolves", "revolving", "pirouettes"],
    "grow": ["grows", "grow", "expands", "expand", "enlarges", "enlarging", "swells", "inflates", "inflating",
             "gets bigger", "becomes bigger", "gets larger", "getting larger", "scales up", "scaling up"],
    "shrink": ["shrinks", "shrink", "contracts", "deflates", "deflating", "gets smaller", "becomes smaller",
               "scales down", "scaling down", "dwindles"],
    "still": ["stays still", "stands still", "standing still", "remains still", "stays put", "does not move",
              "doesn't move", "stationary", "still", "unmoving", "at rest", "rests", "resting", "sits", "sitting",
              "idle", "frozen", "hovers in place"],
}
_EXTRA_SPEEDS = {
    "slowly": ["slow", "gradually", "lazily", "unhurriedly", "gently and slowly"],
    "normal": ["at normal speed", "at a normal speed", "at a steady pace", "at moderate speed", "at a moderate speed",
               "steadily", "moderately", "at an even pace"],
    "quickly": ["quick", "rapid", "swiftly", "swift", "speedily", "hastily", "briskly", "at high speed", "in a hurry",
                "zooms", "races", "racing", "dashes", "darts"],
}
_EXTRA_BACKGROUNDS = {
    "night": ["starry night sky", "starry night", "starry sky", "night sky", "night-time sky", "nighttime sky",
              "starlit sky", "starry", "starlit", "at night", "night", "nighttime", "night-time", "the stars",
              "outer space", "space"],
    "sunset": ["sunset sky", "sunset", "sunsets", "evening sky", "evening", "dusk", "sundown", "twilight",
               "setting sun", "golden hour"],
    "sky": ["blue sky", "daytime sky", "cloudy sky", "clear sky", "sunny sky", "grassy meadow", "grassy field",
            "grassy hill", "meadow", "grassland", "grass", "grassy", "lawn", "field", "clouds", "cloudy", "daytime",
            "sunny day", "sky"],
    "black": ["black background", "black backdrop", "dark background", "black screen", "pitch black background",
              "plain black", "solid black", "on black", "in darkness", "darkness", "void", "black void",
              "black canvas"],
    "white": ["white background", "white backdrop", "white canvas", "blank white", "plain white", "solid white",
              "on white", "white screen", "white wall", "blank background", "blank page"],
    "gray": ["gray background", "grey background", "gray backdrop", "grey backdrop", "plain gray", "plain grey",
             "solid gray", "solid grey", "on gray", "on grey", "gray canvas", "grey canvas", "gray screen",
             "grey screen", "gray", "grey", "neutral background"],
}
_EXTRA_CAMERAS = {  # regular expressions (the caption writer's camera phrases are added escaped)
    "pan left": [r"camera (?:slowly |gently |smoothly )?(?:pans|panning|pan|sweeps|sweeping|moves|moving|tracks|"
                 r"tracking|glides|drifts|slides|trucks|trucking) (?:to the |towards the )?left",
                 r"pans? (?:to the )?left", r"panning (?:to the )?left", r"pan-left", r"left pan",
                 r"panning shot to the left"],
    "pan right": [r"camera (?:slowly |gently |smoothly )?(?:pans|panning|pan|sweeps|sweeping|moves|moving|tracks|"
                  r"tracking|glides|drifts|slides|trucks|trucking) (?:to the |towards the )?right",
                  r"pans? (?:to the )?right", r"panning (?:to the )?right", r"pan-right", r"right pan",
                  r"panning shot to the right"],
    "zoom in": [r"(?:camera )?(?:slowly )?(?:zooms|zooming|zoom|pushes|pushing|push|dollies|dollying|moves|moving) "
                r"(?:slowly )?in", r"zoom-in", r"closes in", r"closing in", r"camera approaches"],
    "zoom out": [r"(?:camera )?(?:slowly )?(?:zooms|zooming|zoom|pulls|pulling|pull|dollies|dollying|moves|moving) "
                 r"(?:slowly )?(?:out|back|away)", r"zoom-out", r"camera recedes"],
    "static": [r"static camera", r"still camera", r"fixed camera", r"locked(?:-off)? camera", r"stationary camera",
               r"camera (?:is |stays |remains |holds )?(?:static|still|fixed|steady|stationary|locked|motionless)",
               r"camera does not move", r"camera doesn't move", r"no camera (?:motion|movement)",
               r"tripod shot"],
}
_EXTRA_RELATIONS = {
    "left of": ["on the left of", "at the left of", "to the left side of"],
    "right of": ["on the right of", "at the right of", "to the right side of"],
    "above": ["on top of", "up above", "atop"],
    "below": ["underneath", "lower than", "down below"],
}


def _with_captions(words: dict, extras: dict, escape: bool = False) -> dict[str, list[str]]:
    """value -> phrases: the caption writer's (training and held-out, non-empty) followed by the parse-only extras."""
    table: dict[str, list[str]] = {}
    for value in dict.fromkeys([*words, *extras]):
        train, held = words.get(value, ([], []))
        caption_phrases = [re.escape(p) if escape else p for p in (*train, *held) if p]
        table[value] = list(dict.fromkeys([*caption_phrases, *extras.get(value, [])]))
    return table


COLOR_SYNONYMS = _with_captions(COLOR_WORDS, _EXTRA_COLORS)
SHAPE_SYNONYMS = _with_captions(SHAPE_WORDS, _EXTRA_SHAPES)
SIZE_SYNONYMS = _with_captions(SIZE_WORDS, _EXTRA_SIZES)
MOTION_SYNONYMS = _with_captions(MOTION_WORDS, _EXTRA_MOTIONS)
SPEED_SYNONYMS = _with_captions(SPEED_WORDS, _EXTRA_SPEEDS)
BACKGROUND_SYNONYMS = _with_captions(BACKGROUND_WORDS, _EXTRA_BACKGROUNDS)
CAMERA_SYNONYMS = _with_captions(CAMERA_WORDS, _EXTRA_CAMERAS, escape=True)  # regular expressions
RELATION_SYNONYMS = _with_captions(RELATION_WORDS, _EXTRA_RELATIONS)
_DETERMINERS = {"a", "an", "the", "one", "another", "some", "and", "with", "while", "as", "whereas", "but",
                "then", "plus", "its", "their"}
_EDGE_MOTIONS = {d: [rf"(?:moves |moving |goes |going |heads |heading |drifts |drifting |slides |sliding )?"
                     rf"(?:to|towards) the {d}(?: side| edge)? of the (?:screen|frame|picture|image|view|scene)"]
                 for d in ("left", "right")}  # "drifts to the right side of the frame": a motion, not a relation


def _phrase_regex(phrases, raw: bool = False) -> str:
    return "|".join(p if raw else re.escape(p) for p in sorted(phrases, key=len, reverse=True))


@lru_cache(maxsize=1)
def _vocabulary() -> list[tuple[int, str, str, re.Pattern]]:
    """(priority, kind, value, pattern) for every vocabulary entry; each pattern finds, at every word start, the
    longest of the entry's phrases that begins there (a lookahead, so matches of one entry may overlap)."""
    tables = [("camera", CAMERA_SYNONYMS, True), ("motion", _EDGE_MOTIONS, True),
              ("background", BACKGROUND_SYNONYMS, False), ("relation", RELATION_SYNONYMS, False),
              ("motion", MOTION_SYNONYMS, False), ("speed", SPEED_SYNONYMS, False), ("size", SIZE_SYNONYMS, False),
              ("shape", SHAPE_SYNONYMS, False), ("color", COLOR_SYNONYMS, False),
              ("generic", {"object": GENERIC_OBJECT_WORDS}, False)]
    vocab = []
    for priority, (kind, table, raw) in enumerate(tables):
        for value, phrases in table.items():
            if phrases:
                pat = re.compile(r"(?<![a-z\-])(?=((?:" + _phrase_regex(phrases, raw) + r")(?![a-z\-])))")
                vocab.append((priority, kind, value, pat))
    return vocab


def _tokenize_prompt(prompt: str) -> list[tuple[str, str]]:
    """Replace vocabulary phrases by typed tokens; returns [(kind, value)], kind 'word' for the rest.

    Longest matches win over the whole vocabulary: the phrases chosen cover the most text ("lime green" beats
    "green", "getting bigger" beats "big", "over a green field" is a background, "not moving" + "to the right of"
    beat "moving to the right", "not moving" beats the camera's "moving in"); ties go to fewer phrases, then to
    the more specific kind (camera, background, relation, motion, speed, size, shape, colour)."""
    text = " " + re.sub(r"[^a-z0-9\-' ]+", " , ", prompt.lower()) + " "
    text = re.sub(r"\s+", " ", text)
    ending: dict[int, list[tuple[int, int, str, str]]] = {}
    for priority, kind, value, pat in _vocabulary():
        for m in pat.finditer(text):
            start, end = m.span(1)
            if end > start:
                ending.setdefault(end, []).append((start, priority, kind, value))
    # The non-overlapping phrases that cover the most text (then: fewest, most specific), by dynamic programming
    # over the text's positions.
    best: list[tuple[tuple[int, int, int], list]] = [((0, 0, 0), [])]
    for i in range(1, len(text) + 1):
        score_, chosen = best[i - 1]
        for start, priority, kind, value in ending.get(i, ()):
            (covered, count, prio), before = best[start]
            option = (covered + i - start, count - 1, prio - priority)
            if option > score_:
                score_, chosen = option, before + [(start, i, kind, value)]
        best.append((score_, chosen))
    marks: list[tuple[int, int, str, str]] = list(best[-1][1])
    rest = list(text)
    for start, end, _, _ in marks:
        rest[start:end] = "\x00" * (end - start)
    rest = "".join(rest)
    for m in re.finditer(r"[^\s\x00]+", rest):
        marks.append((m.start(), m.end(), "word", m.group()))
    return [(kind, value) for _, _, kind, value in sorted(marks)]


def parse_prompt(prompt: str) -> dict:
    """The attributes a prompt asks for, in analyze()'s structure, with only what it mentions.

    Sizes, colours (and a motion before the noun: "a spinning star") belong to the noun phrase they open; a motion
    or speed after a noun belongs to the object mentioned most recently before it; a relation phrase separates the
    object before it from the one after it."""
    tokens = _tokenize_prompt(prompt)
    out: dict = {}
    objects: list[dict] = []
    pending: dict = {}
    in_np = True  # inside a noun phrase that has not reached its noun yet
    relation_at: list[tuple[str, int]] = []  # (relation, number of objects seen when it appeared)
    for kind, value in tokens:
        if kind == "camera":
            out["camera"] = value
        elif kind == "background":
            out["background"] = value
        elif kind == "relation":
            relation_at.append((value, len(objects)))
            in_np = True
        elif kind == "word":
            if value in _DETERMINERS or value == ",":
                in_np = True
        elif kind in ("shape", "generic"):
            obj = dict(pending)
            if kind == "shape":
                obj["shape"] = value
            objects.append(obj)
            pending = {}
            in_np = False
        elif kind in ("color", "size"):
            if not in_np and objects and kind not in objects[-1]:
                objects[-1][kind] = value
            else:
                pending[kind] = value
        elif kind in ("motion", "speed"):
            if not in_np and objects:  # after its noun: the most recent object's (its first mention wins)
                objects[-1].setdefault(kind, value)
            else:
                pending[kind] = value
    if pending and objects:  # trailing attributes ("... a ball, spinning") belong to the last object
        for key, v in pending.items():
            objects[-1].setdefault(key, v)
    elif pending:
        objects.append(pending)
    # A later "the red circle" is the earlier red circle again: merge repeated mentions.
    index: list[int] = []
    merged: list[dict] = []
    for obj in objects:
        same = [i for i, m in enumerate(merged) if obj.get("shape") and m.get("shape") == obj.get("shape")
                and m.get("color") == obj.get("color")]
        if same:
            for key, v in obj.items():
                merged[same[0]].setdefault(key, v)
            index.append(same[0])
        else:
            merged.append(obj)
            index.append(len(merged) - 1)
    out["objects"] = merged
    for rel, seen in relation_at:
        if 1 <= seen < len(objects):
            a, b = index[seen - 1], index[seen]
            if {a, b} == {0, 1}:
                out["relation"] = rel if (a, b) == (0, 1) else _INVERSE[rel]
                break
    return out


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------

_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_OBJECT_KEYS = ("color", "shape", "size", "motion", "speed")


def _expectation(expected) -> dict:
    if isinstance(expected, str):
        return parse_prompt(expected)
    if isinstance(expected, Scene):
        return {"background": expected.background, "camera": expected.camera, "relation": expected.relation,
                "objects": [{"color": o.color, "shape": o.shape, "size": o.size, "motion": o.motion,
                             "speed": o.speed, "x": o.x, "y": o.y} for o in expected.objects]}
    if isinstance(expected, dict):
        return expected
    raise TypeError(f"expected a prompt, a Scene or a dict, not {type(expected).__name__}")


def _match_objects(exp: list[dict], got: list[dict]) -> list[int | None]:
    """For each expected object, the index of the detected object it is compared with."""
    match: list[int | None] = [None] * len(exp)
    used: set[int] = set()
    for i, e in enumerate(exp):  # by colour
        for j, g in enumerate(got):
            if j not in used and e.get("color") is not None and g["color"] == e["color"]:
                match[i] = j
                used.add(j)
                break
    for i, e in enumerate(exp):  # the rest by position (or order)
        if match[i] is not None:
            continue
        free = [j for j in range(len(got)) if j not in used]
        if not free:
            continue
        if "x" in e and "y" in e:
            j = min(free, key=lambda j: (got[j]["x"] - e["x"]) ** 2 + (got[j]["y"] - e["y"]) ** 2)
        else:
            j = free[0]
        match[i] = j
        used.add(j)
    return match


def score(frames: np.ndarray, expected, analysis: dict | None = None) -> dict[str, bool]:
    """Per-attribute matches between what the frames show and a prompt (str) or a Scene (ground truth)."""
    exp = _expectation(expected)
    got = analysis if analysis is not None else analyze(frames)
    result: dict[str, bool] = {}
    for key in ("background", "camera"):
        if exp.get(key) is not None:
            result[key] = got[key] == exp[key]
    exp_objs = exp.get("objects") or []
    if exp_objs:
        result["count"] = len(got["objects"]) == len(exp_objs)
    match = _match_objects(exp_objs, got["objects"])
    for i, (e, j) in enumerate(zip(exp_objs, match)):
        g = got["objects"][j] if j is not None else None
        prefix = "" if len(exp_objs) == 1 else f"object{i + 1}."
        for key in _OBJECT_KEYS:
            if e.get(key) is None:
                continue
            if key == "speed" and e.get("motion") is not None and e["motion"] not in TRANSLATIONS:
                continue
            result[prefix + key] = g is not None and g[key] == e[key]
    if exp.get("relation") is not None and len(exp_objs) >= 2:
        j0, j1 = match[0], match[1]
        ok = False
        if j0 is not None and j1 is not None and len(got["objects"]) == 2 and j0 != j1:
            held = got.get("relations") or ([got["relation"]] if got.get("relation") else [])
            if (j0, j1) != (0, 1):
                held = [_INVERSE[r] for r in held]
            ok = exp["relation"] in held
        result["relation"] = ok
    return result
