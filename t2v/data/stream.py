"""Streaming shards into training batches: Ray Data (`dataset`) or a plain single-process loop
(`iter_batches`, the baseline and the no-Ray path). Both decode with `decode_rows`.

A row whose video does not decode is skipped, logged with its key (shard:row) and counted; the count is
kept per dataset URI in a small Ray actor (`skipped(uri)`), or returned by the plain loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .. import storage
from .shards import latents_from_bytes, shard_uris

log = logging.getLogger(__name__)
COLUMNS = ["key", "video", "caption", "scene"]


def video_tensor(batch: dict, device) -> torch.Tensor:
    """A batch's clips as a VAE takes them: uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    v = torch.as_tensor(batch["video"], device=device)
    return v.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


@dataclass
class Decode:
    """Decode mp4 bytes into uint8 [B, T, H, W, 3]; resize and cut to num_frames when asked."""

    num_frames: int | None = None
    width: int | None = None
    height: int | None = None
    skipped: list = field(default_factory=list)

    def clip(self, data: bytes) -> np.ndarray:
        from ..video import read_video

        frames = read_video(data)
        if self.num_frames:
            if len(frames) < self.num_frames:
                raise ValueError(f"{len(frames)} frames, need {self.num_frames}")
            frames = frames[: self.num_frames]
        h, w = frames.shape[1:3]
        if (self.width and self.width != w) or (self.height and self.height != h):
            size = (self.width or w, self.height or h)
            frames = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in frames])
        return frames

    def __call__(self, batch: dict) -> dict:
        if "video" not in batch:  # training on precomputed latents: nothing to decode
            out = {k: np.asarray(v) for k, v in batch.items() if k != "latents"}
            if "latents" in batch:
                out["latents"] = np.stack([latents_from_bytes(b) for b in batch["latents"]])
            return out
        keep, clips = [], []
        for i, (key, data) in enumerate(zip(batch["key"], batch["video"])):
            try:
                clips.append(self.clip(data))
                keep.append(i)
            except Exception as e:  # a corrupt or short video must not stop the stream
                log.warning("skipped row %s: undecodable video (%s)", key, e)
                self.skipped.append((str(key), str(e)))
        out = {k: np.asarray(v)[keep] for k, v in batch.items() if k not in ("video", "latents")}
        out["video"] = np.stack(clips) if clips else np.zeros((0, 0, 0, 0, 3), np.uint8)
        if "latents" in batch:
            out["latents"] = np.stack([latents_from_bytes(batch["latents"][i]) for i in keep]) if keep else None
        return out


def decode_rows(batch: dict, num_frames=None, width=None, height=None) -> tuple[dict, list]:
    """(decoded batch, skipped [(key, reason)]) for one batch of shard rows."""
    decode = Decode(num_frames, width, height)
    return decode(batch), decode.skipped


def iter_batches(uri: str, batch_size: int = 16, columns=None, skipped: list | None = None, **decode):
    """Plain single-process streaming of decoded batches; skipped rows are appended to `skipped`."""
    import pyarrow.parquet as pq

    fs, _ = storage.arrow_filesystem(uri)
    decoder = Decode(**decode, skipped=skipped if skipped is not None else [])
    for shard in shard_uris(uri):
        _, path = storage.arrow_filesystem(shard)
        with fs.open_input_file(path) as f:
            for record_batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns or COLUMNS):
                batch = decoder(record_batch.to_pydict())
                if len(batch["key"]):
                    yield batch


# --- Ray Data ------------------------------------------------------------------------------------

def _counter_name(uri: str) -> str:
    return f"t2v-skipped:{uri}"


_COUNTERS: dict = {}  # the driver holds each counter's handle: a named actor lives while a handle does


def _skip_counter(uri: str):
    import ray

    if uri in _COUNTERS:
        return _COUNTERS[uri]

    @ray.remote(num_cpus=0)
    class SkipCounter:
        def __init__(self):
            self.rows: list = []

        def add(self, rows):
            self.rows += rows

        def get(self):
            return self.rows

    _COUNTERS[uri] = SkipCounter.options(name=_counter_name(uri), get_if_exists=True).remote()
    return _COUNTERS[uri]


def _decode_in_ray(batch: dict, uri: str, **decode) -> dict:
    """Decode in a Ray Data task, reporting skipped rows to the dataset's counter actor."""
    import ray

    out, skipped_rows = decode_rows(batch, **decode)
    if skipped_rows:
        ray.get(ray.get_actor(_counter_name(uri)).add.remote(skipped_rows))
    return out


def dataset(uri: str, num_frames: int | None = None, width: int | None = None, height: int | None = None,
            columns: list[str] | None = None, batch_size: int = 16, decode_cpus: float = 1.0):
    """A Ray Data dataset streaming a shard folder (local or s3://) as decoded rows:
    video uint8 [T, H, W, 3], caption, key, scene (and latents when asked for)."""
    import ray

    uris = shard_uris(uri)  # a missing shard fails here, naming it
    fs, _ = storage.arrow_filesystem(uri)
    paths = [storage.arrow_filesystem(u)[1] for u in uris]
    counter = _skip_counter(uri)
    ray.get(counter.get.remote())  # exists before any task reports to it
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns or COLUMNS,
                               num_cpus=decode_cpus)  # not a whole CPU each, the default
    return ds.map_batches(_decode_in_ray, fn_kwargs=dict(uri=uri, num_frames=num_frames, width=width, height=height),
                          batch_size=batch_size, batch_format="numpy", num_cpus=decode_cpus)


def skipped(uri: str) -> list[tuple[str, str]]:
    """Rows of a dataset URI skipped so far by Ray Data decoding: [(key, reason)]."""
    import ray

    try:
        return [tuple(r) for r in ray.get(ray.get_actor(_counter_name(uri)).get.remote())]
    except ValueError:
        return []
