"""python -m t2v.train --config jobs/configs/NAME.yaml [key=value ...]: the plain loop, no Ray."""

import argparse
import logging

from .config import TrainConfig
from .loop import FolderCheckpoints, data_columns, shard_batches, train

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("overrides", nargs="*", help="key=value (YAML values)")
args = ap.parse_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
cfg = TrainConfig.from_yaml(args.config, args.overrides)
train(cfg, lambda start: shard_batches(cfg.data, cfg.batch_size, start, columns=data_columns(cfg),
                                       num_frames=cfg.num_frames, width=cfg.size, height=cfg.size),
      FolderCheckpoints(cfg.checkpoint_dir))
print(f"saved {cfg.out}")
