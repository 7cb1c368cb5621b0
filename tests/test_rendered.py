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
        clips = [world.clip(it) for it in items]

        def scenes_of(video):
            return [s for v, s in clips if np.array_equal(v, video)]

        def names_its_scene(caption, scenes) -> bool:  # its background and the colour of each of its objects
            asked = parse_prompt(caption)
            objects = sorted((o.get("color", ""), o.get("shape", "")) for o in asked["objects"])
            return any(asked.get("background") == s.background and
                       objects == sorted((o.color, o.shape) for o in s.objects) for s in scenes)

        # Each caption names its clip's background and the colours of its objects.
        for i in range(6):
            assert names_its_scene(batch["caption"][i], scenes_of(batch["video"][i])), batch["caption"][i]
        # Each draw phrases its clip afresh: over 5 more batches, a clip drawn more than once is told in more than
        # one way (every phrasing still naming its scene), not one caption per clip.
        seen_phrasings: dict[int, set] = {}
        for _, b in zip(range(5), world.batches(6, seed=2)):
            for video, text in zip(b["video"], b["caption"]):
                scenes = scenes_of(video)
                assert names_its_scene(text, scenes), text
                seen_phrasings.setdefault(id(scenes[0]), set()).add(text)
        assert max(len(p) for p in seen_phrasings.values()) > 1
        assert sum(map(len, seen_phrasings.values())) > len(seen_phrasings)  # more phrasings than clips drawn
    finally:
        world.close()
    assert not __import__("os").path.exists(world.folder)


def test_rendered_world_rejects_an_empty_request():
    with pytest.raises(ValueError, match="clips"):
        RenderedWorld(0)
