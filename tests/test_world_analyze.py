"""The pixel analyzer, the prompt parser and the scorer of t2v.world (analyze, parse, score), on rendered scenes."""

from __future__ import annotations

import collections
import copy
import random
import time

import pytest

from t2v.world.analyze import analyze
from t2v.world.parse import parse_prompt
from t2v.world.render import render
from t2v.world.scene import COLORS, SHAPES, TRANSLATIONS, Scene, WorldObject, random_scene
from t2v.world.score import score

NUM_SCENES = 520
MIN_ACCURACY = 0.98


@pytest.mark.slow
def test_analyzer_recovers_random_scenes_per_attribute():
    total, right = collections.Counter(), collections.Counter()
    failures = []
    start = time.perf_counter()
    for seed in range(NUM_SCENES):
        scene = random_scene(random.Random(seed))
        result = score(render(scene), scene)
        # Every attribute of the ground truth is scored (speed only for translations).
        expected_keys = {"background", "camera", "count"}
        for i, obj in enumerate(scene.objects):
            prefix = "" if len(scene.objects) == 1 else f"object{i + 1}."
            expected_keys |= {prefix + k for k in ("color", "shape", "size", "motion")}
            if obj.motion in TRANSLATIONS:
                expected_keys.add(prefix + "speed")
        if scene.relation is not None:
            expected_keys.add("relation")
        assert set(result) == expected_keys, (seed, sorted(result))
        for key, ok in result.items():
            attribute = key.split(".")[-1]
            total[attribute] += 1
            right[attribute] += ok
            if not ok:
                failures.append((seed, key))
    elapsed = time.perf_counter() - start
    table = "\n".join(f"{a:<10} {right[a] / total[a]:7.2%}  ({right[a]}/{total[a]})" for a in total)
    print(f"\n{NUM_SCENES} scenes in {elapsed:.1f} s\n{table}\nfailures: {failures}")
    for attribute in ("background", "camera", "count", "color", "shape", "size", "motion", "speed", "relation"):
        assert total[attribute] > 0, attribute
        accuracy = right[attribute] / total[attribute]
        assert accuracy >= MIN_ACCURACY, f"{attribute}: {accuracy:.2%} < {MIN_ACCURACY:.0%}\n{table}"


def test_analyze_reports_the_documented_structure():
    scene = Scene(background="night", camera="pan left", relation="left of",
                  objects=[WorldObject("heart", "red", "large", "up", "quickly", x=0.25, y=0.75, angle=30),
                           WorldObject("square", "blue", "small", "spin", x=0.75, y=0.5, angle=10)])
    got = analyze(render(scene))
    assert got["background"] == "night" and got["camera"] == "pan left"
    assert [o["color"] for o in got["objects"]] == ["red", "blue"]  # left to right
    red, blue = got["objects"]
    assert (red["shape"], red["size"], red["motion"], red["speed"]) == ("heart", "large", "up", "quickly")
    assert (blue["shape"], blue["size"], blue["motion"], blue["speed"]) == ("square", "small", "spin", "normal")
    assert abs(red["x"] - 0.25) < 0.03 and abs(red["y"] - 0.75) < 0.05
    assert abs(blue["x"] - 0.75) < 0.03 and abs(blue["y"] - 0.5) < 0.03
    assert 0 < blue["area"] < red["area"] < 0.2
    assert got["relation"] == "left of"


def test_analyze_finds_nothing_in_an_empty_world():
    for background in ("black", "sky", "sunset", "night"):
        got = analyze(render(Scene(background=background, objects=[], seed=3)))
        assert got["background"] == background and got["objects"] == [] and got["relation"] is None


