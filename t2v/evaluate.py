"""Prompt adherence of a model on the synthetic world, measured by the pixel analyzer.

Prompts come from a split (held-out: unseen attribute combinations and paraphrases; or training) with their
exact scenes; each generated video is scored against its scene, per attribute, separately for one- and
two-object prompts.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

# Attributes reported per prompt kind, in table order ("colors" = every object's colour right).
ONE_OBJECT = ("background", "camera", "count", "color", "shape", "size", "motion", "speed")
TWO_OBJECTS = ("background", "count", "colors", "shapes", "relation")


@dataclass
class EvalResult:
    split: str
    n: int
    hits: dict = field(default_factory=lambda: defaultdict(list))  # (kind, attribute) -> [bool]
    rows: list = field(default_factory=list)  # (prompt, frames) for the contact sheet

    def accuracy(self, kind: str, attribute: str) -> float | None:
        values = self.hits.get((kind, attribute))
        return float(np.mean(values)) if values else None

    def table(self) -> str:
        lines = [f"prompt adherence, {self.split} split, {self.n} prompts",
                 f"{'attribute':<12}{'1 object':>10}{'2 objects':>11}"]
        for attribute in dict.fromkeys(ONE_OBJECT + TWO_OBJECTS):
            cells = []
            for kind in ("one", "two"):
                acc = self.accuracy(kind, attribute)
                n = len(self.hits.get((kind, attribute), []))
                cells.append(f"{acc * 100:6.1f}% {n:>3}" if acc is not None else f"{'—':>10}")
            lines.append(f"{attribute:<12}{cells[0]:>10} {cells[1]:>10}")
        return "\n".join(lines)


def eval_prompts(split: str, n: int, seed: int = 0, width: int = 128, height: int = 128, num_frames: int = 17):
    from .world import caption, sample_scene

    rng = random.Random(f"eval/{split}/{seed}")
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split, width=width, height=height, num_frames=num_frames)
        out.append((caption(scene, rng, heldout=split == "heldout"), scene))
    return out


def _record(result: EvalResult, scene, scores: dict) -> None:
    if len(scene.objects) == 1:
        for attribute in ONE_OBJECT:
            if attribute in scores:
                result.hits[("one", attribute)].append(bool(scores[attribute]))
        return
    for attribute in ("background", "count", "relation"):
        if attribute in scores:
            result.hits[("two", attribute)].append(bool(scores[attribute]))
    for plural, key in (("colors", "color"), ("shapes", "shape")):
        per_object = [v for k, v in scores.items() if k.endswith("." + key)]
        if per_object:
            result.hits[("two", plural)].append(all(per_object))


def evaluate(pipe, split: str = "heldout", n: int = 200, num_inference_steps: int = 25, seed: int = 0,
             sheet_rows: int = 12, progress=None) -> EvalResult:
    from .world.analyze import score

    cfg = pipe.bundle.config
    result = EvalResult(split=split, n=n)
    for i, (prompt, scene) in enumerate(eval_prompts(split, n, seed, cfg.width, cfg.height, cfg.num_frames)):
        frames = pipe(prompt, num_inference_steps=num_inference_steps, seed=seed + i).frames[0]
        _record(result, scene, score(frames, scene))
        if len(result.rows) < sheet_rows:
            result.rows.append((prompt, frames))
        if progress:
            progress(i + 1)
    return result


def contact_sheet(rows, path: str, columns: int = 6) -> None:
    """A PNG grid for people to look at: per prompt, its text above `columns` evenly spaced frames."""
    from PIL import Image, ImageDraw

    h, w = rows[0][1].shape[1:3]
    text_h = 16
    sheet = Image.new("RGB", (w * columns, (h + text_h) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (prompt, frames) in enumerate(rows):
        y = r * (h + text_h)
        draw.text((3, y + 2), prompt[: w * columns // 6], fill=(0, 0, 0))
        for c, t in enumerate(np.linspace(0, len(frames) - 1, columns).round().astype(int)):
            sheet.paste(Image.fromarray(frames[t]), (c * w, y + text_h))
    sheet.save(path)
