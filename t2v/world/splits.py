"""The held-out split: attribute combinations and caption phrasings that never enter training shards.

- HELDOUT_PAIRS: (colour, shape) pairs; a scene with any object of such a pair is held out.
- HELDOUT_SHAPE_MOTIONS: (shape, motion) pairs, likewise.
- Phrasings: every synonym table in captions.py keeps its last entries, and the last template of each
  kind, for held-out captions only (see `captions.caption(..., heldout=True)`).

Training shards hold only `split_of(scene) == "train"` scenes with training captions; evaluation on the
held-out split measures generalization to unseen combinations and paraphrases.
"""

from __future__ import annotations

import random

from .scene import Scene, random_scene

HELDOUT_PAIRS = frozenset({
    ("red", "star"), ("blue", "heart"), ("green", "triangle"), ("yellow", "square"),
    ("purple", "circle"), ("pink", "triangle"), ("orange", "star"), ("white", "heart"),
})
HELDOUT_SHAPE_MOTIONS = frozenset({("square", "bounce"), ("star", "shrink"), ("heart", "left")})


def split_of(scene: Scene) -> str:
    for obj in scene.objects:
        if (obj.color, obj.shape) in HELDOUT_PAIRS or (obj.shape, obj.motion) in HELDOUT_SHAPE_MOTIONS:
            return "heldout"
    return "train"


def sample_scene(rng: random.Random, split: str, **fixed) -> Scene:
    """A random scene of the given split (rejection sampling over the whole vocabulary)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    while True:
        scene = random_scene(rng, **fixed)
        if split_of(scene) == split:
            return scene
