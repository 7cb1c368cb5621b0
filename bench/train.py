"""Training throughput, one run on the machine it runs on: samples/s of the plain loop vs Ray Train with N
workers on the same config (jobs/configs/tiny.yaml by default) and the same shards.

    python bench/train.py [--config jobs/configs/tiny.yaml] [--steps 60] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from t2v.data.shards import WorldSpec, write_world
    from t2v.train import FolderCheckpoints, TrainConfig, shard_batches, train
    from t2v.train.loop import data_columns

    with open(args.config) as f:
        base = TrainConfig.from_dict(yaml.safe_load(f))
    tmp = tempfile.mkdtemp(prefix="t2v-bench-train-")
    data = os.path.join(tmp, "world")
    write_world(data, WorldSpec(clips=128, shards=4, width=base.size, height=base.size, num_frames=base.num_frames),
                parallel=False)
    common = dict(data=data, steps=args.steps, checkpoint_every=args.steps)

    # Plain loop: one process, all cores to torch.
    plain_cfg = dataclasses.replace(base, **common, out=f"{tmp}/plain", checkpoint_dir=f"{tmp}/plain-ckpt",
                                    num_workers=1, log_every=10)
    marks = {}
    t0 = time.perf_counter()
    train(plain_cfg, lambda s: shard_batches(data, plain_cfg.batch_size, s, columns=data_columns(plain_cfg),
                                             num_frames=base.num_frames, width=base.size, height=base.size),
          FolderCheckpoints(plain_cfg.checkpoint_dir),
          on_step=lambda step, m: marks.setdefault(step, time.perf_counter()))
    plain_wall = time.perf_counter() - t0
    warm = 10  # steady state: from step 10 on
    plain_rate = (args.steps - warm) * plain_cfg.batch_size / (marks[args.steps] - marks[warm])

    import ray

    from t2v.train.ray import fit, metrics_log

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(include_dashboard=False, log_to_driver=os.environ.get("T2V_BENCH_VERBOSE") == "1")
    # Leave one whole CPU for Ray Data: its file-listing step asks for one. Each worker still gets a torch thread.
    cpus = max(0.25, (os.cpu_count() - 1) / args.workers)
    ray_cfg = dataclasses.replace(base, **common, out=f"{tmp}/ray", num_workers=args.workers, cpus_per_worker=cpus,
                                  data_cpus=0.25, log_every=10)
    log = f"{tmp}/metrics.jsonl"
    t0 = time.perf_counter()
    fit(ray_cfg, f"{tmp}/ray-ckpt", name="bench", callbacks=[metrics_log(log)])
    ray_wall = time.perf_counter() - t0
    ray.shutdown()
    rows = {r["step"]: r for r in map(json.loads, open(log))}
    # The loop reports its own clock (wall_s, from the loop's start on each worker): steady state from step 10.
    ray_rate = ((args.steps - warm) * ray_cfg.batch_size * args.workers
                / (rows[args.steps]["wall_s"] - rows[warm]["wall_s"]))

    print(f"config {args.config}: {base.family}/{base.preset}, {base.num_frames}x{base.size}x{base.size}, "
          f"batch {base.batch_size} per worker, {args.steps} steps, {os.cpu_count()} CPUs")
    print(f"{'plain loop, 1 process':<34}{plain_rate:8.1f} samples/s   wall {plain_wall:6.1f} s")
    print(f"{f'Ray Train, {args.workers} workers':<34}{ray_rate:8.1f} samples/s   wall {ray_wall:6.1f} s "
          f"(incl. start-up)")
    print(f"{'Ray Train / plain':<34}{ray_rate / plain_rate:8.2f}x")


if __name__ == "__main__":
    main()
