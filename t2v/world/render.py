"""Render a Scene to uint8 frames [T, H, W, 3]: antialiased (4x supersampled) shapes over textured
backgrounds, with camera pans and zooms applied to the whole world."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .scene import BG, COLORS, GROW, SHRINK, SIZES, SPEEDS, Scene, WorldObject

SUPERSAMPLE = 4
PAN = 0.30  # a pan travels this fraction of the frame width over the clip
ZOOM = 0.72  # a zoom's tighter view covers this fraction of the wider one
SPIN_DEGREES = 135.0  # not a multiple of any shape's symmetry angle, so the turn stays visible
BOUNCE_HEIGHT = 0.30


def _world_size(scene: Scene) -> tuple[int, int]:
    """World canvas (w, h) in supersampled pixels: wider than the view when the camera pans."""
    w = scene.width * (1 + PAN if scene.camera.startswith("pan") else 1)
    return int(round(w * SUPERSAMPLE)), scene.height * SUPERSAMPLE


def _background(scene: Scene) -> Image.Image:
    w, h = _world_size(scene)
    rng = random.Random(scene.seed)
    name = scene.background
    if name in ("black", "white", "gray"):
        return Image.new("RGB", (w, h), BG[name])
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    s = SUPERSAMPLE
    if name == "night":
        draw.rectangle([0, 0, w, h], fill=BG["night"])
        for _ in range(int(w * h / (s * s) / 90)):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.5, 1.2) * s
            draw.ellipse([x - r, y - r, x + r, y + r], fill=BG["star"])
    elif name == "sky":
        horizon = int(h * 0.62)
        draw.rectangle([0, 0, w, horizon], fill=BG["sky"])
        draw.rectangle([0, horizon, w, h], fill=BG["grass"])
        for _ in range(int(w / s / 22)):
            cx, cy = rng.uniform(0, w), rng.uniform(0.08, 0.42) * h
            for _ in range(4):
                rx, ry = rng.uniform(6, 13) * s, rng.uniform(3, 6) * s
                ox, oy = rng.uniform(-10, 10) * s, rng.uniform(-3, 3) * s
                draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=BG["cloud"])
        for _ in range(int(w / s * 1.2)):
            x, y = rng.uniform(0, w), rng.uniform(horizon + 2 * s, h)
            draw.polygon([(x - 1.5 * s, y), (x + 1.5 * s, y), (x, y - rng.uniform(3, 6) * s)], fill=BG["grass_dark"])
    elif name == "sunset":
        top, mid, low = (np.array(BG[k], float) for k in ("sunset_top", "sunset_mid", "sunset_low"))
        ys = np.linspace(0, 1, h)[:, None]
        grad = np.where(ys < 0.6, top + (mid - top) * (ys / 0.6), mid + (low - mid) * ((ys - 0.6) / 0.4))
        img = Image.fromarray(np.repeat(grad[:, None, :], w, axis=1).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        sx, sy, sr = rng.uniform(0.2, 0.8) * w, 0.55 * h, 0.09 * h
        draw.ellipse([sx - sr, sy - sr, sx + sr, sy + sr], fill=BG["sun"])
        # A hill line across the whole world: structure that shows pans and zooms.
        pts = [(x, h * (0.80 + 0.06 * math.sin(x / w * 9 + rng.uniform(0, 6)) + 0.03 * math.sin(x / w * 23)))
               for x in np.linspace(0, w, 60)]
        draw.polygon(pts + [(w, h), (0, h)], fill=BG["hills"])
    elif name == "desert":
        horizon = int(h * 0.34)
        draw.rectangle([0, 0, w, horizon], fill=BG["desert_sky"])
        draw.rectangle([0, horizon, w, h], fill=BG["sand"])
        # Shadowed dune flanks: bands below wavy crest lines, lit sand between them.
        for level in (0.52, 0.80):
            phase, wave = rng.uniform(0, 6), rng.uniform(4, 7)
            xs = np.linspace(0, w, 60)
            crest = [(x, h * (level + 0.04 * math.sin(x / w * wave + phase))) for x in xs]
            foot = [(x, h * (level + 0.07 + 0.03 * math.sin(x / w * wave * 1.7 + phase))) for x in xs[::-1]]
            draw.polygon(crest + foot, fill=BG["dune"])
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of a shape of 'radius' r centred at (cx, cy), rotated by angle degrees (y down)."""
    if shape == "circle":
        ts = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        pts = np.stack([np.cos(ts), np.sin(ts)], 1)
    elif shape == "square":
        ts = np.deg2rad([45, 135, 225, 315])
        pts = np.stack([np.cos(ts), np.sin(ts)], 1) * 1.0
    elif shape == "triangle":
        ts = np.deg2rad([-90, 30, 150])
        pts = np.stack([np.cos(ts), np.sin(ts)], 1) * 1.1
    elif shape == "star":
        ts = np.deg2rad(np.arange(10) * 36 - 90)
        radii = np.where(np.arange(10) % 2 == 0, 1.15, 0.48)
        pts = np.stack([np.cos(ts) * radii, np.sin(ts) * radii], 1)
    elif shape == "heart":
        ts = np.linspace(0, 2 * np.pi, 80, endpoint=False)
        x = 16 * np.sin(ts) ** 3
        y = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = np.stack([x, y + 2.5], 1) / 16.0
    else:
        raise ValueError(f"unknown shape {shape!r}")
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    pts = pts @ rot.T * r + (cx, cy)
    return [tuple(p) for p in pts]


