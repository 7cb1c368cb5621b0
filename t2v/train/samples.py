"""Periodic sample videos and adherence eval during training, from the EMA weights (rank 0 only).

Denoiser stage: videos of held-out prompts (t2v.quality.evaluate), scored by the world analyzer.
VAE stage: reconstructions of held-out clips beside the originals, with their mean absolute error.
Files go to <out>/samples/step-NNNNNN/ (local paths; the metrics reach the log or Ray Train's report).
"""

from __future__ import annotations

import os

import numpy as np
import torch


@torch.no_grad()
def sample_and_eval(bundle, trained: torch.nn.Module, ema, cfg, step: int, write: bool, score: bool) -> dict:
    from ..quality.evaluate import contact_sheet, eval_prompts, evaluate
    from ..video import write_video

    folder = os.path.join(cfg.out, "samples", f"step-{step:06d}")
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
            os.makedirs(folder, exist_ok=True)
            fps = bundle.config.fps
            for i, (_, frames) in enumerate(rows):
                write_video(os.path.join(folder, f"{i:02d}.mp4"), frames, fps)
            with open(os.path.join(folder, "prompts.txt"), "w") as f:
                f.writelines(f"{i:02d}.mp4\t{p}\n" for i, (p, _) in enumerate(rows))
            contact_sheet(rows, os.path.join(folder, "sheet.png"))
    finally:
        trained.load_state_dict(backup)
        trained.train()
    return metrics
