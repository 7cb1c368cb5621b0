"""One video job through HTTP + the Ray Serve graph vs the in-process pipeline (same model, steps, device and
precision), and the throughput of 4 concurrent jobs vs 4 serial ones through the graph.

    python bench/serve.py [--model PATH] [--steps 25] [--runs 5]
    python bench/serve.py --config t2v-gpu.yaml --one-gpu      # the GPU layout on a machine with one GPU

Starts `serve run serve_configs/<config>` (as shipped, with a temporary job store and a free port). The job
time is what the official client sees: create, poll as the server advises (openai-poll-after-ms), download the
mp4. The in-process baseline runs the same stages in this process: pipeline, decode, mp4 encode. It is
measured before and after the graph runs (the median of both), so a drift in machine speed counts on both
sides. Quality scoring, which the graph does after the video is stored, is in neither figure.

A third figure separates what Ray's mere presence costs on a small machine from what the graph adds: the
in-process baseline again while the graph stands idle beside it. On 2 CPU cores the idle Ray processes
(controller, proxy, GCS, raylet, replicas' threads) slow a 2-thread torch loop by about 40% although they take
only 10-17% of one core: their wake-ups preempt torch's threads, which then wait at every parallel barrier.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


PROMPT = "a red ball bouncing on a black background"


def in_process(pipe, steps: int, runs: int, seed: int) -> list[float]:
    from t2v.video import encode_video

    pipe(PROMPT, num_inference_steps=steps, seed=0)  # warm-up, as the Serve replicas are warm
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        out = pipe(PROMPT, num_inference_steps=steps, seed=seed + i)
        encode_video(out.frames[0], out.params.fps, ".mp4")
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    import openai
    import torch

    import t2v
    from t2v.serve.process import serve_shipped_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--config", default="t2v.yaml", help="a file in serve_configs/")
    ap.add_argument("--precision", default=None, help="default: the config's")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--step-batching", choices=("config", "on", "off"), default="config")
    ap.add_argument("--one-gpu", action="store_true", help="fit the GPU layout onto one GPU, one replica each")
    args = ap.parse_args()

    import yaml
    from pathlib import Path

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve_configs" / args.config).read_text())
    app_args = shipped["applications"][0]["args"]
    precision = args.precision or app_args.get("precision", "fp32")
    overrides = {"precision": precision}
    if args.step_batching != "config":
        overrides["step_batching"] = {"max_batch_size": 8, "wait_s": 0.002} if args.step_batching == "on" else None
    deployments = None
    if args.one_gpu:
        deployments = {"TextEncoder": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.1}},
                       "Denoiser": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.5}},
                       "Decoder": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 2, "num_gpus": 0.25}}}

    threads = app_args.get("threads")
    if threads:
        torch.set_num_threads(threads)
    pipe = t2v.TextToVideoPipeline.from_pretrained(args.model, precision=precision)
    local = in_process(pipe, args.steps, args.runs, 100)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as tmp, serve_shipped_config(tmp, args.model, config=args.config,
                                                                     args=overrides, deployments=deployments) as serve:
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        seeds = iter(range(1000, 2000))  # a fresh seed per job: the result cache must not answer

        def job() -> str:
            return c.videos.create(prompt=PROMPT, extra_body={"seed": next(seeds),
                                                              "num_inference_steps": args.steps}).id

        def finish(video_id: str) -> None:
            v = c.videos.poll(video_id)  # at the server's advice, as create_and_poll does
            assert v.status == "completed", v.error
            c.videos.download_content(video_id).read()

        for _ in range(2):
            finish(job())  # warm-up (and the server learns a typical job's time for its poll advice)
        time.sleep(3)  # let the graph settle to idle
        pipe = t2v.TextToVideoPipeline.from_pretrained(args.model, precision=precision)
        beside = statistics.median(in_process(pipe, args.steps, args.runs, 300))
        del pipe
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

    pipe = t2v.TextToVideoPipeline.from_pretrained(args.model, precision=precision)
    local = statistics.median(local + in_process(pipe, args.steps, args.runs, 200))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    batching = overrides.get("step_batching", app_args.get("step_batching"))
    print(f"{args.config} ({device}, {precision}, step batching {'on' if batching else 'off'})")
    print(f"one job ({args.steps} steps, median of {args.runs}): in-process {local:.2f} s, "
          f"HTTP + Serve graph {served:.2f} s; ratio {served / local:.2f} (target <= 1.10)")
    print(f"  in-process beside the idle graph {beside:.2f} s ({beside / local:.2f}x of alone: Ray's presence); "
          f"the graph's own overhead {served / beside:.2f}x")
    print(f"4 jobs: serial {serial:.2f} s, concurrent {concurrent:.2f} s; throughput "
          f"{serial / concurrent:.2f}x of serial")


if __name__ == "__main__":
    main()
