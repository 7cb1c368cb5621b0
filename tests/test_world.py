"""The synthetic world: scenes, rendering, captions and the held-out split."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from t2v.world import Scene, WorldObject, caption, random_scene, render, sample_scene, split_of
from t2v.world.captions import (BACKGROUND_WORDS, CAMERA_WORDS, COLOR_WORDS, MOTION_WORDS, RELATION_WORDS,
                                SHAPE_WORDS, SIZE_WORDS)
from t2v.world.scene import BG, COLORS
from t2v.world.splits import HELDOUT_PAIRS, HELDOUT_SHAPE_MOTIONS


def one(shape="square", color="red", size="large", motion="still", speed="normal", x=0.5, y=0.5, **scene):
    return Scene(objects=[WorldObject(shape, color, size, motion, speed, x, y)], **{"background": "black", **scene})


def centroid(frames, color):
    """Centre and pixel count of a colour in the first of `frames`."""
    mask = np.abs(frames[0].astype(int) - np.array(COLORS[color])).sum(-1) < 60
    ys, xs = np.nonzero(mask)
    return xs.mean(), ys.mean(), mask.sum()


def test_render_shape_determinism_and_antialiasing():
    scene = random_scene(random.Random(3))
    a, b = render(scene), render(scene)
    assert a.shape == (17, 128, 128, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    frames = render(one(shape="circle", background="black"))
    edge = frames[0][(frames[0].sum(-1) > 0) & (frames[0].sum(-1) < sum(COLORS["red"]) - 30)]
    assert len(edge) > 20  # partially covered edge pixels: antialiased, not jagged
    small = render(Scene(background="gray", objects=[WorldObject("star", "blue", "small")], width=64, height=48,
                         num_frames=5))
    assert small.shape == (5, 48, 64, 3)


@pytest.mark.parametrize("motion, dx, dy", [("left", -1, 0), ("right", 1, 0), ("up", 0, -1), ("down", 0, 1)])
def test_translations_move_the_object_the_right_way(motion, dx, dy):
    frames = render(one(motion=motion, size="small"))
    x0, y0, _ = centroid(frames[:1], "red")
    x1, y1, _ = centroid(frames[-1:], "red")
    assert np.sign(round((x1 - x0) / 10)) == dx and np.sign(round((y1 - y0) / 10)) == dy


def test_speed_grow_shrink_bounce_spin():
    fast = render(one(motion="right", speed="quickly", size="small", x=0.2))
    slow = render(one(motion="right", speed="slowly", size="small", x=0.2))
    travel = lambda f: centroid(f[-1:], "red")[0] - centroid(f[:1], "red")[0]  # noqa: E731
    assert travel(fast) > 2 * travel(slow) > 0
    grow, shrink = render(one(motion="grow", size="small")), render(one(motion="shrink"))
    assert centroid(grow[-1:], "red")[2] > 1.6 * centroid(grow[:1], "red")[2]
    assert centroid(shrink[-1:], "red")[2] < 0.5 * centroid(shrink[:1], "red")[2]
    bounce = render(one(motion="bounce", size="small", y=0.8))
    ys = [centroid(bounce[i:i + 1], "red")[1] for i in range(17)]
    assert min(ys) < ys[0] - 25 and abs(ys[-1] - ys[0]) < 2
    spin = render(one(motion="spin", shape="square"))
    masks = np.abs(spin.astype(int) - np.array(COLORS["red"])).sum(-1) < 60
    assert (masks[0] ^ masks[8]).sum() > 100  # same place, same size, turned


@pytest.mark.parametrize("camera, direction", [("pan left", 1), ("pan right", -1)])
def test_pans_move_the_world_across_the_view(camera, direction):
    import cv2

    frames = render(Scene(background="night", camera=camera, objects=[WorldObject("circle", "red", "small")]))
    a, b = (cv2.cvtColor(frames[i], cv2.COLOR_RGB2GRAY).astype(np.float32) for i in (0, -1))
    (shift_x, _), _ = cv2.phaseCorrelate(a, b)
    # The view travels 30% of the width; the stars move the other way on screen.
    assert shift_x * direction == pytest.approx(0.30 * 128, abs=3)


def test_zoom_in_magnifies_the_background():
    frames = render(Scene(background="sky", camera="zoom in", objects=[WorldObject("circle", "red", "small")]))
    horizon = lambda f: np.argmax(np.abs(np.diff(f[:, :, 1].astype(int).mean(1))))  # noqa: E731
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 10
    assert horizon(frames[-1]) > horizon(frames[0])  # below centre, the horizon moves down as we zoom in


def test_backgrounds_are_what_they_say():
    for name, expect in [("black", BG["black"]), ("white", BG["white"]), ("gray", BG["gray"]),
                         ("night", BG["night"])]:
        f = render(Scene(background=name, objects=[WorldObject("circle", "red", "small", x=0.1, y=0.1)]))[0]
        assert np.abs(np.median(f.reshape(-1, 3), 0) - expect).max() < 3
    sky = render(Scene(background="sky", objects=[WorldObject("circle", "red", "small", x=0.1, y=0.1)]))[0]
    assert sky[100:, :, 1].mean() > sky[100:, :, 2].mean() and sky[20:40, :, 2].mean() > sky[20:40, :, 0].mean()


def test_random_scenes_keep_the_rules():
    rng = random.Random(0)
    for _ in range(400):
        s = random_scene(rng)
        assert s.camera == "static" or s.background in ("night", "sky", "sunset")
        assert len({o.color for o in s.objects}) == len(s.objects)
        assert not any(o.shape == "circle" and o.motion == "spin" for o in s.objects)
        assert (s.relation is None) == (len(s.objects) == 1)
        assert Scene.from_json(s.to_json()) == s


def _phrases(table, heldout):
    return {p for value in table.values() for p in value[1 if heldout else 0] if p}


def test_captions_name_every_attribute_with_synonyms():
    rng = random.Random(0)
    seen_words = set()
    for _ in range(300):
        s = sample_scene(rng, "train")
        text = caption(s, rng)
        for obj in s.objects:
            for table, key in ((COLOR_WORDS, obj.color), (SHAPE_WORDS, obj.shape), (SIZE_WORDS, obj.size),
                               (MOTION_WORDS, obj.motion)):
                hits = [p for p in table[key][0] if p in text.lower()]
                assert hits, (key, text)
                seen_words.update(hits)
        assert any(p in text.lower() for p in BACKGROUND_WORDS[s.background][0])
        if s.camera != "static":
            assert any(p in text for p in CAMERA_WORDS[s.camera][0])
        if s.relation:
            assert any(p in text for p in RELATION_WORDS[s.relation][0])
    assert {"ball", "sphere", "crimson", "box"} <= seen_words


def test_heldout_phrasings_and_combinations_never_reach_training():
    rng = random.Random(1)
    held = _phrases(COLOR_WORDS, True) | _phrases(SHAPE_WORDS, True) | _phrases(MOTION_WORDS, True)
    held_re = re.compile("|".join(rf"\b{re.escape(p)}\b" for p in held))
    heldout_text_hits = 0
    for _ in range(1500):
        s = sample_scene(rng, "train")
        for o in s.objects:
            assert (o.color, o.shape) not in HELDOUT_PAIRS and (o.shape, o.motion) not in HELDOUT_SHAPE_MOTIONS
        assert not held_re.search(caption(s, rng))
        h = sample_scene(rng, "heldout")
        assert split_of(h) == "heldout"
        heldout_text_hits += bool(held_re.search(caption(h, rng, heldout=True)))
    assert heldout_text_hits > 1000  # held-out captions do use the reserved phrasings
