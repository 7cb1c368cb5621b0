"""Precompute VAE latents into the shards' `latents` column: the denoiser then trains without running the
VAE encoder every step (on a CPU the encoder costs more than a small denoiser's training step)."""

from __future__ import annotations

import pyarrow.parquet as pq
import torch

from .. import storage
from .shards import latents_to_bytes, map_shards, read_manifest, shard_uris, write_manifest, write_shard


def encode_shard(src: str, dst: str, bundle_uri: str, batch_size: int = 4) -> int:
    from ..bundle import load
    from .stream import decode_rows, video_tensor

    bundle = load(bundle_uri, device="cpu")
    fs, path = storage.arrow_filesystem(src)
    with fs.open_input_file(path) as f:
        rows = pq.read_table(f).to_pylist()
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        batch, skipped = decode_rows({"key": [r["key"] for r in chunk], "video": [r["video"] for r in chunk]})
        bad = {k for k, _ in skipped}
        with torch.no_grad():
            z = bundle.family.encode(bundle, video_tensor(batch, "cpu")).numpy() if len(batch["key"]) else []
        good = [r for r in chunk if r["key"] not in bad]
        out += [{**r, "latents": latents_to_bytes(lat)} for r, lat in zip(good, z)]
    return write_shard(dst, out)


def add_latents(src_uri: str, bundle_uri: str, out_uri: str, parallel: bool = True) -> dict:
    """Write a copy of a shard folder with the `latents` column filled by the bundle's VAE (normalized latents,
    float16). One Ray task per shard when `parallel`."""
    names = [u.rsplit("/", 1)[-1] for u in shard_uris(src_uri)]
    jobs = [(storage.join(src_uri, n), storage.join(out_uri, n), bundle_uri) for n in names]
    counts = map_shards(encode_shard, jobs, parallel)
    meta = {k: v for k, v in read_manifest(src_uri).items() if k != "shards"}
    write_manifest(out_uri, dict(zip(names, counts)), {**meta, "latents_model": bundle_uri})
    return dict(zip(names, counts))
