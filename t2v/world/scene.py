"""The synthetic world's vocabulary and scenes: what a clip shows, as exact ground truth."""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass

SHAPES = ("circle", "square", "triangle", "star", "heart")
COLORS = {
    "red": (220, 35, 35), "orange": (245, 140, 20), "yellow": (245, 225, 30), "green": (30, 185, 60),
    "blue": (35, 80, 235), "purple": (140, 50, 200), "pink": (250, 120, 200), "white": (250, 250, 250),
}
SIZES = {"small": 0.10, "large": 0.20}  # radius as a fraction of the frame's shorter side
EXTENT = {"circle": 1.0, "square": 1.0, "triangle": 1.1, "star": 1.15, "heart": 1.25}  # reach past the radius
MOTIONS = ("left", "right", "up", "down", "bounce", "spin", "grow", "shrink", "still")
TRANSLATIONS = ("left", "right", "up", "down")
SPEEDS = {"slowly": 0.22, "normal": 0.40, "quickly": 0.62}  # translation over the clip, fraction of the frame
GROW, SHRINK = 1.4, 0.6  # size at the end of the clip, relative to the start
BACKGROUNDS = ("black", "white", "gray", "night", "sky", "sunset")  # the vocabulary the embedded model knows
# Words the world renders and the analyzer reads but that no base training clip shows: what an adapter can teach
# the embedded model (docs/lora.md). Scenes use them only when asked (random_scene(background="desert")).
NEW_BACKGROUNDS = ("desert",)
ALL_BACKGROUNDS = BACKGROUNDS + NEW_BACKGROUNDS
STRUCTURED = ("night", "sky", "sunset")  # camera motion is only visible over structure
CAMERAS = ("static", "pan left", "pan right", "zoom in", "zoom out")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

BG = {  # the colours backgrounds are drawn with
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
    "night": (12, 18, 58), "star": (215, 215, 240),
    "sky": (110, 170, 240), "cloud": (236, 242, 252), "grass": (52, 135, 48), "grass_dark": (38, 105, 36),
    "sunset_top": (88, 40, 112), "sunset_mid": (245, 130, 60), "sunset_low": (120, 50, 70), "sun": (255, 215, 120),
    "hills": (45, 22, 45),
    # The desert is made of colours the embedded model's VAE already renders (sky, sunset orange, its shadow):
    # its decoder turns colours it never saw, such as a pale sand, into the nearest one it knows.
    "desert_sky": (110, 170, 240), "sand": (245, 130, 60), "dune": (120, 50, 70),
}
MIN_CONTRAST = 90  # RGB distance an object colour keeps from every colour of its background


def background_palette(name: str) -> list[tuple[int, int, int]]:
    """The colours a background is made of (for colour-contrast checks and the analyzer)."""
    return {
        "black": [BG["black"]], "white": [BG["white"]], "gray": [BG["gray"]],
        "night": [BG["night"], BG["star"]],
        "sky": [BG["sky"], BG["cloud"], BG["grass"], BG["grass_dark"]],
        "sunset": [BG["sunset_top"], BG["sunset_mid"], BG["sunset_low"], BG["sun"], BG["hills"]],
        "desert": [BG["desert_sky"], BG["sand"], BG["dune"]],
    }[name]


def contrasts(color: str, background: str) -> bool:
    """Whether objects of this colour may appear on this background: scenes use only such colours, so the
    analyzer can tell every object from its background by colour."""
    return all(math.dist(COLORS[color], bg) > MIN_CONTRAST for bg in background_palette(background))


@dataclass
class WorldObject:
    shape: str
    color: str
    size: str
    motion: str = "still"
    speed: str = "normal"  # only translations have a speed
    x: float = 0.5  # start centre, fractions of the frame (0 = left/top)
    y: float = 0.5
    angle: float = 0.0  # start rotation, degrees


@dataclass
class Scene:
    background: str
    objects: list[WorldObject]
    camera: str = "static"
    relation: str | None = None  # with two objects: objects[0] is <relation> objects[1]
    num_frames: int = 17
    fps: float = 8.0
    width: int = 128
    height: int = 128
    seed: int = 0  # background texture (stars, clouds)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> "Scene":
        d = json.loads(text) if isinstance(text, str) else dict(text)
        d["objects"] = [WorldObject(**o) for o in d["objects"]]
        return cls(**d)


