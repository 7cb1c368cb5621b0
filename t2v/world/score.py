"""Score clips against what they should show: score(frames, expected) -> per-attribute matches, expected being
a prompt (str, read by parse.parse_prompt), a Scene (ground truth) or an already parsed dict."""

from __future__ import annotations

import numpy as np

from .analyze import analyze
from .parse import parse_prompt
from .scene import INVERSE_RELATIONS, TRANSLATIONS, Scene

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
                held = [INVERSE_RELATIONS[r] for r in held]
            ok = exp["relation"] in held
        result["relation"] = ok
    return result
