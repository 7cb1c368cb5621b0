"""Caption writer: several templates and synonyms for every attribute, so the text encoder has to
generalize. Every table holds (training phrasings, held-out phrasings): training captions use only the first,
held-out captions (heldout=True) mostly the second, so evaluation can measure generalization to paraphrases."""

from __future__ import annotations

import random

from .scene import TRANSLATIONS, Scene, WorldObject

# attribute value -> (training phrasings, held-out phrasings)
SHAPE_WORDS = {
    "circle": (["circle", "ball", "sphere"], ["disc"]),
    "square": (["square", "box"], ["block"]),
    "triangle": (["triangle", "triangular shape"], ["pyramid shape"]),
    "star": (["star", "five-pointed star"], ["starfish shape"]),
    "heart": (["heart", "heart shape"], ["love heart"]),
}
COLOR_WORDS = {
    "red": (["red", "crimson"], ["scarlet"]),
    "orange": (["orange", "tangerine"], ["amber"]),
    "yellow": (["yellow", "golden"], ["lemon-yellow"]),
    "green": (["green", "emerald"], ["lime green"]),
    "blue": (["blue", "azure"], ["cobalt"]),
    "purple": (["purple", "violet"], ["plum-colored"]),
    "pink": (["pink", "rosy"], ["bubblegum pink"]),
    "white": (["white", "snowy"], ["ivory"]),
}
SIZE_WORDS = {
    "small": (["small", "little"], ["tiny"]),
    "large": (["large", "big"], ["huge"]),
}
MOTION_WORDS = {  # participles, so every template reads
    "left": (["moving left", "drifting to the left", "sliding left"], ["heading left"]),
    "right": (["moving right", "drifting to the right", "sliding right"], ["heading right"]),
    "up": (["moving up", "rising", "floating upward"], ["climbing upward"]),
    "down": (["moving down", "falling", "sinking"], ["dropping downward"]),
    "bounce": (["bouncing", "hopping up and down"], ["bobbing up and down"]),
    "spin": (["spinning", "rotating", "turning around"], ["twirling"]),
    "grow": (["growing", "getting bigger", "expanding"], ["swelling"]),
    "shrink": (["shrinking", "getting smaller", "contracting"], ["dwindling"]),
    "still": (["staying still", "sitting still", "not moving"], ["motionless"]),
}
SPEED_WORDS = {
    "slowly": (["slowly", "gently"], ["leisurely"]),
    "normal": ([""], [""]),
    "quickly": (["quickly", "fast"], ["rapidly"]),
}
BACKGROUND_WORDS = {
    "black": (["on a black background", "against a black backdrop"], ["in pitch darkness"]),
    "white": (["on a white background", "against a white backdrop"], ["on a blank white page"]),
    "gray": (["on a gray background", "on a grey background"], ["against a slate-gray backdrop"]),
    "night": (["in the night sky", "against a starry night sky"], ["under the stars at night"]),
    "sky": (["under a blue sky over green grass", "in a grassy meadow under a blue sky"], ["over a green field"]),
    "sunset": (["at sunset", "against a sunset sky"], ["in the evening glow of a setting sun"]),
    "desert": (["in a sandy desert", "over desert sand dunes"], ["among the dunes of a desert"]),
}
CAMERA_WORDS = {
    "static": ([""], [""]),
    "pan left": (["the camera pans left", "camera panning to the left"], ["the view sweeps left"]),
    "pan right": (["the camera pans right", "camera panning to the right"], ["the view sweeps right"]),
    "zoom in": (["the camera zooms in", "zooming in"], ["the camera pushes in"]),
    "zoom out": (["the camera zooms out", "zooming out"], ["the camera pulls back"]),
}
RELATION_WORDS = {
    "left of": (["to the left of", "left of"], ["on the left side of"]),
    "right of": (["to the right of", "right of"], ["on the right side of"]),
    "above": (["above", "over"], ["higher than"]),
    "below": (["below", "under"], ["beneath"]),
}

ONE_TEMPLATES = (
    ["{obj} {motion} {background}{camera}", "a video of {obj} {motion} {background}{camera}",
     "{background_cap}, {obj} {motion}{camera}"],
    ["footage showing {obj} that is {motion} {background}{camera}"],
)
TWO_TEMPLATES = (
    ["{obj1} {motion1} {relation} {obj2} {motion2} {background}{camera}",
     "{background_cap}, {obj1} {motion1} {relation} {obj2} {motion2}{camera}"],
    ["a clip where {obj1} {motion1} appears {relation} {obj2} {motion2} {background}{camera}"],
)


def _pick(rng: random.Random, table: dict, key: str, heldout: bool) -> str:
    train, held = table[key]
    return rng.choice(held if heldout and rng.random() < 0.7 else train)


def _article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def _object(rng: random.Random, obj: WorldObject, heldout: bool) -> str:
    return _article(f"{_pick(rng, SIZE_WORDS, obj.size, heldout)} {_pick(rng, COLOR_WORDS, obj.color, heldout)} "
                    f"{_pick(rng, SHAPE_WORDS, obj.shape, heldout)}")


def _motion(rng: random.Random, obj: WorldObject, heldout: bool) -> str:
    words = _pick(rng, MOTION_WORDS, obj.motion, heldout)
    if obj.motion in TRANSLATIONS and obj.speed != "normal":
        words = f"{words} {_pick(rng, SPEED_WORDS, obj.speed, heldout)}"
    return words


def caption(scene: Scene, rng: random.Random, heldout: bool = False) -> str:
    """One caption of a scene. heldout=True draws on the held-out templates and phrasings."""
    camera = _pick(rng, CAMERA_WORDS, scene.camera, heldout)
    background = _pick(rng, BACKGROUND_WORDS, scene.background, heldout)
    fields = dict(background=background, background_cap=background[:1].upper() + background[1:],
                  camera=f", {camera}" if camera else "")
    if len(scene.objects) == 1:
        train, held = ONE_TEMPLATES
        fields.update(obj=_object(rng, scene.objects[0], heldout), motion=_motion(rng, scene.objects[0], heldout))
    else:
        train, held = TWO_TEMPLATES
        a, b = scene.objects
        fields.update(obj1=_object(rng, a, heldout), motion1=_motion(rng, a, heldout),
                      obj2=_object(rng, b, heldout), motion2=_motion(rng, b, heldout),
                      relation=_pick(rng, RELATION_WORDS, scene.relation, heldout))
    template = rng.choice(held if heldout and rng.random() < 0.5 else train)
    return " ".join(template.format(**fields).split())
