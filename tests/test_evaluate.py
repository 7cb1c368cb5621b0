"""The adherence evaluation harness, checked with oracle 'models' that render the prompt's true scene."""

from __future__ import annotations

import copy
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
from PIL import Image

from t2v.evaluate import contact_sheet, eval_prompts, evaluate
from t2v.world import render
from t2v.world.scene import COLORS


class Oracle:
    """Renders the exact scene behind each evaluation prompt, optionally with every colour swapped."""

    def __init__(self, split, n, wrong_color=False):
        self.scenes = dict(eval_prompts(split, n))
        self.wrong_color = wrong_color
        self.bundle = SimpleNamespace(config=SimpleNamespace(width=128, height=128, num_frames=17))

    def __call__(self, prompt, num_inference_steps, seed):
        scene = copy.deepcopy(self.scenes[prompt])
        if self.wrong_color:
            names = list(COLORS)
            for obj in scene.objects:
                obj.color = names[(names.index(obj.color) + 3) % len(names)]
        return SimpleNamespace(frames=render(scene)[None])


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
