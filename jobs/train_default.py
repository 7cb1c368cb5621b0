"""Train the embedded default model (t2v/models/default) on one machine, both stages, with t2v.train's loop.

    python jobs/train_default.py --out out/default-run [--clips 24000] [--vae-seconds 190] [--denoiser-seconds 200]
    python jobs/train_default.py --out out/more --continue-from t2v/models/default --denoiser-seconds 400

1. A process pool renders `--clips` training-split clips of the synthetic world in the background
   (t2v.data.rendered), while
2. stage 1 trains the causal Wan VAE (jobs/configs/default-vae.yaml) on the clips rendered so far;
3. every rendered clip is encoded once to normalized VAE latents (kept on the training device);
4. stage 2 trains the DiT (jobs/configs/default-denoiser.yaml) on those latents with freshly phrased captions;
5. the bundle is saved with an fp16 denoiser to <out>/model (copy it to t2v/models/default).

Each stage runs within its wall-clock budget (TrainConfig.time_budget_s), so the whole job fits a fixed
amount of machine time. `--vae key=value` / `--denoiser key=value` override either YAML config.
"""

from __future__ import annotations

import argparse
import logging
import random
import time

import numpy as np
import torch

from t2v.bundle import load, to_precision
from t2v.data.rendered import RenderedWorld, RenderSpec
from t2v.data.stream import video_tensor
from t2v.train.config import TrainConfig
from t2v.train.loop import FolderCheckpoints, train
from t2v.world import caption

log = logging.getLogger("t2v.train_default")


@torch.no_grad()
def encode_world(bundle, world: RenderedWorld, batch: int, budget_s: float) -> tuple[torch.Tensor, list]:
    """Normalized latents [N, C, F, h, w] (fp32, on the VAE's device) and scenes of the rendered clips; stops
    early when `budget_s` is spent."""
    items, latents, scenes, t0 = world.items(), [], [], time.perf_counter()
    for i in range(0, len(items), batch):
        clips = [world.clip(it) for it in items[i:i + batch]]
        video = video_tensor({"video": np.stack([v for v, _ in clips])}, bundle.device)
        latents.append(bundle.family.encode(bundle, video).float())
        scenes += [s for _, s in clips]
        if time.perf_counter() - t0 > budget_s:
            log.info("encode budget spent after %d of %d clips", len(scenes), len(items))
            break
    return torch.cat(latents), scenes


def latent_batches(latents: torch.Tensor, scenes: list, batch_size: int, seed: int):
    rng = random.Random(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    while True:
        idx = torch.randint(len(scenes), (batch_size,), generator=gen)
        yield {"latents": latents[idx.to(latents.device)],
               "caption": np.array([caption(scenes[i], rng) for i in idx.tolist()])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clips", type=int, default=24000)
    ap.add_argument("--workers", type=int, default=None, help="render processes (default: CPUs - 2)")
    ap.add_argument("--vae-seconds", type=float, default=200)
    ap.add_argument("--encode-seconds", type=float, default=45)
    ap.add_argument("--denoiser-seconds", type=float, default=215)
    ap.add_argument("--vae", nargs="*", default=[], help="key=value overrides of default-vae.yaml")
    ap.add_argument("--denoiser", nargs="*", default=[], help="key=value overrides of default-denoiser.yaml")
    ap.add_argument("--continue-from", default=None, metavar="BUNDLE",
                    help="skip stage 1: BUNDLE's VAE encodes the clips and its DiT trains on (e.g. t2v/models/default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t_start = time.perf_counter()
    gpu = torch.cuda.is_available()
    common = [f"use_gpu={str(gpu).lower()}"]

    # 1. Render in the background (the pool forks before any CUDA call).
    vae_cfg = TrainConfig.from_yaml("jobs/configs/default-vae.yaml", [
        f"out={args.out}/vae", f"checkpoint_dir={args.out}/checkpoints-vae", f"time_budget_s={args.vae_seconds}",
        *common, *args.vae])
    spec = RenderSpec(num_frames=vae_cfg.num_frames, size=vae_cfg.size, fps=vae_cfg.bundle_config.get("fps", 8.0),
                      masks=bool(vae_cfg.object_weight or vae_cfg.object_crops))  # the objects' masks, for those losses
    world = RenderedWorld(args.clips, spec, workers=args.workers).start()
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # 2. Stage 1: the VAE, on whatever is rendered so far (unless continuing a trained bundle).
    init = args.continue_from or vae_cfg.out
    if not args.continue_from:
        train(vae_cfg, lambda start: world.batches(vae_cfg.batch_size, seed=start, min_ready=4 * vae_cfg.batch_size),
              FolderCheckpoints(vae_cfg.checkpoint_dir))
        log.info("stage 1 done at %.0f s; %d clips rendered", time.perf_counter() - t_start, world.ready)

    # 3. Latents of every rendered clip, once.
    world.wait(timeout=60)
    vae_bundle = load(init, device="cuda" if gpu else "cpu")
    t0 = time.perf_counter()
    latents, scenes = encode_world(vae_bundle, world, batch=64 if gpu else 8, budget_s=args.encode_seconds)
    log.info("encoded %d clips in %.1f s (rendering took %.1f s)", len(scenes), time.perf_counter() - t0,
             world.render_seconds)
    world.close()
    del vae_bundle

    # 4. Stage 2: the DiT on those latents.
    den_cfg = TrainConfig.from_yaml("jobs/configs/default-denoiser.yaml", [
        f"init={init}", f"out={args.out}/model-fp32", f"checkpoint_dir={args.out}/checkpoints-denoiser",
        f"time_budget_s={args.denoiser_seconds}", "use_latents=true", *common, *args.denoiser])
    bundle = train(den_cfg, lambda start: latent_batches(latents, scenes, den_cfg.batch_size, seed=start),
                   FolderCheckpoints(den_cfg.checkpoint_dir))

    # 5. The shipped bundle: fp16 denoiser (the VAE stays fp32), loaded back in fp32 by t2v.load.
    to_precision(bundle, "fp16", "cpu").save(f"{args.out}/model")
    log.info("saved %s/model after %.0f s in all", args.out, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
