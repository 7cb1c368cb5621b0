"""An object's shape from its mask: contour features (solidity, fill, circularity, the notch of a heart) and the
rule that names the world's shape from them; the analyzer's shape step, testable on a single mask."""

from __future__ import annotations

import math

import cv2
import numpy as np

from .render import shape_points
from .scene import SHAPES


def _poly_area(pts) -> float:
    p = np.asarray(pts)
    return 0.5 * abs(float(np.dot(p[:, 0], np.roll(p[:, 1], 1)) - np.dot(p[:, 1], np.roll(p[:, 0], 1))))


SHAPE_AREA = {s: _poly_area(shape_points(s, 0, 0, 1.0, 0.0)) for s in SHAPES}  # area / radius^2


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