PROMPTS = [
    ("A small red circle moves left slowly on a black background",
     {"background": "black", "objects": [dict(size="small", color="red", shape="circle", motion="left",
                                              speed="slowly")]}),
    ("a big crimson ball drifts to the left over a starry night sky while the camera pans right",
     {"background": "night", "camera": "pan right",
      "objects": [dict(size="large", color="red", shape="circle", motion="left")]}),
    ("A tiny scarlet box rises quickly in front of a blue sky; the camera zooms in.",
     {"background": "sky", "camera": "zoom in",
      "objects": [dict(size="small", color="red", shape="square", motion="up", speed="quickly")]}),
    ("a huge white star sinks at sunset",
     {"background": "sunset", "objects": [dict(size="large", color="white", shape="star", motion="down")]}),
    ("A little golden sphere falls over a grassy meadow",
     {"background": "sky", "objects": [dict(size="small", color="yellow", shape="circle", motion="down")]}),
    ("a rotating pink heart above a twirling green triangle on a grey background",
     {"background": "gray", "relation": "above",
      "objects": [dict(motion="spin", color="pink", shape="heart"), dict(motion="spin", color="green",
                                                                        shape="triangle")]}),
    ("A red square to the left of a blue disc in the evening, camera zooms out",
     {"background": "sunset", "camera": "zoom out", "relation": "left of",
      "objects": [dict(color="red", shape="square"), dict(color="blue", shape="circle")]}),
    ("a violet block beneath an orange sphere",
     {"relation": "below", "objects": [dict(color="purple", shape="square"), dict(color="orange", shape="circle")]}),
    ("A spinning yellow star under a little blue heart",
     {"relation": "below", "objects": [dict(motion="spin", color="yellow", shape="star"),
                                       dict(size="small", color="blue", shape="heart")]}),
    ("An orange triangle is to the right of a white ball on a plain grey backdrop, static camera",
     {"background": "gray", "camera": "static", "relation": "right of",
      "objects": [dict(color="orange", shape="triangle"), dict(color="white", shape="circle")]}),
    ("a green disk heads left fast on a white background",
     {"background": "white", "objects": [dict(color="green", shape="circle", motion="left", speed="quickly")]}),
    ("a purple heart bouncing on a black background",
     {"background": "black", "objects": [dict(color="purple", shape="heart", motion="bounce")]}),
    ("An enormous orange heart grows. A tiny azure star shrinks.",
     {"objects": [dict(size="large", color="orange", shape="heart", motion="grow"),
                  dict(size="small", color="blue", shape="star", motion="shrink")]}),
    ("a red circle and a blue square; the red circle is to the right of the blue square",
     {"relation": "right of", "objects": [dict(color="red", shape="circle"), dict(color="blue", shape="square")]}),
    ("a blue square and a red circle; the red circle is to the right of the blue square",
     {"relation": "left of", "objects": [dict(color="blue", shape="square"), dict(color="red", shape="circle")]}),
    ("A white pyramid stays still in a starry sky as the camera pans to the left",
     {"background": "night", "camera": "pan left", "objects": [dict(color="white", shape="triangle",
                                                                     motion="still")]}),
    ("the rose heart drifts to the right side of the frame gently",
     {"objects": [dict(color="pink", shape="heart", motion="right", speed="slowly")]}),
    ("A cobalt cube ascends at a steady pace in the blue sky",
     {"background": "sky", "objects": [dict(color="blue", shape="square", motion="up", speed="normal")]}),
    ("a whirling lemon star at dusk, zooming out",
     {"background": "sunset", "camera": "zoom out", "objects": [dict(motion="spin", color="yellow", shape="star")]}),
    ("a ball", {"objects": [dict(shape="circle")]}),
    ("a camera zooms in on nothing at night", {"background": "night", "camera": "zoom in", "objects": []}),
]


@pytest.mark.parametrize("prompt,expected", PROMPTS, ids=[p for p, _ in PROMPTS])
def test_parse_prompt_understands_synonyms(prompt, expected):
    got = parse_prompt(prompt)
    assert got == expected


def _single(seed: int, **fixed) -> Scene:
    return random_scene(random.Random(seed), num_objects=1, **fixed)


def _pair_with_translation() -> Scene:
    for seed in range(100):
        scene = random_scene(random.Random(seed), num_objects=2, background="sky", camera="pan right")
        if scene.objects[0].motion in TRANSLATIONS:
            return scene
    raise AssertionError("no such scene")


@pytest.mark.parametrize("scene", [_single(5, background="sunset", camera="zoom in"), _pair_with_translation(),
                                   _single(11, background="white")], ids=["single", "pair", "white"])
