"""A Wan2.2 A14B layout served two ways, one run: both experts on each Denoiser replica (`experts: single`) vs
each expert on a deployment of its own (`experts: split`, the high-noise steps on Denoiser, the rest on
LowNoiseDenoiser), with the same replicas' worth of CPUs. Prints the wall time of N concurrent jobs through the
official openai client, and their ratio.

    python bench/experts.py [--model PATH] [--jobs 4] [--steps 40] [--size 64]

Without --model, a tiny folder in the exact Wan2.2-T2V-A14B layout is built from config (tests/layouts.py). On a
CPU the ratio shows the pipelining alone: a job's low-noise steps run while the next job's high-noise steps do,
on other cores. On GPUs the split layout also holds one 26.7 GiB expert per replica instead of two (no offload,
no reload at the switch); that part is measured only on a GPU cluster.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_layout(model: str, experts: str, jobs: int, steps: int, size: int) -> float:
    """Seconds from the first create to the last completed job, N jobs at once."""
    import openai

    from t2v.serve.process import serve_shipped_config

    # Two cores' worth of Denoiser either way: two replicas holding both experts, or one replica per expert.
    one = {"num_replicas": 1, "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0.5}}
    deployments = {"Denoiser": dict(one, num_replicas=2)} if experts == "single" else \
        {"Denoiser": one, "LowNoiseDenoiser": one}
    with tempfile.TemporaryDirectory() as tmp, serve_shipped_config(
            tmp, model, args={"experts": experts, "adapters": None, "threads": 1}, deployments=deployments,
            settings={"concurrency": jobs, "poll_after_ms": 100}) as serve:
        client = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        body = {"num_inference_steps": steps, "optimize_prompt": False}
        client.videos.create_and_poll(prompt="warm-up", size=f"{size}x{size}", seconds="1",
                                      extra_body=dict(body, num_inference_steps=2))

        def one_job(i: int) -> str:
            video = client.videos.create_and_poll(prompt="a red ball bouncing", size=f"{size}x{size}", seconds="1",
                                                  extra_body=dict(body, seed=i), poll_interval_ms=100)
            return video.status

        t0 = time.perf_counter()
        with ThreadPoolExecutor(jobs) as pool:
            statuses = list(pool.map(one_job, range(jobs)))
        elapsed = time.perf_counter() - t0
        assert statuses == ["completed"] * jobs, statuses
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a Wan2.2 A14B bundle (default: a tiny one built from config)")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from layouts import build_wan22_a14b

            model = str(build_wan22_a14b(Path(tmp) / "Wan2.2-T2V-A14B-tiny"))
        single = run_layout(model, "single", args.jobs, args.steps, args.size)
        split = run_layout(model, "split", args.jobs, args.steps, args.size)
    print(f"{args.jobs} concurrent jobs, {args.steps} steps, {args.size}x{args.size}: both experts on each of 2 "
          f"Denoiser replicas {single:.1f} s; an expert per deployment {split:.1f} s; single / split = "
          f"{single / split:.2f}x")


if __name__ == "__main__":
    main()
