"""Denoiser designs side by side, one run: each trains from scratch for the same minutes on the same latents (one
trained VAE's, of the same rendered clips), then generates held-out prompts that the analyzer scores (as `t2v
eval`). Prints adherence per attribute, steps trained, and what a generated video costs.

    python bench/denoiser_candidates.py --vae out/default-run/vae [--latents out/default-run/latents-*.pt]
        [--minutes 8] [--n 40] [--only NAME ...] [--zero-snr]

Designs are a family and overrides of its `small` preset, each a fresh denoiser on the VAE's latents: `unet3d`
(UNet3DConditionModel) or `latte` (LatteTransformer3DModel: spatial and temporal attention over 2x2 or 4x4
patches). The latent channels follow the VAE's. Every design is trained with the same schedule (DDPM
v-prediction; --zero-snr rescales it to zero terminal SNR) and generates with the shipped sampling (--sampler,
--spacing, --steps).
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


def _latte(patch: int, heads: int, layers: int) -> dict:
    return dict(patch_size=patch, num_attention_heads=heads, attention_head_dim=32, num_layers=layers,
                sample_size=16, video_length=17)


# name -> (family, its denoiser's overrides of the family's `small` preset)
DESIGNS = {
    "unet 32-64-64, attention 16+8": ("unet3d", dict(block_out_channels=(32, 64, 64), **_ATTENTION_16)),
    "unet 48-96-96, attention 8+4": ("unet3d", dict(block_out_channels=(48, 96, 96), norm_num_groups=16,
                                                    **_ATTENTION_8)),
    "latte 2x2, width 192, 4 layers": ("latte", _latte(2, 6, 4)),
    "latte 4x4, width 256, 6 layers": ("latte", _latte(4, 8, 6)),
}


def train_design(name: str, vae: str, encoded, out: str, args) -> tuple:
    import torch

    from t2v.bundle import load
    from t2v.data.rendered import latent_batches
    from t2v.families import FAMILIES
    from t2v.pipeline import TextToVideoPipeline
    from t2v.quality.evaluate import evaluate
    from t2v.sampling import with_sampler
    from t2v.train import FolderCheckpoints, TrainConfig, train

    folder = os.path.join(out, name.replace(" ", "-").replace(",", "").replace("+", "-"))
    family, design = DESIGNS[name]
    schedule = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if args.zero_snr else {}
    cfg = TrainConfig(stage="denoiser", family=family, preset="small", init=vae, use_latents=True,
                      overrides={FAMILIES[family].denoiser_key: design,
                                 "vae": {"latent_channels": encoded.latents.shape[1]},
                                 "scheduler": schedule},
                      prediction="v_prediction", batch_size=8, lr=5e-4, warmup_steps=50, ema_decay=0.99,
                      text_dropout=0.1, steps=100_000, time_budget_s=args.minutes * 60, checkpoint_every=100_000,
                      log_every=50, out=folder, checkpoint_dir=folder + "-ckpt",
                      bundle_config=dict(guidance_scale=7.5, max_sequence_length=48))
    counted = []
    t0 = time.perf_counter()
    train(cfg, lambda start: latent_batches(encoded, cfg.batch_size, seed=start),
          FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda s, m: counted.append(s))
    spent = (time.perf_counter() - t0) / 60
    pipe = TextToVideoPipeline(with_sampler(load(folder), args.sampler, args.spacing, args.steps))
    params = sum(p.numel() for p in pipe.bundle.denoiser.parameters())
    t0 = time.perf_counter()
    pipe("a red ball bouncing on a black background", seed=0)
    video_s = time.perf_counter() - t0
    torch.manual_seed(0)
    result = evaluate(pipe, "heldout", args.n)
    return (name, params, len(counted), spent, video_s, {a: result.accuracy("one", a) for a in ATTRIBUTES},
            result.accuracy("two", "colors"), result.accuracy("two", "relation"))


def table(rows: list, args) -> str:
    lines = [f"Denoiser designs from scratch: {args.minutes:g} min each on this machine on the latents of "
             f"{args.clips} clips, {'zero-terminal-SNR' if args.zero_snr else 'DDPM'} v-prediction; {args.n} "
             f"held-out prompts each, {args.sampler} {args.spacing} {args.steps} steps, guidance 7.5",
             f"{'design':<32}{'params':>7}{'steps':>6}{'min':>5}{'video':>7}" + "".join(f"{a[:7]:>8}" for a in ATTRIBUTES)
             + f"{'colors2':>8}{'relatn':>8}"]
    pct = lambda v: f"{v * 100:>7.1f}%" if v is not None else f"{'—':>8}"  # noqa: E731
    for name, params, steps, minutes, video_s, acc, colors2, relation in rows:
        lines.append(f"{name:<32}{params / 1e6:>6.1f}M{steps:>6}{minutes:>5.1f}{video_s:>6.1f}s"
                     + "".join(pct(acc[a]) for a in ATTRIBUTES) + pct(colors2) + pct(relation))
    lines.append("video: one generated video in-process (guided steps + decode), seconds")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="a trained VAE bundle (jobs/train_default.py's <out>/vae)")
    ap.add_argument("--minutes", type=float, default=8.0, help="training budget per design")
    ap.add_argument("--n", type=int, default=40, help="held-out prompts scored per design")
    ap.add_argument("--clips", type=int, default=2000, help="training clips rendered and encoded")
    ap.add_argument("--latents", default=None,
                    help="clips the VAE already encoded (jobs/train_default.py's <out>/latents-*.pt) instead")
    ap.add_argument("--zero-snr", action="store_true", help="train on the zero-terminal-SNR rescaled schedule")
    ap.add_argument("--sampler", default="unipc")
    ap.add_argument("--spacing", default="trailing")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--only", nargs="*", default=None, help="design names to run")
    ap.add_argument("--out", default=None, help="keep the designs' bundles here")
    args = ap.parse_args()

    from t2v.bundle import load
    from t2v.data.rendered import RenderedWorld, RenderSpec, encode_rendered, load_encoded

    if args.latents:
        encoded = load_encoded(args.latents)
        args.clips = len(encoded.scenes)
    else:
        vae = load(args.vae)
        cfg = vae.config
        world = RenderedWorld(args.clips, RenderSpec(num_frames=cfg.num_frames, size=cfg.height), workers=1).start()
        try:
            world.wait()
            encoded = encode_rendered(vae, world)
        finally:
            world.close()
    out = args.out or tempfile.mkdtemp(prefix="t2v-denoiser-designs-")
    rows = []
    for name in DESIGNS:
        if not args.only or name in args.only:
            rows.append(train_design(name, args.vae, encoded, out, args))
            print(table(rows, args), flush=True)  # after each design, so a stopped run still reports


if __name__ == "__main__":
    main()
