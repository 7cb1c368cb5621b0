"""Training: one plain PyTorch loop (`loop.train`), a config dataclass, and a Ray Train shell (`ray.py`)."""

from .config import TrainConfig
from .loop import EMA, FolderCheckpoints, shard_batches, train

__all__ = ["EMA", "FolderCheckpoints", "TrainConfig", "shard_batches", "train"]
