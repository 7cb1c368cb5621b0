"""Per precision: the median wall time of one generation, the speed-up over fp32, and the MSE of the
frames against fp32 (same seed). Several runs each, median; one process, so the ratios compare like with like.

    python bench/quantize.py                      # the embedded model, or a `small` wan bundle if none yet
    python bench/quantize.py --model PATH --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

import t2v
from t2v.families import FAMILIES


def bundle_path(args) -> str:
    if args.model:
        return args.model
    if (t2v.DEFAULT_MODEL / "model_index.json").exists():
        return str(t2v.DEFAULT_MODEL)
    # No trained model yet: a randomly initialised bundle of the size the default model is built at.
    fam = FAMILIES[args.family]
    torch.manual_seed(0)
    bundle = t2v.from_components(fam, fam.build("small"), config=dict(
        num_frames=17, height=128, width=128, fps=8, num_inference_steps=args.steps, max_sequence_length=64))
    path = tempfile.mkdtemp(prefix="t2v-bench-")
    bundle.save(path)
    print(f"(no --model and no embedded model: random-initialised '{fam.name}' small preset, {path})")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--family", default="wan", choices=sorted(FAMILIES))
    ap.add_argument("--precisions", default="fp32,bf16,fp16,int8")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt", default="a red ball bouncing on a black background")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    path = bundle_path(args)
    results = {}
    for precision in args.precisions.split(","):
        pipe = t2v.TextToVideoPipeline.from_pretrained(path, precision=precision, device="cpu")
        pipe(args.prompt, seed=0, num_inference_steps=1)  # warm-up: first-call allocations, lazy inits
        times, denoise, frames = [], [], None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            out = pipe(args.prompt, seed=0, num_inference_steps=args.steps, output_type="pt")
            times.append(time.perf_counter() - t0)
            denoise.append(out.timings["denoise_s"])
            frames = out.frames
        results[precision] = (statistics.median(times), statistics.median(denoise), frames)
        print(f"  {precision}: runs {', '.join(f'{t:.2f}' for t in times)} s", flush=True)
    base_time, base_denoise, base_frames = results.get("fp32", next(iter(results.values())))
    cfg = pipe.bundle.config
    print(f"\n{cfg.num_frames} frames {cfg.width}x{cfg.height}, {args.steps} steps, median of {args.runs}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; the VAE decodes in fp32 at every precision")
    print(f"{'precision':<10}{'total s':>9}{'speed-up':>10}{'denoise s':>11}{'speed-up':>10}{'frame MSE vs fp32':>19}")
    for precision, (t, d, frames) in results.items():
        mse = torch.mean((frames - base_frames) ** 2).item()
        print(f"{precision:<10}{t:>9.2f}{base_time / t:>9.2f}x{d:>11.2f}{base_denoise / d:>9.2f}x{mse:>19.2e}")


if __name__ == "__main__":
    main()
