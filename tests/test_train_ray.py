"""Ray Train end to end on a real local Ray with 2 CPU workers: loss falls, checkpoints land in (local) S3,
and a killed worker process is replaced and the run resumes from its last checkpoint."""

from __future__ import annotations

import json
import signal
import threading
import time

import boto3
import psutil
import pytest

import t2v
from t2v.data.shards import WorldSpec, write_world
from t2v.train import TrainConfig
from t2v.train.ray import fit, metrics_log


def reports(path) -> list[dict]:
    try:
        return [json.loads(line) for line in open(path)]
    except FileNotFoundError:
        return []


def fit_in_background(cfg: TrainConfig, storage_path: str, log) -> tuple[threading.Thread, dict]:
    """`fit` in a thread (its result lands in the dict), every report appended to `log`."""
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(
        result=fit(cfg, storage_path, name="tiny", callbacks=[metrics_log(str(log))])))
    runner.start()
    return runner, outcome


def train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in (p.info["cmdline"] or []))]


@pytest.mark.slow
def test_two_workers_checkpoint_to_s3_and_survive_a_killed_worker(tmp_path, ray_local, s3_bucket):
    data = str(tmp_path / "world")
    write_world(data, WorldSpec(clips=48, shards=2, width=32, height=32, num_frames=9), parallel=False)
    cfg = TrainConfig(family="wan", preset="tiny", data=data, out=str(tmp_path / "model"), steps=60, batch_size=2,
                      lr=2e-3, warmup_steps=3, num_frames=9, size=32, checkpoint_every=10, log_every=2,
                      num_workers=2, cpus_per_worker=0.5, data_cpus=0.25, max_failures=2,
                      bundle_config=dict(num_frames=9, height=32, width=32, num_inference_steps=4,
                                         max_sequence_length=64))
    log = tmp_path / "reports.jsonl"
    runner, outcome = fit_in_background(cfg, f"s3://{s3_bucket}/runs", log)

    # Kill one worker process once a checkpoint exists and training has gone past it.
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and runner.is_alive():
        seen = reports(log)
        ckpts = [r["step"] for r in seen if r["checkpoint"]]
        if ckpts and seen[-1]["step"] > ckpts[-1]:
            workers = train_workers()
            assert len(workers) == 2
            workers[0].send_signal(signal.SIGKILL)
            killed_after = (ckpts[-1], seen[-1]["step"])
            break
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed_after, "the run ended before a worker could be killed"
    result = outcome["result"]
    assert result.error is None
    steps = [r["step"] for r in reports(log)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    last_checkpoint = killed_after[0]
    assert steps[restart] == last_checkpoint + cfg.log_every  # resumed right after the checkpoint
    assert steps[-1] == cfg.steps and result.metrics["step"] == cfg.steps
    # The data position was restored with the weights: every step counted once.
    assert result.metrics["samples_seen"] == cfg.steps * cfg.batch_size * cfg.num_workers
    losses = [r["loss_avg"] for r in reports(log)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket, Prefix="runs/tiny/")["Contents"]]
    assert any(k.endswith("/state.pt") for k in keys)
    assert t2v.load(cfg.out).family.name == "wan"


@pytest.mark.slow
def test_ray_train_trains_a_lora_adapter_on_two_workers(tmp_path, ray_local, wan_dir):
    """The same loop's LoRA path on Ray Train: the frozen base from `init`, the adapter's gradients averaged over
    the workers, a diffusers LoRA folder saved by rank 0."""
    import diffusers
    import torch

    from t2v import lora

    data = str(tmp_path / "world")
    write_world(data, WorldSpec(clips=16, shards=2, width=32, height=32, num_frames=9, background="desert"),
                parallel=False)
    cfg = TrainConfig(family="wan", init=str(wan_dir), data=data, out=str(tmp_path / "adapter"), steps=8,
                      batch_size=2, lr=5e-3, warmup_steps=2, num_frames=9, size=32, checkpoint_every=4, log_every=2,
                      num_workers=2, cpus_per_worker=0.5, data_cpus=0.25, lora_rank=4, lora_words=["desert"])
    result = fit(cfg, str(tmp_path / "runs"), name="lora")
    assert result.error is None and result.metrics["step"] == 8
    state = diffusers.WanPipeline.lora_state_dict(cfg.out)
    assert state and all(k.startswith("transformer.") for k in state)
    assert max(v.abs().max().item() for k, v in state.items() if "lora_B" in k) > 0  # trained (B starts at 0)
    pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
    base = pipe("a red ball in a sandy desert", seed=0, output_type="latent").frames
    pipe.load_lora_weights(cfg.out)
    assert not torch.equal(pipe("a red ball in a sandy desert", seed=0, output_type="latent").frames, base)
    assert lora.card(cfg.out)["words"] == ["desert"]
