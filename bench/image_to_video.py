"""Image-to-video on the embedded model (first-frame latent replacement): does the video start from the image, and
is the image's object still there at the end?

    python bench/image_to_video.py [--n 20] [--steps 25] [--sheet i2v.png]

For n rendered one-object scenes of t2v's world: the image is the scene's first frame and the prompt its
caption. Each is generated with the image and without it (same seed), and, as the ceiling the model's VAE sets,
the rendered clip itself is encoded and decoded. Reported:
- PSNR of frame 0 against the image;
- how often the analyzer finds the image's object -- its colour, its shape, and the background -- in the last
  frame (it reads the video backwards, so the last frame is the one whose objects it classifies).
"""

from __future__ import annotations

import argparse
import random
import statistics

import numpy as np
import torch


def psnr(a, b) -> float:
    mse = ((np.asarray(a, float) - np.asarray(b, float)) ** 2).mean()
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def last_frame_finds(frames: np.ndarray, obj, background: str) -> dict[str, bool]:
    from t2v.world.analyze import analyze

    seen = analyze(frames[::-1])
    return {"background": seen["background"] == background,
            "colour": any(o["color"] == obj.color for o in seen["objects"]),
            "shape": any(o["shape"] == obj.shape for o in seen["objects"]),
            "object": any(o["color"] == obj.color and o["shape"] == obj.shape for o in seen["objects"])}


def main() -> None:
    import t2v
    from t2v.world.captions import caption
    from t2v.world.render import render
    from t2v.world.splits import sample_scene

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sheet", default=None, help="contact sheet PNG: image, with image, without, per scene")
    args = ap.parse_args()

    pipe = t2v.TextToVideoPipeline.from_pretrained()
    cfg = pipe.bundle.config
    rng = random.Random(args.seed)
    rows = {k: [] for k in ("with image", "without image", "VAE round trip (ceiling)")}
    sheet = []
    for i in range(args.n):
        scene = sample_scene(rng, "train", num_objects=1)
        frames = render(scene)
        image, prompt, obj = frames[0], caption(scene, rng), scene.objects[0]
        call = dict(num_frames=cfg.num_frames, height=cfg.height, width=cfg.width, seed=args.seed + i,
                    num_inference_steps=args.steps)
        with_image = pipe(prompt, image=image, **call).frames[0]
        without = pipe(prompt, **call).frames[0]
        clip = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        ceiling = pipe.decode_latents(pipe.bundle.family.encode(pipe.bundle, clip.to(pipe.bundle.device)))[0]
        for name, video in zip(rows, (with_image, without, ceiling)):
            rows[name].append({"psnr0": psnr(video[0], image), **last_frame_finds(video, obj, scene.background)})
        sheet.append(np.concatenate([image, with_image[0], with_image[-1], without[0], without[-1]], axis=1))
        print(f"  {i:3d} {prompt[:60]:<60} frame 0: {rows['with image'][-1]['psnr0']:5.1f} dB with, "
              f"{rows['without image'][-1]['psnr0']:5.1f} without", flush=True)

    print(f"\n{args.n} scenes, {args.steps} steps, {cfg.width}x{cfg.height}x{cfg.num_frames}:")
    print(f"  {'':26} {'frame 0 PSNR':>13} | last frame: {'background':>10} {'colour':>7} {'shape':>6} "
          f"{'object':>7}")
    for name, results in rows.items():
        share = lambda k: 100 * statistics.mean(r[k] for r in results)  # noqa: E731
        print(f"  {name:<26} {statistics.mean(r['psnr0'] for r in results):10.1f} dB | {'':11} "
              f"{share('background'):9.0f}% {share('colour'):6.0f}% {share('shape'):5.0f}% {share('object'):6.0f}%")
    if args.sheet:
        from PIL import Image

        Image.fromarray(np.concatenate(sheet, axis=0)).save(args.sheet)
        print(f"wrote {args.sheet}: image | with: first, last | without: first, last")


if __name__ == "__main__":
    main()