def test_score_is_all_true_against_its_own_scene_and_flags_exactly_a_changed_attribute(scene):
    frames = render(scene)
    analysis = analyze(frames)
    truth = score(frames, scene, analysis=analysis)
    assert truth and all(truth.values()), truth
    assert score(frames, scene) == truth  # the analysis is the one score() computes itself

    def changed(mutate, key):
        other = copy.deepcopy(scene)
        mutate(other)
        result = score(frames, other, analysis=analysis)
        assert set(result) == set(truth), key
        assert [k for k, ok in result.items() if not ok] == [key], (key, result)

    two = len(scene.objects) == 2
    p = "object1." if two else ""
    obj = scene.objects[0]
    present = {o.color for o in scene.objects}
    new_color = next(c for c in COLORS if c not in present)
    changed(lambda s: setattr(s.objects[0], "color", new_color), p + "color")
    changed(lambda s: setattr(s.objects[0], "shape", next(x for x in SHAPES if x != obj.shape)), p + "shape")
    changed(lambda s: setattr(s.objects[0], "size", "small" if obj.size == "large" else "large"), p + "size")
    changed(lambda s: setattr(s, "background", "black" if scene.background != "black" else "gray"), "background")
    changed(lambda s: setattr(s, "camera", "zoom out" if scene.camera != "zoom out" else "static"), "camera")
    if obj.motion in TRANSLATIONS:
        changed(lambda s: setattr(s.objects[0], "speed", "slowly" if obj.speed != "slowly" else "quickly"),
                p + "speed")
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[obj.motion]
        changed(lambda s: setattr(s.objects[0], "motion", opposite), p + "motion")
    else:
        changed(lambda s: setattr(s.objects[0], "motion", "bounce" if obj.motion != "bounce" else "still"),
                p + "motion")
    if two:
        changed(lambda s: setattr(s.objects[1], "color", new_color), "object2.color")
        inverse = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        changed(lambda s: setattr(s, "relation", inverse[scene.relation]), "relation")


def test_score_counts_objects():
    scene = _pair_with_translation()
    frames = render(scene)
    one = copy.deepcopy(scene)
    one.objects = one.objects[:1]
    one.relation = None
    result = score(frames, one)
    assert result["count"] is False
    assert all(ok for key, ok in result.items() if key != "count"), result


def test_score_against_prompts():
    scene = Scene(background="sky", camera="zoom in", relation="above",
                  objects=[WorldObject("star", "yellow", "large", "left", "slowly", x=0.55, y=0.27, angle=5),
                           WorldObject("circle", "purple", "small", "grow", x=0.4, y=0.72)])
    frames = render(scene)
    good = "A big golden star drifts slowly to the left above a small growing violet ball, blue sky, camera zooms in"
    result = score(frames, good)
    assert result == {"background": True, "camera": True, "count": True, "object1.color": True,
                      "object1.shape": True, "object1.size": True, "object1.motion": True, "object1.speed": True,
                      "object2.color": True, "object2.shape": True, "object2.size": True, "object2.motion": True,
                      "relation": True}
    # Mention less, get fewer keys; get one thing wrong, get exactly that key wrong.
    assert score(frames, "a yellow star") == {"count": False, "color": True, "shape": True}
    bad = good.replace("golden", "crimson")
    assert [k for k, ok in score(frames, bad).items() if not ok] == ["object1.color"]
    bad = good.replace("above", "below")
    assert [k for k, ok in score(frames, bad).items() if not ok] == ["relation"]
    bad = good.replace("slowly", "quickly")
    assert [k for k, ok in score(frames, bad).items() if not ok] == ["object1.speed"]
    bad = good.replace("zooms in", "pans left")
    assert [k for k, ok in score(frames, bad).items() if not ok] == ["camera"]
    assert score(frames, "a purple heart at sunset") == {"background": False, "count": False, "color": True,
                                                         "shape": False}


def test_parse_prompt_reads_every_caption_the_writer_makes():
    """The caption writer's phrasings (training and held-out) and the prompt parser must not drift apart."""
    from t2v.world import caption, sample_scene

    rng = random.Random(7)
    for split in ("train", "heldout"):
        for _ in range(400):
            scene = sample_scene(rng, split)
            text = caption(scene, rng, heldout=split == "heldout")
            parsed = parse_prompt(text)
            assert parsed.get("background") == scene.background, text
            if scene.camera != "static":
                assert parsed.get("camera") == scene.camera, text
            assert len(parsed["objects"]) == len(scene.objects), text
            for exp, got in zip(scene.objects, parsed["objects"]):
                assert (got.get("color"), got.get("shape"), got.get("size"), got.get("motion")) == (
                    exp.color, exp.shape, exp.size, exp.motion), text
                if exp.speed != "normal":
                    assert got.get("speed") == exp.speed, text
            if scene.relation:
                assert parsed.get("relation") == scene.relation, text
