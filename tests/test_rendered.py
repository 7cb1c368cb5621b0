"""Clips rendered on the fly for training (t2v.data.rendered): deterministic, captioned, memory-mapped."""

from __future__ import annotations

import numpy as np
import pytest

from t2v.data.rendered import RenderedWorld, RenderSpec, scene_at
from t2v.world import render
from t2v.world.parse import parse_prompt
from t2v.world.splits import split_of


def test_rendered_world_serves_every_clip_with_captions_of_its_scene():
    spec = RenderSpec(seed=3, num_frames=5, size=32, chunk=4)
    world = RenderedWorld(10, spec, workers=2).start()
    try:
        assert world.wait(timeout=120) == 10
        items = world.items()
        assert len(items) == 10
        video, scene = world.clip(items[-1])
        index = items[-1][0] * spec.chunk + items[-1][1]
        assert scene == scene_at(spec, index) and split_of(scene) == "train"
        assert np.array_equal(video, render(scene_at(spec, index)))  # any worker renders the same clip
        batch = next(world.batches(6, seed=1))
        assert batch["video"].shape == (6, 5, 32, 32, 3) and batch["video"].dtype == np.uint8
        # Each caption names its clip's background and the colours of its objects.
        seen_phrasings = set()
        for i in range(6):
            asked = parse_prompt(batch["caption"][i])
            scenes = [s for v, s in (world.clip(it) for it in items) if np.array_equal(v, batch["video"][i])]
            assert any(asked["background"] == s.background for s in scenes)
            seen_phrasings.add(batch["caption"][i])
        captions = [c for b in zip(range(5), world.batches(6, seed=2)) for c in b[1]["caption"]]
        assert len(set(captions)) > 10  # fresh phrasings, not one caption per clip
    finally:
        world.close()
    assert not __import__("os").path.exists(world.folder)


def test_rendered_world_rejects_an_empty_request():
    with pytest.raises(ValueError, match="clips"):
        RenderedWorld(0)
