"""Denoiser designs side by side, one run: each trains from scratch for the same minutes on the same latents (one
trained VAE's, of the same rendered clips), then generates held-out prompts that the analyzer scores (as `t2v
eval`). Prints adherence per attribute, steps trained, and what a generated video costs.

    python bench/denoiser_candidates.py --vae out/default-run/vae [--minutes 8] [--n 40] [--only NAME ...]

Designs are overrides of the VAE bundle's family preset (`unet3d`: UNet3DConditionModel); the latent channels
follow the VAE's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

ATTRIBUTES = ("background", "color", "shape", "count", "size", "motion", "persistence")

_ATTENTION_16 = dict(down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
                     up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"))
_ATTENTION_8 = dict(down_block_types=("DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"),
                    up_block_types=("CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"))
# name -> UNet3DConditionModel overrides (the `small` preset's other settings)
DESIGNS = {
    "unet 32-64-64, attention 16+8": dict(block_out_channels=(32, 64, 64), **_ATTENTION_16),
    "unet 48-96-96, attention 8+4": dict(block_out_channels=(48, 96, 96), norm_num_groups=16, **_ATTENTION_8),
}


def train_design(name: str, vae: str, latents, scenes, minutes: float, out: str, n: int) -> tuple:
    import torch

    from t2v.bundle import load
    from t2v.data.rendered import latent_batches
    from t2v.pipeline import TextToVideoPipeline
    from t2v.quality.evaluate import evaluate
    from t2v.train import FolderCheckpoints, TrainConfig, train

    folder = os.path.join(out, name.replace(" ", "-").replace(",", "").replace("+", "-"))
    z = latents.shape[1]
    cfg = TrainConfig(stage="denoiser", family="unet3d", preset="small", init=vae, use_latents=True,
                      overrides={"unet": DESIGNS[name], "vae": {"latent_channels": z}}, prediction="v_prediction",
                      batch_size=8, lr=5e-4, warmup_steps=50, ema_decay=0.99, text_dropout=0.1, steps=100_000,
                      time_budget_s=minutes * 60, checkpoint_every=100_000, log_every=50, out=folder,
                      checkpoint_dir=folder + "-ckpt",
                      bundle_config=dict(num_inference_steps=25, guidance_scale=7.5, max_sequence_length=48))
    counted = []
    t0 = time.perf_counter()
    train(cfg, lambda start: latent_batches(latents, scenes, cfg.batch_size, seed=start),
          FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda s, m: counted.append(s))
    spent = (time.perf_counter() - t0) / 60
    pipe = TextToVideoPipeline(load(folder))
    params = sum(p.numel() for p in pipe.bundle.denoiser.parameters())
    t0 = time.perf_counter()
    pipe("a red ball bouncing on a black background", seed=0)
    video_s = time.perf_counter() - t0
    torch.manual_seed(0)
    result = evaluate(pipe, "heldout", n)
    return (name, params, len(counted), spent, video_s, {a: result.accuracy("one", a) for a in ATTRIBUTES},
            result.accuracy("two", "colors"), result.accuracy("two", "relation"))


def table(rows: list, args) -> str:
    lines = [f"Denoiser designs from scratch: {args.minutes:g} min each on this machine on the latents of "
             f"{args.clips} clips, {args.n} held-out prompts each (default steps and guidance)",
             f"{'design':<32}{'params':>7}{'steps':>6}{'min':>5}{'video':>7}" + "".join(f"{a[:7]:>8}" for a in ATTRIBUTES)
             + f"{'colors2':>8}{'relatn':>8}"]
    pct = lambda v: f"{v * 100:>7.1f}%" if v is not None else f"{'—':>8}"  # noqa: E731
    for name, params, steps, minutes, video_s, acc, colors2, relation in rows:
        lines.append(f"{name:<32}{params / 1e6:>6.1f}M{steps:>6}{minutes:>5.1f}{video_s:>6.1f}s"
                     + "".join(pct(acc[a]) for a in ATTRIBUTES) + pct(colors2) + pct(relation))
    lines.append("video: one generated video in-process (25 guided steps + decode), seconds")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a trained VAE bundle (jobs/train_default.py's <out>/vae)")
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget per design")
    ap.add_argument("--n", type=int, default=40, help="held-out prompts scored per design")
    ap.add_argument("--clips", type=int, default=2000, help="training clips rendered and encoded")
    ap.add_argument("--only", nargs="*", default=None, help="design names to run")
    ap.add_argument("--out", default=None, help="keep the designs' bundles here")
    args = ap.parse_args()

    from t2v.bundle import load
    from t2v.data.rendered import RenderedWorld, RenderSpec, encode_rendered

    vae = load(args.vae)
    cfg = vae.config
    world = RenderedWorld(args.clips, RenderSpec(num_frames=cfg.num_frames, size=cfg.height), workers=1).start()
    try:
        world.wait()
        latents, scenes = encode_rendered(vae, world)
    finally:
        world.close()
    out = args.out or tempfile.mkdtemp(prefix="t2v-denoiser-designs-")
    rows = []
    for name in DESIGNS:
        if not args.only or name in args.only:
            rows.append(train_design(name, args.vae, latents, scenes, args.minutes, out, args.n))
            print(table(rows, args), flush=True)  # after each design, so a stopped run still reports


if __name__ == "__main__":
    main()
