"""The adherence evaluation harness, checked with oracle 'models' that render the prompt's true scene."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from t2v.quality.evaluate import FrameErrors, conditioning_losses, contact_sheet, eval_prompts, evaluate, evaluate_vae
from t2v.world import Scene, WorldObject, render
from t2v.world.analyze import objects_per_frame
from t2v.world.render import object_masks
from t2v.world.scene import COLORS


class Oracle:
    """Renders the exact scene behind each evaluation prompt, optionally with every colour swapped."""

    def __init__(self, split, n, wrong_color=False, vanish_after=None):
        self.scenes = dict(eval_prompts(split, n))
        self.wrong_color = wrong_color
        self.vanish_after = vanish_after  # from this frame on, the objects are gone
        self.bundle = SimpleNamespace(config=SimpleNamespace(width=128, height=128, num_frames=17))

    def __call__(self, prompt, num_inference_steps, seed, negative_prompt=None):
        scene = copy.deepcopy(self.scenes[prompt])
        if self.wrong_color:
            names = list(COLORS)
            for obj in scene.objects:
                obj.color = names[(names.index(obj.color) + 3) % len(names)]
        frames = render(scene)
        if self.vanish_after is not None:
            frames[self.vanish_after:] = render(dataclasses.replace(scene, objects=[]))[self.vanish_after:]
        return SimpleNamespace(frames=frames[None])


def test_true_scenes_score_full_marks_and_wrong_colours_do_not():
    n = 30
    good = evaluate(Oracle("heldout", n), "heldout", n, sheet_rows=3)
    assert good.accuracy("one", "color") == 1.0 and good.accuracy("one", "motion") == 1.0
    assert good.accuracy("two", "relation") == 1.0 and good.accuracy("two", "colors") == 1.0
    assert sum(len(v) for k, v in good.hits.items() if k[1] == "background") == n
    bad = evaluate(Oracle("heldout", n, wrong_color=True), "heldout", n)
    assert bad.accuracy("one", "color") < 0.3
    assert "color" in good.table() and "100.0%" in good.table()


def test_contact_sheet_has_a_row_per_prompt(tmp_path):
    result = evaluate(Oracle("train", 3), "train", 3)
    contact_sheet(result.rows, str(tmp_path / "s.png"), columns=4)
    img = np.asarray(Image.open(tmp_path / "s.png"))
    assert img.shape == (3 * (128 + 16), 4 * 128, 3)
    assert (img[2:14, :200] < 128).any()  # the prompt's text is drawn


def test_cli_eval_prints_the_table_and_writes_the_sheet(tmp_path, wan_dir):
    r = subprocess.run([shutil.which("t2v"), "eval", "--model", str(wan_dir), "--n", "2", "--steps", "1",
                        "--sheet", str(tmp_path / "sheet.png")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "prompt adherence, heldout split, 2 prompts" in r.stdout and "relation" in r.stdout
    assert Image.open(tmp_path / "sheet.png").size[0] == 6 * 32


def test_persistence_counts_clips_whose_object_is_right_in_every_frame_it_is_shown():
    n = 30
    good = evaluate(Oracle("heldout", n), "heldout", n)
    assert good.accuracy("one", "persistence") == 1.0
    assert good.per_frame() == [1.0] * 17
    vanishing = evaluate(Oracle("heldout", n, vanish_after=7), "heldout", n)
    assert vanishing.accuracy("one", "persistence") == 0.0
    by_frame = vanishing.per_frame()
    assert by_frame[:7] == [1.0] * 7 and by_frame[7:] == [0.0] * 10  # "breaks up after frame 6" as a number
    assert "one object right, by frame: 100 100" in vanishing.table()


def test_objects_per_frame_sees_fragments_and_extra_colours():
    one = Scene("black", [WorldObject("circle", "red", "large", x=0.3, y=0.5)], num_frames=3)
    assert objects_per_frame(render(one)) == [{"red": 1}] * 3
    split_in_two = dataclasses.replace(one, objects=[WorldObject("circle", "red", "small", x=0.25, y=0.5),
                                                     WorldObject("circle", "red", "small", x=0.75, y=0.5)])
    assert objects_per_frame(render(split_in_two)) == [{"red": 2}] * 3
    two = dataclasses.replace(one, objects=[WorldObject("circle", "red", "small", x=0.25, y=0.5),
                                            WorldObject("square", "blue", "small", x=0.75, y=0.5)])
    assert objects_per_frame(render(two)) == [{"red": 1, "blue": 1}] * 3


def test_object_masks_cover_the_objects_and_nothing_else():
    scene = Scene("sky", [WorldObject("square", "yellow", "large", motion="right", x=0.3, y=0.5)], num_frames=5)
    masks = object_masks(scene)
    frames = render(scene)
    assert masks.shape == (5, 128, 128)
    assert 0.02 < masks.mean() < 0.2
    assert (frames[masks][:, 2] < 150).mean() > 0.9  # yellow (blue channel low), not the blue sky
    assert not object_masks(dataclasses.replace(scene, objects=[])).any()


def test_frame_errors_split_inside_and_outside_the_objects():
    scene = Scene("gray", [WorldObject("circle", "red", "large")], num_frames=4)
    clip, masks = render(scene), object_masks(scene)
    errors = FrameErrors()
    errors.add(clip, clip, masks)
    assert (errors.mean()[0] == 0).all() and (errors.mean()[1] == 0).all()
    erased = FrameErrors()
    erased.add(render(dataclasses.replace(scene, objects=[])), clip, masks)
    inside, outside = erased.mean()
    assert (inside > 0.2).all() and (outside == 0).all()
    assert "inside objects:" in erased.table()


class IdentityVae:
    """A 'VAE' whose latents are the pixels: reconstructions are exact, so every score is the analyzer's own."""

    def __init__(self):
        family = SimpleNamespace(encode=lambda bundle, video: video)
        self.bundle = SimpleNamespace(family=family, config=SimpleNamespace(width=128, height=128, num_frames=17))

    def decode_latents(self, video):
        return ((video.permute(0, 2, 3, 4, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def test_vae_stage_scores_reconstructions_against_the_rendered_scenes():
    result, errors = evaluate_vae(IdentityVae(), "heldout", 12)
    assert result.accuracy("one", "color") == 1.0 and result.accuracy("one", "persistence") == 1.0
    assert result.accuracy("two", "colors") == 1.0
    assert (errors.mean()[0] == 0).all() and (errors.inside_px > 0).all()


@pytest.mark.parametrize("pipe_name", ["wan_pipe", "latte_pipe"])
def test_conditioning_losses_use_one_noise_for_every_caption(request, pipe_name):
    """The family's own training loss (flow matching, or DDPM at t = level x 1000), the same noise per caption."""
    pipe = request.getfixturevalue(pipe_name)
    losses = conditioning_losses(pipe, "heldout", n=4, batch_size=2, sigmas=(0.5, 0.9))
    assert set(losses) == {"true", "shuffled", "empty"} and set(losses["true"]) == {0.5, 0.9}
    assert losses == conditioning_losses(pipe, "heldout", n=4, batch_size=2, sigmas=(0.5, 0.9))
    assert losses["true"][0.9] != losses["empty"][0.9]  # the captions reach the denoiser


def test_cli_eval_all_stages(tmp_path, wan_dir):
    r = subprocess.run([shutil.which("t2v"), "eval", "--stage", "all", "--model", str(wan_dir), "--n", "2",
                        "--steps", "1", "--sheet", str(tmp_path / "sheet.png")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[vae] prompt adherence" in r.stdout and "inside objects:" in r.stdout
    assert "shuffled" in r.stdout and "[video] prompt adherence" in r.stdout and "persistence" in r.stdout
    assert (tmp_path / "sheet-vae.png").exists() and (tmp_path / "sheet-video.png").exists()
