"""Quality scores move the right way on videos made worse on purpose (rendered world clips as the reference)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from t2v.quality.assess import (assess, colorfulness_score, consistency_score, flicker_score, motion_scores,
                        sharpness_score)
from t2v.video import write_video
from t2v.world import caption, render, sample_scene


@pytest.fixture(scope="module")
def clip():
    rng = random.Random(4)
    scene = sample_scene(rng, "train", num_objects=1, background="gray", camera="static")
    while scene.objects[0].motion not in ("left", "right") or scene.objects[0].speed != "quickly":
        scene = sample_scene(rng, "train", num_objects=1, background="gray", camera="static")
    return render(scene), caption(scene, rng)


def test_noise_and_flicker_lower_the_temporal_scores(clip):
    frames, _ = clip
    rng = np.random.default_rng(0)
    noisy = np.clip(frames + rng.normal(0, 25, frames.shape), 0, 255).astype(np.uint8)
    flicker = frames.copy().astype(np.int16)
    flicker[::2] += 50
    flicker = np.clip(flicker, 0, 255).astype(np.uint8)
    for bad in (noisy, flicker):
        assert flicker_score(bad) < flicker_score(frames) - 0.03
        assert consistency_score(bad) < consistency_score(frames)
    assert consistency_score(noisy) < consistency_score(frames) - 0.2


def test_frozen_frames_lose_dynamics(clip):
    frames, _ = clip
    frozen = np.repeat(frames[:1], len(frames), axis=0)
    assert motion_scores(frames)["dynamics"] > 0.5 > motion_scores(frozen)["dynamics"]
    # Jumping back and forth is less smooth than steady motion.
    jerky = frames[[0, 8, 2, 10, 4, 12, 6, 14, 8, 16, 10, 12, 14, 16, 15, 16, 16]]
    assert motion_scores(jerky)["smoothness"] < motion_scores(frames)["smoothness"]


def test_blur_and_grey_lower_visual_scores(clip):
    import cv2

    frames, _ = clip
    blurred = np.stack([cv2.GaussianBlur(f, (9, 9), 4) for f in frames])
    assert sharpness_score(blurred) < sharpness_score(frames)
    grey = np.repeat(frames.mean(-1, keepdims=True), 3, -1).astype(np.uint8)
    assert colorfulness_score(grey) < colorfulness_score(frames)


def test_wrong_colour_lowers_text_alignment_and_total(clip):
    frames, prompt = clip
    good = assess(frames, prompt)
    assert good.details["alignment_method"] == "world analyzer" and good.scores["text_alignment"] >= 0.8
    recoloured = frames[..., ::-1].copy()  # swap red and blue: the object's colour is wrong now
    bad = assess(recoloured, prompt)
    assert bad.scores["text_alignment"] < good.scores["text_alignment"]
    assert bad.total < good.total
    assert "color" in bad.details["wrong"] and "color" in " ".join(bad.recommendations)
    # Outside the world's vocabulary the score is the prompt's MiniLM similarity to what the video shows: a prompt
    # that paraphrases the clip beats one about something else, and each of two prompts scores higher on the video
    # that fits it (the moving object, or the same backdrop left empty) than on the other.
    empty = np.broadcast_to(np.median(frames.reshape(-1, 3), axis=0).astype(np.uint8), frames.shape).copy()
    moving, bare, sailor = ("a blob drifting sideways over a plain backdrop", "an empty, featureless backdrop",
                            "a portrait of an old sailor in the rain")
    alignment = {}
    for name, video in (("clip", frames), ("empty", empty)):
        for prompt in (moving, bare, sailor):
            result = assess(video, prompt)
            assert result.details["alignment_method"] == "MiniLM similarity", prompt
            alignment[name, prompt] = result.scores["text_alignment"]
    assert alignment["clip", moving] > alignment["clip", sailor] + 0.1
    assert alignment["clip", moving] > alignment["empty", moving] + 0.05
    assert alignment["empty", bare] > alignment["clip", bare] + 0.05


def test_assess_command(clip, tmp_path):
    import subprocess
    import shutil

    frames, prompt = clip
    path = tmp_path / "clip.mp4"
    write_video(path, frames, 8)
    r = subprocess.run([shutil.which("t2v"), "assess", str(path), "--prompt", prompt], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "flicker" in r.stdout and "text_alignment" in r.stdout and "total" in r.stdout
    r = subprocess.run([shutil.which("t2v"), "assess", str(tmp_path / "missing.mp4")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "video" in r.stderr