def object_state(obj: WorldObject, u: float) -> tuple[float, float, float, float]:
    """(x, y, radius scale, angle) at clip time u in [0, 1], in first-frame view fractions."""
    x, y, scale, angle = obj.x, obj.y, 1.0, obj.angle
    d = SPEEDS[obj.speed] * u
    if obj.motion == "left":
        x -= d
    elif obj.motion == "right":
        x += d
    elif obj.motion == "up":
        y -= d
    elif obj.motion == "down":
        y += d
    elif obj.motion == "bounce":
        y -= BOUNCE_HEIGHT * abs(math.sin(2 * math.pi * u))
    elif obj.motion == "spin":
        angle += SPIN_DEGREES * u
    elif obj.motion == "grow":
        scale = 1 + (GROW - 1) * u
    elif obj.motion == "shrink":
        scale = 1 + (SHRINK - 1) * u
    return x, y, scale, angle


def camera_window(scene: Scene, u: float) -> tuple[float, float, float, float]:
    """The view at time u as a box (x0, y0, x1, y1) in world pixels."""
    ww, wh = _world_size(scene)
    vw, vh = scene.width * SUPERSAMPLE, scene.height * SUPERSAMPLE
    cam = scene.camera
    if cam.startswith("pan"):
        travel = ww - vw
        x0 = travel * u if cam == "pan right" else travel * (1 - u)
        return x0, 0.0, x0 + vw, vh
    if cam.startswith("zoom"):
        f = 1 + (ZOOM - 1) * (u if cam == "zoom in" else 1 - u)
        cx, cy = ww / 2, wh / 2
        return cx - vw * f / 2, cy - vh * f / 2, cx + vw * f / 2, cy + vh * f / 2
    return 0.0, 0.0, float(vw), float(vh)


def render(scene: Scene) -> np.ndarray:
    """Frames of a scene: uint8 [num_frames, height, width, 3]."""
    background = _background(scene)
    x0, y0, x1, y1 = camera_window(scene, 0.0)
    fx, fy = (x1 - x0), (y1 - y0)  # first-frame view, in world pixels
    short = min(scene.width, scene.height) * SUPERSAMPLE * fx / (scene.width * SUPERSAMPLE)
    frames = []
    n = scene.num_frames
    for i in range(n):
        u = i / (n - 1) if n > 1 else 0.0
        world = background.copy()
        draw = ImageDraw.Draw(world)
        for obj in scene.objects:
            x, y, scale, angle = object_state(obj, u)
            cx, cy = x0 + x * fx, y0 + y * fy
            r = SIZES[obj.size] * short * scale
            draw.polygon(shape_points(obj.shape, cx, cy, r, angle), fill=COLORS[obj.color])
        box = camera_window(scene, u)
        view = world.resize((scene.width, scene.height), Image.Resampling.BOX, box=box)
        frames.append(np.asarray(view))
    return np.stack(frames)


def object_masks(scene: Scene, frames: np.ndarray | None = None) -> np.ndarray:
    """Where the scene's objects cover each frame, antialiased rims included: bool [num_frames, height, width]
    (the pixels in which the scene's frames, `render(scene)` unless given, differ from those of the same scene
    without its objects)."""
    empty = dataclasses.replace(scene, objects=[])
    return ((render(scene) if frames is None else frames) != render(empty)).any(-1)
