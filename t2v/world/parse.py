"""Parse prompts in the world's vocabulary: parse_prompt(prompt) -> what a prompt asks for (only the attributes
it mentions), in the structure analyze.analyze gives a clip.

Words only: nothing here (or in what it imports) loads OpenCV, so text-side callers
(t2v.production.prompting) stay light.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .captions import (BACKGROUND_WORDS, CAMERA_WORDS, COLOR_WORDS, MOTION_WORDS, RELATION_WORDS, SHAPE_WORDS,
                       SIZE_WORDS, SPEED_WORDS)
from .scene import INVERSE_RELATIONS

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
    "desert": ["sandy desert", "desert sand", "sand dunes", "desert dunes", "dunes", "dune", "desert", "sahara",
               "sand"],
    "night": ["starry night sky", "starry night", "starry sky", "night sky", "night-time sky", "nighttime sky",
              "starlit sky", "starry", "starlit", "at night", "night", "nighttime", "night-time", "the stars",
              "outer space", "space"],
    "sunset": ["sunset sky", "sunset", "sunsets", "evening sky", "evening", "dusk", "sundown", "twilight",
               "setting sun", "golden hour"],
    "sky": ["blue sky", "daytime sky", "cloudy sky", "clear sky", "sunny sky", "grassy meadow", "grassy field",
            "grassy hill", "meadow", "grassland", "grass", "grassy", "lawn", "field", "clouds", "cloudy", "daytime",
            "sunny day", "sky"],
    "black": ["black background", "black backdrop", "dark background", "dark backdrop", "dark screen",
              "black screen", "pitch black background",
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
                out["relation"] = rel if (a, b) == (0, 1) else INVERSE_RELATIONS[rel]
                break
    return out
