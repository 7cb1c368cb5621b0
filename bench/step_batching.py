"""Per-step batching: k concurrent requests' denoising steps (or k windows of
one long video's step) as k guided forwards one after another vs one
batched forward (`t2v.sampling.predict_batch`), with the embedded model's denoiser at its native clip shape.
This is what decides whether the Serve graph's Denoiser should batch steps (`step_batching` in
serve_configs/): where a forward is launch-bound (a GPU at these sizes) a batch costs little more than one
request; where it is compute-bound (a CPU) batching buys nothing.

    python bench/step_batching.py [--model PATH] [--precision bf16] [--ks 1 2 4 8]

Only the denoiser is loaded (the text encoder's output is stood in for by random embeddings of its shape),
so this also runs where the text encoder's package is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch


def main() -> None:
    from diffusers import WanTransformer3DModel

    from t2v.bundle import DEFAULT_MODEL, PRECISIONS
    from t2v.families import FAMILIES
    from t2v.sampling import predict_batch, predict_guided

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--precision", default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    cfg = json.loads((Path(args.model) / "model_index.json").read_text())["_t2v"]
    model = WanTransformer3DModel.from_pretrained(Path(args.model) / "transformer",
                                                  torch_dtype=PRECISIONS[precision]).to(device).eval()
    fam = FAMILIES["wan"]
    bundle = SimpleNamespace(family=fam, denoiser=model)
    vae = json.loads((Path(args.model) / "vae" / "config.json").read_text())
    latent_frames = (cfg["num_frames"] - 1) // 4 + 1
    shape = (1, vae["z_dim"], latent_frames, cfg["height"] // 8, cfg["width"] // 8)
    text = (2, cfg["max_sequence_length"], model.config.text_dim)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, {precision}, latents {tuple(shape)}, guided (2 rows per request)")
    t = torch.tensor(500.0, device=device)
    with torch.no_grad():
        for k in args.ks:
            reqs = [(torch.randn(shape, device=device), t, torch.randn(text, device=device), 5.0) for _ in range(k)]
            one_by_one = timed(lambda: [predict_guided(bundle, x, tt, e, g) for x, tt, e, g in reqs])
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            batched = timed(lambda: predict_batch(bundle, reqs))
            peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
            print(f"k={k}: one by one {one_by_one * 1e3:7.1f} ms, batched {batched * 1e3:7.1f} ms per step; "
                  f"speed-up {one_by_one / batched:.2f}x; batched step / single step "
                  f"{batched / (one_by_one / k):.2f}; peak GPU memory {peak:.0f} MiB")


if __name__ == "__main__":
    main()
