"""Periodic sample videos and adherence eval during training, from the EMA weights (rank 0 only).

Denoiser stage: videos of held-out prompts (t2v.quality.evaluate), scored by the world analyzer.
VAE stage: reconstructions of held-out clips beside the originals, with their mean absolute error.
Files go to <out>/samples/step-NNNNNN/ (a local path or s3://: on a cluster, the rank-0 node's disk is nobody's to
read); the metrics reach the log or Ray Train's report.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from .. import storage


@torch.no_grad()
def sample_and_eval(bundle, trained: torch.nn.Module, ema, cfg, step: int, write: bool, score: bool) -> dict:
    from ..quality.evaluate import eval_prompts, evaluate

    backup = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    ema.copy_to(trained)
    trained.eval()
    metrics: dict = {}
    try:
        if cfg.stage == "denoiser":
            from ..pipeline import TextToVideoPipeline

            result = evaluate(TextToVideoPipeline(bundle), "heldout", cfg.sample_prompts, cfg.sample_steps,
                              sheet_rows=cfg.sample_prompts)
            rows = result.rows
            if score:
                for (kind, attribute) in sorted(result.hits):
                    metrics[f"adherence/{kind}/{attribute}"] = result.accuracy(kind, attribute)
        else:
            from ..world import render

            rows, errors = [], []
            for prompt, scene in eval_prompts("heldout", cfg.sample_prompts, num_frames=cfg.num_frames,
                                              width=cfg.size, height=cfg.size):
                video = render(scene)
                x = torch.as_tensor(video, device=bundle.device).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
                recon = bundle.family.decode(bundle, bundle.family.encode(bundle, x))  # trained is bundle.vae
                frames = ((recon[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()
                errors.append(float(np.abs(frames.astype(np.float32) - video).mean() / 255))
                rows.append((prompt, np.concatenate([video, frames], axis=2)))  # original | reconstruction
            if score:
                metrics["recon_l1"] = float(np.mean(errors))
        if write:
            write_samples(rows, storage.join(cfg.out, "samples", f"step-{step:06d}"), bundle.config.fps)
    finally:
        trained.load_state_dict(backup)
        trained.train()
    return metrics


def write_samples(rows: list, uri: str, fps: int) -> None:
    """`rows` [(prompt, frames)] as NN.mp4, prompts.txt and sheet.png under `uri` (a folder or s3:// prefix)."""
    from ..quality.evaluate import contact_sheet
    from ..video import write_video

    with tempfile.TemporaryDirectory(prefix="t2v-samples-") as tmp:
        for i, (_, frames) in enumerate(rows):
            write_video(os.path.join(tmp, f"{i:02d}.mp4"), frames, fps)
        with open(os.path.join(tmp, "prompts.txt"), "w") as f:
            f.writelines(f"{i:02d}.mp4\t{p}\n" for i, (p, _) in enumerate(rows))
        contact_sheet(rows, os.path.join(tmp, "sheet.png"))
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(uri, name), f.read())
