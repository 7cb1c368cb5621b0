"""Long videos by co-denoised windows: wall time and peak memory against clip length, and continuity.

    python bench/long_video.py [--model PATH] [--steps 25] [--windows 1 2 4 8] [--serve-seconds 6]

Each length runs in a fresh process (peak RSS = the process's high-water mark). Wall time should grow about
linearly with the number of windows (each window is one native-clip forward per step); peak memory should stay
flat, since only the small latent video grows with length. The seam ratio (frame change across window
hand-overs / within windows) is printed beside the naive baseline of concatenated independent clips.
Then one long job goes through `serve run serve_configs/t2v.yaml` with 1 and with 2 Denoiser replicas (each
step's windows fan out to the replicas): the wall-time ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
import t2v
from t2v.long_video import LongVideoPipeline, concatenated_clips, seam_ratio
model, steps, frames = json.loads(sys.argv[1])
pipe = t2v.TextToVideoPipeline.from_pretrained(model)
prompt = "a big red ball moving to the right on a gray background"
t0 = time.perf_counter()
out = LongVideoPipeline(pipe)(prompt, num_frames=frames, num_inference_steps=steps, seed=0)
wall = time.perf_counter() - t0
co = seam_ratio(out.frames[0], out.boundaries) if out.boundaries else None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
naive = None
if len(out.windows) > 1:
    clips, joins = concatenated_clips(pipe, prompt, frames, seed=0, num_inference_steps=steps)
    naive = seam_ratio(clips, joins)
print(json.dumps({"frames": frames, "windows": len(out.windows), "wall_s": wall, "denoise_s": out.timings["denoise_s"],
                  "peak_rss_mb": peak, "seam": co, "naive_seam": naive}))
"""


def serve_wall(model, steps: int, seconds: float, replicas: int) -> float:
    import tempfile
    import time

    import openai

    from t2v.serve.process import serve_shipped_config

    with tempfile.TemporaryDirectory() as tmp, serve_shipped_config(tmp, model, denoiser_replicas=replicas) as serve:
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        body = {"num_inference_steps": steps}
        c.videos.create_and_poll(prompt="a red ball", seconds="2", extra_body={**body, "seed": 1},
                                 poll_interval_ms=50)  # warm-up
        t0 = time.perf_counter()
        v = c.videos.create_and_poll(prompt="a big red ball moving to the right on a gray background",
                                     seconds=str(seconds), extra_body={**body, "seed": 2}, poll_interval_ms=50)
        assert v.status == "completed", v.error
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--windows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--serve-seconds", type=float, default=6.0, help="0: skip the Serve graph part")
    args = ap.parse_args()
    rows = []
    for n in args.windows:
        frames = 17 + (n - 1) * 8  # the default model: runs of 4 latent frames, stride 2 -> 8 frames a window
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([args.model, args.steps, frames])],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'frames':>6} {'windows':>7} {'wall s':>7} {'x 1 win':>8} {'denoise s':>9} {'peak MB':>8} "
          f"{'seam':>6} {'naive':>6}")
    for r in rows:
        seam = f"{r['seam']:.2f}" if r["seam"] is not None else "-"
        naive = f"{r['naive_seam']:.2f}" if r["naive_seam"] is not None else "-"
        print(f"{r['frames']:>6} {r['windows']:>7} {r['wall_s']:>7.1f} {r['wall_s'] / base['wall_s']:>8.2f} "
              f"{r['denoise_s']:>9.1f} {r['peak_rss_mb']:>8.0f} {seam:>6} {naive:>6}")
    if args.serve_seconds:
        one, two = (serve_wall(args.model, args.steps, args.serve_seconds, n) for n in (1, 2))
        print(f"Serve graph, one {args.serve_seconds:g} s job: 1 Denoiser replica {one:.1f} s, 2 replicas {two:.1f} s; "
              f"ratio {two / one:.2f}")


if __name__ == "__main__":
    main()