def _margin(obj: WorldObject, r: float) -> float:
    """Distance from the centre to the frame edge that keeps the whole shape in view all clip long."""
    return r * EXTENT[obj.shape] * (GROW if obj.motion == "grow" else 1.0) + 0.02


def _place(rng: random.Random, obj: WorldObject, r: float, lo: float = 0.0, hi: float = 1.0) -> None:
    """A start position that keeps the whole path inside the frame."""
    travel = SPEEDS[obj.speed] if obj.motion in TRANSLATIONS else 0.0
    margin = _margin(obj, r)
    def span(axis_motion_neg: str, axis_motion_pos: str, lo_: float, hi_: float) -> float:
        a, b = lo_ + margin, hi_ - margin
        if obj.motion == axis_motion_pos:
            b -= travel
        elif obj.motion == axis_motion_neg:
            a += travel
        return rng.uniform(a, max(a, b))
    obj.x = span("left", "right", lo, hi)
    if obj.motion == "bounce":  # the bounce rises from the start point by up to 0.3
        obj.y = rng.uniform(min(0.3 + margin + 0.05, 1 - margin), 1 - margin)
    else:
        obj.y = span("up", "down", 0.0, 1.0)


def random_scene(rng: random.Random, num_objects: int | None = None, **fixed) -> Scene:
    """A random scene over the whole vocabulary; `fixed` pins attributes (background, camera, ...)."""
    background = fixed.get("background") or rng.choice(BACKGROUNDS)
    camera = fixed.get("camera") or (rng.choice(CAMERAS) if background in STRUCTURED else "static")
    n = num_objects or rng.choice((1, 1, 2))
    colors = [c for c in COLORS if contrasts(c, background)]
    rng.shuffle(colors)
    relation = rng.choice(RELATIONS) if n == 2 else None
    objects = []
    for i in range(n):
        shape = rng.choice(SHAPES)
        size = rng.choice(tuple(SIZES))
        motions = [m for m in MOTIONS if not (m == "spin" and shape == "circle")]  # a spinning disc looks still
        if n == 2 and size == "large":
            motions.remove("grow")  # a large grown shape would not fit in its half of the frame
        if relation in ("left of", "right of"):
            motions = [m for m in motions if m not in ("left", "right")]
        elif relation in ("above", "below"):
            motions = [m for m in motions if m not in ("up", "down", "bounce")]
        motion = rng.choice(motions)
        speed = rng.choice(tuple(SPEEDS)) if motion in TRANSLATIONS else "normal"
        objects.append(WorldObject(shape=shape, color=colors[i], size=size, motion=motion,
                                   speed=speed, angle=rng.uniform(0, 360) if shape != "circle" else 0.0))
    short = 1.0
    if relation is None:
        _place(rng, objects[0], SIZES[objects[0].size] * short)
    else:
        # Each object in its own half, so the relation holds for the whole clip; the second one close to the
        # first across the relation's axis, so that no other relation holds at the start.
        first, second = ((0.0, 0.5), (0.5, 1.0)) if relation in ("left of", "above") else ((0.5, 1.0), (0.0, 0.5))
        horizontal = relation in ("left of", "right of")
        for i, (obj, (lo, hi)) in enumerate(zip(objects, (first, second))):
            r, margin = SIZES[obj.size], _margin(obj, SIZES[obj.size])
            if horizontal:
                _place(rng, obj, r, lo, hi)
            else:
                _place(rng, obj, r)
                obj.y = rng.uniform(lo + margin, max(lo + margin, hi - margin))
            if i == 1:
                a = objects[0]
                if horizontal and obj.motion not in ("up", "down", "bounce"):
                    obj.y = min(max(a.y + rng.uniform(-0.12, 0.12), margin), 1 - margin)
                elif not horizontal and obj.motion not in ("left", "right"):
                    obj.x = min(max(a.x + rng.uniform(-0.12, 0.12), margin), 1 - margin)
    return Scene(background=background, objects=objects, camera=camera, relation=relation,
                 seed=rng.randrange(2**31), **{k: v for k, v in fixed.items() if k in ("num_frames", "fps", "width",
                                                                                      "height")})
