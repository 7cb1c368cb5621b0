"""Ray Train shell: TorchTrainer runs `loop.train` on N workers, data from the Ray Data dataset, checkpoints to
RunConfig(storage_path) on disk or s3://, restarts from the latest checkpoint after a failure."""

from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from pathlib import Path

import torch

from .config import TrainConfig
from .loop import data_columns, train

STATE_FILE = "state.pt"


class RayCheckpoints:
    """The loop's CheckpointStore on Ray Train: every worker reports; rank 0 attaches the checkpoint."""

    def __init__(self, rank: int):
        self.rank = rank

    def latest(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)

    def save(self, state: dict, step: int, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                torch.save(state, Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=checkpoint)

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)


def metrics_log(path: str):
    """A Ray Train callback appending every report (rank 0's metrics, and whether it carried a checkpoint) to a
    JSON-lines file on the driver's machine: the run's history, across worker restarts."""
    import json

    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            with open(path, "a") as f:
                f.write(json.dumps({**metrics[0], "checkpoint": checkpoint is not None}) + "\n")

    return MetricsLog()


def _allreduce_grads(module: torch.nn.Module) -> None:
    """Average gradients across workers (what DDP does, but for any call pattern, e.g. vae.encode/decode)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    shard = ray.train.get_dataset_shard("train")

    def make_batches(start: int):
        """Endless epochs of this worker's shard, skipping the `start` samples it has already trained on."""
        def batches():
            for _ in itertools.count():
                yield from shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True)

        it, skipped = batches(), 0
        while skipped < start:
            skipped += len(next(it)["caption"])
        return it

    train(cfg, make_batches, RayCheckpoints(rank), rank=rank, world_size=world,
          sync_grads=_allreduce_grads if world > 1 else None)


def fit(cfg: TrainConfig, storage_path: str, name: str = "t2v-train", callbacks: list | None = None):
    """Run the loop on Ray Train; rerunning with the same storage_path and name resumes from its latest checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .. import storage
    from ..data.stream import dataset

    ds = dataset(cfg.data, num_frames=cfg.num_frames, width=cfg.size, height=cfg.size,
                 columns=data_columns(cfg), decode_cpus=cfg.data_cpus)
    fs, path = storage.arrow_filesystem(storage_path)
    if not storage.is_s3(storage_path):
        os.makedirs(path, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, placement_strategy=cfg.placement_strategy,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **cfg.worker_resources}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks or [],
        ),
        datasets={"train": ds},
    )
    return trainer.fit()
