"""What `min_replicas: 0` costs: a job's wall time through the graph (`serve run` of t2v.yaml, the embedded model,
default settings) when the Denoiser has scaled to zero, against the same job on a warm replica, one run.

    python bench/scale_to_zero.py [--model PATH] [--jobs 3]

The cold job waits for Serve to see it, start a Denoiser replica and load the model into it; the difference is
what a user waits after an idle spell. Prints the median of --jobs cold and warm jobs and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def wait_replicas(want: int, timeout: float) -> None:
    """Until the Denoiser has `want` running replicas (serve.status())."""
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        app = serve.status().applications.get("t2v")
        if app and app.deployments["Denoiser"].replica_states.get("RUNNING", 0) == want:
            return
        time.sleep(0.5)
    raise TimeoutError(f"the Denoiser did not reach {want} replicas in {timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a bundle folder (default: the embedded model)")
    ap.add_argument("--jobs", type=int, default=3)
    args = ap.parse_args()

    import openai
    import ray

    from t2v.serve.process import serve_shipped_config

    scaling = {"min_replicas": 0, "initial_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 1,
               "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 1}
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as tmp, serve_shipped_config(
            tmp, args.model, deployments={"Denoiser": {"autoscaling_config": scaling}},
            settings={"poll_after_ms": 100}) as serve:
        ray.init(address="auto", log_to_driver=False)
        client = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        for n in range(args.jobs):
            wait_replicas(0, 120)  # idle: scaled to zero
            for k, times in enumerate((cold, warm)):  # the first finds no replica; the second, right after, a warm one
                start = time.perf_counter()  # (a new seed each: an identical request would be answered from cache)
                video = client.videos.create_and_poll(prompt="a red ball bouncing on a black background",
                                                      poll_interval_ms=100, extra_body={"seed": 2 * n + k})
                assert video.status == "completed", video.error
                times.append(time.perf_counter() - start)
        ray.shutdown()
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"job after scale-to-zero: {c:.1f} s; on a warm replica: {w:.1f} s; cold start costs {c - w:.1f} s "
          f"(x{c / w:.1f}); medians of {args.jobs}")


if __name__ == "__main__":
    main()
