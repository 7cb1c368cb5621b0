"""Run by tests/test_parallel.py as a separate Ray driver (so the test process never joins a Ray cluster): it
connects to the cluster a `serve run` started, sends one clip through the application's own TextEncoder and
Denoiser handles, and saves what the Denoiser sampled (its latents, exactly, not an mp4).

    python parallel_client.py GCS_ADDRESS FIELDS_JSON OUT.pt
"""

import json
import sys

import ray
import torch
from ray import serve


def main(address: str, fields: str, out: str) -> None:
    ray.init(address=address, namespace="serve", log_to_driver=False)
    encoder = serve.get_deployment_handle("TextEncoder", app_name="t2v")
    denoiser = serve.get_deployment_handle("Denoiser", app_name="t2v")
    params = encoder.validate.remote(json.loads(fields)).result()
    embeds, negative = encoder.encode.remote((params["prompt"], params["negative_prompt"])).result()
    events = dict(e[:2] for e in denoiser.options(stream=True).denoise.remote(params, embeds, negative)
                  if e[0] != "progress")
    torch.save({"params": params, "embeds": embeds, "negative": negative, "latents": events["sampled"].latents,
                "served_by": events["served_by"]}, out)
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
