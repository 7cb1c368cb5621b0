"""Data path throughput, measured in one run:
- clips/s rendered by the world renderer (and rendered + H.264-encoded, what `t2v data world` does per clip);
- clips/s decoded from the same parquet shards through Ray Data vs a plain single-process loop (the ratio).

    python bench/data.py [--clips 400] [--shards 8] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=400)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    args = ap.parse_args()

    from t2v.data.shards import WorldSpec, write_world
    from t2v.video import encode_video
    from t2v.world import random_scene, render

    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(100)]
    t0 = time.perf_counter()
    clips = [render(s) for s in scenes]
    render_rate = len(scenes) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for c in clips:
        encode_video(c, 8, ".mp4")
    encode_rate = len(scenes) / (time.perf_counter() - t0)

    import ray

    folder = tempfile.mkdtemp(prefix="t2v-bench-data-")
    t0 = time.perf_counter()
    write_world(folder, WorldSpec(clips=args.clips, shards=args.shards), parallel=False)
    write_rate = args.clips / (time.perf_counter() - t0)

    from t2v.data.stream import dataset, iter_batches

    t0 = time.perf_counter()
    n_plain = sum(len(b["key"]) for b in iter_batches(folder, batch_size=16))
    plain_rate = n_plain / (time.perf_counter() - t0)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    write_world(tempfile.mkdtemp(prefix="t2v-bench-data-"), WorldSpec(clips=args.clips, shards=args.shards))
    ray_write_rate = args.clips / (time.perf_counter() - t0)
    rates = []
    for _ in range(2):  # the first pass pays for starting Ray Data's workers; the second is steady state
        t0 = time.perf_counter()
        n_ray = sum(len(b["key"]) for b in dataset(folder, batch_size=16).iter_batches(batch_size=16,
                                                                                         batch_format="numpy"))
        rates.append(n_ray / (time.perf_counter() - t0))
    ray.shutdown()

    print(f"world clips 17x128x128, {args.clips} clips in {args.shards} shards, {args.cpus} CPUs")
    rows = [
        ("rendered", render_rate, ""),
        ("encoded to H.264 (after rendering)", encode_rate, ""),
        ("render + encode + write, 1 process", write_rate, ""),
        ("render + encode + write, Ray tasks", ray_write_rate, f"{ray_write_rate / write_rate:.2f}x of 1 process"),
        ("decoded, plain single-process loop", plain_rate, ""),
        ("decoded, Ray Data, first pass", rates[0], f"{rates[0] / plain_rate:.2f}x of plain"),
        ("decoded, Ray Data, second pass", rates[1], f"{rates[1] / plain_rate:.2f}x of plain"),
    ]
    for name, rate, note in rows:
        print(f"{name:<40}{rate:8.1f} clips/s  {note}")


if __name__ == "__main__":
    main()
