"""One video job through HTTP + the Ray Serve graph vs the in-process pipeline (same model, same steps), and
the throughput of 4 concurrent jobs vs 4 serial ones through the graph.

    python bench/serve.py [--model PATH] [--steps 25] [--runs 3]

Starts `serve run serve_configs/t2v.yaml` (as shipped, with a temporary job store and a free port). The job
time is what a client sees: create, poll every 20 ms until completed, download the mp4.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


PROMPT = "a red ball bouncing on a black background"


def in_process(model, steps: int, runs: int) -> float:
    import torch

    import t2v
    from t2v.video import encode_video

    torch.set_num_threads(2)
    pipe = t2v.TextToVideoPipeline.from_pretrained(model)
    pipe(PROMPT, num_inference_steps=steps, seed=0)  # warm-up, as the Serve replicas are warm
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        out = pipe(PROMPT, num_inference_steps=steps, seed=100 + i)
        encode_video(out.frames[0], out.params.fps, ".mp4")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    import openai

    from t2v.serve.process import serve_shipped_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    local = in_process(args.model, args.steps, args.runs)
    with tempfile.TemporaryDirectory() as tmp, serve_shipped_config(tmp, args.model) as serve:
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        seeds = iter(range(1000, 2000))  # a fresh seed per job: the result cache must not answer

        def job() -> str:
            return c.videos.create(prompt=PROMPT, extra_body={"seed": next(seeds),
                                                              "num_inference_steps": args.steps}).id

        def finish(video_id: str) -> None:
            v = c.videos.poll(video_id, poll_interval_ms=20)
            assert v.status == "completed", v.error
            c.videos.download_content(video_id).read()

        finish(job())  # warm-up
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            finish(job())
            times.append(time.perf_counter() - t0)
        served = statistics.median(times)

        t0 = time.perf_counter()
        for _ in range(4):
            finish(job())
        serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        for video_id in [job() for _ in range(4)]:
            finish(video_id)
        concurrent = time.perf_counter() - t0

    print(f"one job ({args.steps} steps, median of {args.runs}): in-process {local:.2f} s, "
          f"HTTP + Serve graph {served:.2f} s; ratio {served / local:.2f} (target <= 1.10)")
    print(f"4 jobs: serial {serial:.1f} s, concurrent {concurrent:.1f} s; throughput "
          f"{serial / concurrent:.2f}x of serial")


if __name__ == "__main__":
    main()
