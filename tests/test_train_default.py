"""jobs/train_default.py: the one command that trains the embedded model, killed and run again, continues."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# The recipe's own configs at toy size: 32x32 clips of 9 frames, a few steps of each stage.
TINY = [
    "--clips", "64", "--gate-n", "2", "--eval-n", "2", "--steps", "2",
    "--vae", "steps=20", "checkpoint_every=2", "log_every=2", "size=32", "num_frames=9",
    "bundle_config={num_frames: 9, height: 32, width: 32, fps: 8, num_inference_steps: 2, max_sequence_length: 48, "
    "max_frames: 17, min_size: 32, max_size: 64}",
    "--denoiser", "steps=20", "checkpoint_every=2", "log_every=2", "batch_size=2", "size=32", "num_frames=9",
    "overrides={unet: {block_out_channels: [16, 32], down_block_types: [CrossAttnDownBlock3D, DownBlock3D], "
    "up_block_types: [UpBlock3D, CrossAttnUpBlock3D], norm_num_groups: 4}, vae: {latent_channels: 8}}",
    "--stills", "steps=4", "checkpoint_every=2", "log_every=2", "batch_size=2", "image_batch=4", "size=32",
    "num_frames=9",
]


def start(out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "jobs/train_default.py", "--out", str(out), *TINY], cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(proc: subprocess.Popen, folder: Path, log: Path, timeout: float = 240) -> int:
    """SIGKILL the run (no clean-up, as a lost machine) once `folder` holds a checkpoint; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = sorted(int(p.name[5:11]) for p in folder.glob("step-*.pt")) if folder.exists() else []
        if steps:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return steps[-1]
        assert proc.poll() is None, f"the run ended before its first checkpoint:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint in {folder} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
def test_the_recipe_killed_in_each_training_stage_continues_from_its_last_checkpoint(tmp_path):
    from t2v.bundle import load

    out = tmp_path / "run"
    logs = [tmp_path / f"run{i}.log" for i in range(3)]

    # Killed in the VAE stage, then in the denoiser stage, then run to the end: the same command each time.
    vae_step = kill_when(start(out, logs[0]), out / "checkpoints-vae", logs[0])
    denoiser_step = kill_when(start(out, logs[1]), out / "checkpoints-denoiser-vae20", logs[1])
    # A run in progress is scored from its latest checkpoint without training.
    now = subprocess.run([sys.executable, "jobs/train_default.py", "--out", str(out), *TINY, "--eval-now"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert now.returncode == 0, now.stderr[-3000:]
    scored = re.search(r"denoiser step (\d+) \(EMA weights\)", now.stdout)
    assert scored and int(scored[1]) >= denoiser_step and "prompt adherence" in now.stdout, now.stdout
    final = start(out, logs[2])
    try:
        assert final.wait(timeout=300) == 0, logs[2].read_text()[-3000:]
    finally:
        if final.poll() is None:
            os.killpg(final.pid, signal.SIGKILL)

    second, third = logs[1].read_text(), logs[2].read_text()
    # The second run went on from the VAE checkpoint the kill left, and trained the VAE to its step count.
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in second.splitlines()
               if "resumed from step" in line]
    assert resumed and resumed[0] >= vae_step, second[-3000:]
    assert vae_step < 20 and "vae: step 20/20" in second
    # The third run trained no VAE step and no denoiser step before the checkpoint it found again.
    assert "vae: step" not in third
    resumed = [int(line.split("resumed from step ")[1].split()[0]) for line in third.splitlines()
               if "resumed from step" in line]
    assert resumed and resumed[0] >= denoiser_step, third[-3000:]
    assert denoiser_step < 20 and "denoiser: step 20/20" in third
    for line in third.splitlines():  # every step logged after the resume is past the checkpoint
        if "denoiser: step" in line:
            assert int(line.split("denoiser: step ")[1].split("/")[0]) > resumed[0]
    # The stills fine-tune ran after the denoiser, to its step count, its checkpoints kept per denoiser step.
    assert "stills: step 4/4" in third
    assert (out / "checkpoints-stills-vae20-denoiser20" / "step-000004.pt").exists()
    # Each stage left what it makes: the VAE's gate scores, the latents, a model that loads, its stills fine-tune,
    # the same weights with the shipped sampling, its held-out scores.
    assert "prompt adherence" in (out / "vae-gate-step20.txt").read_text()
    assert (out / "latents-vae20-clips64.pt").exists()
    bundle = load(out / "model")
    assert bundle.family.name == "unet3d" and bundle.config.height == 32
    assert list(bundle.denoiser.config.block_out_channels) == [16, 32]
    stills = load(out / "model-stills")
    assert any(not torch.equal(weight, stills.denoiser.state_dict()[name])
               for name, weight in bundle.denoiser.state_dict().items())
    shipped = load(out / "shipped")
    assert type(shipped.scheduler).__name__ == "UniPCMultistepScheduler"
    assert shipped.scheduler.config.timestep_spacing == "trailing" and shipped.config.num_inference_steps == 2
    assert shipped.scheduler.config.beta_schedule == bundle.scheduler.config.beta_schedule  # the training schedule
    shipped_weights = shipped.denoiser.state_dict()
    for name, weight in stills.denoiser.state_dict().items():
        assert torch.equal(weight, shipped_weights[name]), name
    text = (out / "eval-vae20-step20-stills4-unipc-trailing-2.txt").read_text()
    assert "prompt adherence, heldout split, 2 prompts" in text
    assert "ETA" in second and "recipe ETA" in third
