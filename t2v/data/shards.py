"""Sharded video-text parquet.

One schema for synthetic and real data. A dataset is a folder (local or s3://) of
`shard-00000-of-00008.parquet` files plus `manifest.json` naming every shard and its row count, so a
missing shard is detected instead of silently training on less data.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage

SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # "<shard>:<row>" or the source's id: names a row in logs
    pa.field("video", pa.binary(), nullable=False),  # an mp4 file's bytes
    pa.field("caption", pa.string(), nullable=False),
    pa.field("num_frames", pa.int32(), nullable=False),
    pa.field("fps", pa.float32(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("scene", pa.string()),  # JSON ground truth (synthetic world) or null (real video)
    pa.field("source", pa.string(), nullable=False),  # "world/train", "world/heldout", "webvid", ...
    pa.field("latents", pa.binary()),  # optional precomputed VAE latents: a .npy file's bytes (float16)
])
ROWS_PER_GROUP = 64  # ~2-3 MB of 128x128 clips: small enough to stream, large enough to read efficiently
MANIFEST = "manifest.json"


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.parquet"


def latents_to_bytes(latents: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(latents, dtype=np.float16))
    return buf.getvalue()


def latents_from_bytes(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def write_shard(uri: str, rows: list[dict]) -> int:
    """Write rows (dicts with SCHEMA's fields; scene/latents optional) to one parquet file."""
    full = [{**{"scene": None, "latents": None}, **r} for r in rows]
    table = pa.Table.from_pylist(full, schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROWS_PER_GROUP, compression="none")  # mp4 is compressed already
    storage.write_bytes(uri, buf.getvalue())  # one object put / atomic local write: no half-written shard
    return len(rows)


def write_manifest(uri: str, shards: dict[str, int], meta: dict | None = None) -> None:
    body = {"shards": [{"name": n, "rows": r} for n, r in sorted(shards.items())], **(meta or {})}
    storage.write_bytes(storage.join(uri, MANIFEST), json.dumps(body, indent=2).encode())


def read_manifest(uri: str) -> dict:
    try:
        return json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no {MANIFEST}; not a t2v dataset (write one with `t2v data`)") from None


def shard_uris(uri: str) -> list[str]:
    """Every shard the manifest names; a missing one is an error naming it."""
    manifest = read_manifest(uri)
    present = set(storage.list_files(uri))
    names = [s["name"] for s in manifest["shards"]]
    missing = [n for n in names if n not in present]
    if missing:
        raise FileNotFoundError(f"{uri}: shard(s) listed in {MANIFEST} are missing: {', '.join(missing)}")
    return [storage.join(uri, n) for n in names]


def map_shards(fn, jobs: list[tuple], parallel: bool) -> list:
    """fn(*job) for every job: one Ray task (1 CPU) each when `parallel`, else in this process, in order."""
    if not parallel:
        return [fn(*job) for job in jobs]
    import ray

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*job) for job in jobs])


# --- the synthetic world -----------------------------------------------------------------------

@dataclass
class WorldSpec:
    clips: int
    shards: int
    split: str = "train"
    seed: int = 0
    width: int = 128
    height: int = 128
    num_frames: int = 17
    fps: float = 8.0
    background: str | None = None  # this share of the clips on this background (e.g. a new word, "desert")
    background_share: float = 1.0

    def __post_init__(self):
        from ..world.scene import ALL_BACKGROUNDS

        if self.background is not None and self.background not in ALL_BACKGROUNDS:
            raise ValueError(f"background: {self.background!r} is not one of the world's "
                             f"({', '.join(ALL_BACKGROUNDS)})")
        if not 0 <= self.background_share <= 1:
            raise ValueError(f"background_share: {self.background_share} is not between 0 and 1")

    def clips_in(self, shard: int) -> int:
        return self.clips // self.shards + (1 if shard < self.clips % self.shards else 0)


def world_rows(spec: WorldSpec, shard: int) -> list[dict]:
    """Render one shard's clips: deterministic in (seed, shard), so shards can be made in parallel."""
    from ..video import encode_video
    from ..world import caption, render, sample_scene

    rng = random.Random(f"{spec.seed}/{spec.split}/{shard}")
    name = shard_name(shard, spec.shards)
    rows = []
    for row in range(spec.clips_in(shard)):
        fixed = {}
        if spec.background and rng.random() < spec.background_share:
            fixed["background"] = spec.background
        scene = sample_scene(rng, spec.split, width=spec.width, height=spec.height, num_frames=spec.num_frames,
                             fps=spec.fps, **fixed)
        rows.append(dict(
            key=f"{name}:{row}", video=encode_video(render(scene), spec.fps, ".mp4"),
            caption=caption(scene, rng, heldout=spec.split == "heldout"), num_frames=spec.num_frames,
            fps=spec.fps, width=spec.width, height=spec.height, scene=scene.to_json(), source=f"world/{spec.split}",
        ))
    return rows


def write_world_shard(uri: str, spec: WorldSpec, shard: int) -> tuple[str, int]:
    name = shard_name(shard, spec.shards)
    return name, write_shard(storage.join(uri, name), world_rows(spec, shard))


def write_world(uri: str, spec: WorldSpec, parallel: bool = True) -> dict:
    """Render and write a whole world dataset; shards in parallel Ray tasks when `parallel`."""
    shards = dict(map_shards(write_world_shard, [(uri, spec, i) for i in range(spec.shards)], parallel))
    write_manifest(uri, shards, {"source": f"world/{spec.split}", "spec": spec.__dict__})
    return shards
