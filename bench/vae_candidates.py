"""VAE designs side by side, one run: each candidate fine-tunes the embedded model's VAE for the same wall-clock
budget on the same rendered clips (at the model's size, with the objects' masks), then its reconstructions of
held-out clips are scored by the analyzer (`t2v eval --stage vae`). Prints adherence per attribute, the error
inside vs outside the objects, and the adherence gained per training minute.

    python bench/vae_candidates.py [--minutes 6] [--n 100] [--clips 2000] [--only NAME ...]

Candidates, each a loss for the shape attribute (small stars, hearts and triangles decoded with rounded corners):
the shipped VAE as it is; the recipe's object-weighted loss continued; object weights balanced by the objects'
area (`object_area_ref`: a small object counts as much as a large one); an edge term (`edge_weight`: L1 of pixel
differences, which rounded corners cost). "decoder" candidates keep the encoder, so the latents and the denoiser
trained on them stay valid; "all" candidates change the latents (the denoiser must be trained on them again).

    python bench/vae_candidates.py --designs [--minutes 8] [--n 100] [--only NAME ...]

Designs (`--designs`): per-frame `AutoencoderKL`s trained from scratch, each for the same minutes on clips of
its own resolution (the same pixels per step), scored on held-out clips rendered at that resolution: which
compression, latent width and frame size learn the world fastest on this CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np

ATTRIBUTES = ("background", "color", "shape", "count", "size", "motion", "persistence")

CANDIDATES = {
    "shipped": None,
    "all, objects x5": dict(vae_trainable="all", object_weight=5.0),
    "all, area-balanced": dict(vae_trainable="all", object_weight=5.0, object_area_ref=0.05),
    "all, + edges": dict(vae_trainable="all", object_weight=5.0, edge_weight=1.0),
    "decoder, + edges": dict(vae_trainable="decoder", object_weight=5.0, edge_weight=1.0),
    "decoder, balanced + edges": dict(vae_trainable="decoder", object_weight=5.0, object_area_ref=0.05,
                                      edge_weight=1.0),
}


# name -> (frame size, clips per step, the per-frame AutoencoderKL). Clips per step keep the pixels of a step equal:
# 1 clip of 8 frames at 128x128, 4 clips of 8 frames at 64x64. (Small steps: in minutes of a CPU, more updates beat
# bigger batches; 2 clips at 128 made half the steps and learned less in the same 8 minutes.)
DESIGNS = {
    "f8 z16 @128": (128, 1, dict(block_out_channels=(32, 64, 128, 128), latent_channels=16)),
    "f8 z16 @64": (64, 4, dict(block_out_channels=(32, 64, 128, 128), latent_channels=16)),
    "f4 z8 @64": (64, 4, dict(block_out_channels=(32, 64, 128), latent_channels=8)),
    "f4 z8 @64 narrow": (64, 4, dict(block_out_channels=(16, 32, 64), latent_channels=8)),
}
DESIGN_FRAMES = 8  # frames per training clip (a per-frame VAE sees them as a batch of images)


def train_design(name: str, minutes: float, out: str, n: int, clips_rendered: int, seed: int = 11) -> tuple:
    """One design from scratch for `minutes`, then its reconstructions of n held-out clips scored."""
    import torch

    from t2v.bundle import load
    from t2v.data.rendered import RenderedWorld, RenderSpec
    from t2v.pipeline import TextToVideoPipeline
    from t2v.quality.evaluate import evaluate_vae
    from t2v.train import FolderCheckpoints, TrainConfig, train

    size, clips, vae = DESIGNS[name]
    folder = os.path.join(out, name.replace(" ", "-").replace("@", ""))
    groups = min(8, vae["block_out_channels"][0])
    cfg = TrainConfig(stage="vae", family="unet3d", preset="small",
                      overrides={"vae": dict(vae, norm_num_groups=groups)},
                      batch_size=clips, lr=1e-3, warmup_steps=20, ema_decay=0.95, crop=None,
                      crop_frames=DESIGN_FRAMES, kl_weight=1e-6, object_weight=5.0, object_crops=0.0,
                      num_frames=17, size=size, steps=100_000, time_budget_s=minutes * 60, checkpoint_every=100_000,
                      log_every=50, out=folder, checkpoint_dir=folder + "-ckpt",
                      bundle_config=dict(num_frames=17, height=size, width=size, fps=8, max_sequence_length=64,
                                         min_size=32, max_size=256))
    world = RenderedWorld(clips_rendered, RenderSpec(seed=seed, size=size, masks=True), workers=1).start()
    try:
        counted = []
        t0 = time.perf_counter()
        train(cfg, lambda start: world.batches(cfg.batch_size, seed=start, min_ready=64),
              FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda s, m: counted.append(s))
        spent = (time.perf_counter() - t0) / 60
    finally:
        world.close()
    bundle = load(folder)
    params = sum(p.numel() for p in bundle.vae.parameters())
    t0 = time.perf_counter()
    with torch.no_grad():
        bundle.family.decode(bundle, bundle.family.encode(bundle, torch.zeros(1, 3, 17, size, size)))
    decode_s = time.perf_counter() - t0
    torch.manual_seed(0)
    result, errors = evaluate_vae(TextToVideoPipeline(bundle), "heldout", n)
    inside, outside = errors.mean()
    return (name, len(counted), spent, {a: result.accuracy("one", a) for a in ATTRIBUTES},
            result.accuracy("two", "colors"), inside, outside, params, decode_s)


def designs_table(rows: list, args) -> str:
    lines = [f"VAE designs from scratch: {args.minutes:g} min each on this machine, {args.n} held-out clips each "
             f"at the design's own resolution (object-weighted L1+MSE x5, lr 1e-3, EMA 0.95)",
             f"{'design':<18}{'params':>7}{'steps':>6}{'min':>5}" + "".join(f"{a[:7]:>8}" for a in ATTRIBUTES)
             + f"{'colors2':>8}{'err in':>8}{'err out':>8}{'rt 17f':>7}"]
    for name, steps, minutes, acc, colors2, inside, outside, params, decode_s in rows:
        lines.append(f"{name:<18}{params / 1e6:>6.1f}M{steps:>6}{minutes:>5.1f}"
                     + "".join(f"{acc[a] * 100:>7.1f}%" for a in ATTRIBUTES)
                     + f"{colors2 * 100:>7.1f}%{inside.mean():>8.3f}{outside.mean():>8.3f}{decode_s:>6.2f}s")
    lines.append("err: mean |x - x'| (0..1) inside / outside the objects; rt 17f: encode + decode of one "
                 "17-frame clip, seconds")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per candidate")
    ap.add_argument("--n", type=int, default=100, help="held-out clips scored per candidate")
    ap.add_argument("--clips", type=int, default=2000, help="training clips rendered (with masks)")
    ap.add_argument("--only", nargs="*", default=None, help="candidate names to run")
    ap.add_argument("--out", default=None, help="keep the candidates' bundles here")
    ap.add_argument("--designs", action="store_true", help="per-frame designs from scratch (DESIGNS)")
    args = ap.parse_args()
    if args.designs:
        out = args.out or tempfile.mkdtemp(prefix="t2v-vae-designs-")
        rows = []
        for name in DESIGNS:
            if not args.only or name in args.only:
                rows.append(train_design(name, args.minutes, out, args.n, args.clips))
                print(designs_table(rows, args), flush=True)  # after each design, so a stopped run still reports
        return

    import torch

    from t2v.bundle import DEFAULT_MODEL, load
    from t2v.data.rendered import RenderedWorld, RenderSpec
    from t2v.quality.evaluate import evaluate_vae
    from t2v.pipeline import TextToVideoPipeline
    from t2v.train import FolderCheckpoints, TrainConfig, train

    out = args.out or tempfile.mkdtemp(prefix="t2v-vae-candidates-")
    shipped = load(DEFAULT_MODEL)
    size, frames = shipped.config.height, shipped.config.num_frames
    # 8-frame windows for a per-frame VAE (the recipe's), whole clips for a causal one (it decodes what it saw)
    window = 8 if shipped.family.temporal_factor(shipped) == 1 else frames
    base = TrainConfig(stage="vae", family=shipped.family.name, init=str(DEFAULT_MODEL), batch_size=4, lr=3e-4,
                       warmup_steps=20, ema_decay=0.98, crop=None, crop_frames=window, kl_weight=1e-6,
                       num_frames=frames, size=size, steps=100_000, time_budget_s=args.minutes * 60,
                       checkpoint_every=100_000, log_every=50)
    world = RenderedWorld(args.clips, RenderSpec(seed=11, num_frames=frames, size=size, masks=True), workers=1).start()
    rows = []
    try:
        for name, overrides in CANDIDATES.items():
            if args.only and name not in args.only:
                continue
            folder = os.path.join(out, name.replace(" ", "-").replace(",", ""))
            steps, minutes = 0, 0.0
            if overrides is None:
                bundle = shipped
            else:
                cfg = dataclasses.replace(base, **overrides, out=folder, checkpoint_dir=folder + "-ckpt")
                counted = []
                t0 = time.perf_counter()
                bundle = train(cfg, lambda start: world.batches(cfg.batch_size, seed=start, min_ready=64),
                               FolderCheckpoints(cfg.checkpoint_dir), on_step=lambda s, m: counted.append(s))
                minutes, steps = (time.perf_counter() - t0) / 60, len(counted)
                bundle = load(folder)
            torch.manual_seed(0)
            result, errors = evaluate_vae(TextToVideoPipeline(bundle), "heldout", args.n)
            inside, outside = errors.mean()
            rows.append((name, steps, minutes, {a: result.accuracy("one", a) for a in ATTRIBUTES},
                         result.accuracy("two", "colors"), inside, outside))
            print(table(rows, args), flush=True)  # after each candidate, so a stopped run still reports
    finally:
        world.close()


def table(rows: list, args) -> str:
    lines = [f"VAE candidates: {args.n} held-out clips each (one-object attributes; colours of two-object clips), "
             f"{args.minutes:g} min of training each from the shipped VAE on {args.clips} rendered clips",
             f"{'candidate':<28}{'steps':>6}{'min':>5}" + "".join(f"{a[:7]:>8}" for a in ATTRIBUTES)
             + f"{'colors2':>8}{'err in':>8}{'err out':>8}{'err f0':>8}{'gain/min':>9}"]
    shipped = None
    for name, steps, minutes, acc, colors2, inside, outside in rows:
        score = np.mean([acc["color"], acc["shape"], acc["persistence"]])
        shipped = score if name == "shipped" else shipped
        gain = (score - shipped) / minutes * 100 if shipped is not None and minutes else float("nan")
        lines.append(f"{name:<28}{steps:>6}{minutes:>5.1f}" + "".join(f"{acc[a] * 100:>7.1f}%" for a in ATTRIBUTES)
                     + f"{colors2 * 100:>7.1f}%{inside.mean():>8.3f}{outside.mean():>8.3f}{inside[0]:>8.3f}"
                     f"{gain:>8.1f}p")
    lines.append("gain/min: points of mean(colour, shape, persistence) gained over the shipped VAE per training "
                 "minute; err: mean |x - x'| (0..1) inside / outside the objects, and inside on frame 0")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
