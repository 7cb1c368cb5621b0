"""Training job, for `ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/<name>.yaml`.

Runs t2v's training loop on Ray Train (TorchTrainer, num_workers/use_gpu from the config). Checkpoints go to
`checkpoint_dir` (local path or s3://); submitting the same config again resumes from its latest checkpoint.
"""

import argparse
import logging

import ray

from t2v.train.config import TrainConfig
from t2v.train.ray import fit, metrics_log


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", default=None, help="run name (default: the config file's name)")
    ap.add_argument("--metrics-log", default=None, help="append every report to this JSON-lines file")
    ap.add_argument("overrides", nargs="*", help="key=value (YAML values) on top of the config")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    name = args.name or args.config.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    ray.init(ignore_reinit_error=True)
    callbacks = [metrics_log(args.metrics_log)] if args.metrics_log else []
    result = fit(cfg, storage_path=cfg.checkpoint_dir, name=name, callbacks=callbacks)
    print(f"finished: {result.metrics}; model saved to {cfg.out}")


if __name__ == "__main__":
    main()
