"""One video over two ranks: per-step and end-to-end time of a single rank vs guidance-parallel (cfg2) and
Ulysses sequence-parallel (ulysses2), with the ranks as the Serve Denoiser starts them (Ray actors,
`t2v.serve.ranks.start_ranks`), and the per-step cost of sending a guidance half to its rank and back.

    python bench/parallel.py                            # the embedded model, 17x128x128, 25 steps
    python bench/parallel.py --preset wan2.1-1.3b --cpu-reduced   # the 1.3B shapes at 64x64x5, 8 steps

On this 2-core CPU two ranks share the two cores the single rank has (it runs 2 threads, each rank 1), so
no speed-up is expected: what carries over to GPUs is the overhead. On one GPU the two cfg2 ranks share it
(num_gpus 0.5 each): that shows the overhead too; a speed-up needs two GPUs, and ulysses2 needs two (NCCL puts
one rank on each), so there the default rows are single and cfg2. It is measured directly as the round trip
of one guidance half through Ray (the lead's latents and negative embeddings out, a prediction back) at the
run's shape and at Wan2.1's 480p x 81 shape, with a rank that answers without computing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def round_trip_ms(x: torch.Tensor, e: torch.Tensor, dtype: torch.dtype, repeats: int) -> float:
    """One guidance half's step through `start_ranks`' channel to a rank that answers at once (a prediction of
    the right shape, computed by no one): what is left is the transfer, each way, as a Denoiser makes it."""
    from types import SimpleNamespace

    from t2v.parallel import ParallelLayout
    from t2v.serve.ranks import DenoiserRank, start_ranks

    def echo_bundle():  # a "model" that answers at once with a prediction of the right shape
        return SimpleNamespace(denoiser=SimpleNamespace(dtype=dtype), device="cpu", runtime=None,
                               family=SimpleNamespace(predict=lambda b, x, t, e: torch.zeros_like(x, dtype=dtype)))

    class EchoRank(DenoiserRank):
        def load(self, *stage):
            return echo_bundle()

    lead = echo_bundle()
    start_ranks(lead, ParallelLayout(cfg=2), {"num_cpus": 1}, (), EchoRank)
    forward, t = lead.runtime.forward, torch.tensor([500.0])
    e2 = torch.cat([e, e])
    forward([(x, t, e2, 5.0)])  # the job's first step also puts its embeddings in the object store
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward([(x, t, e2, 5.0)])
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    import ray

    import t2v
    from t2v.families import WAN
    from t2v.parallel import ParallelLayout
    from t2v.serve.ranks import DenoiserRank, start_ranks

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None, help="a wan preset with random weights (default: the embedded model)")
    ap.add_argument("--cpu-reduced", action="store_true", help="with --preset: 64x64, 5 frames, 8 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--layouts", nargs="+", default=None, help="default: single cfg2 ulysses2 (cfg2 only on 1 GPU)")
    ap.add_argument("--repeats", type=int, default=10, help="round trips timed per shape")
    args = ap.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    threads = torch.get_num_threads()
    cuda = torch.cuda.is_available()
    device, precision = ("cuda", "bf16") if cuda else ("cpu", "fp32")
    gpus = torch.cuda.device_count()
    layouts = args.layouts or (["single", "cfg2", "ulysses2"] if not cuda or gpus > 1 else ["single", "cfg2"])
    rank_options = {"num_cpus": 1, "num_gpus": 0.5 if gpus == 1 else 1} if cuda else {"num_cpus": 1}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if args.preset:
        reduced = args.cpu_reduced
        size = dict(num_frames=5 if reduced else 81, height=64 if reduced else 480, width=64 if reduced else 832)
        steps = args.steps or (8 if reduced else 50)

        def build():
            torch.manual_seed(0)  # every rank builds the same random weights
            components = WAN.build(args.preset)
            bundle = t2v.from_components("wan", components, config=dict(size, num_inference_steps=steps, fps=16,
                                                                         max_sequence_length=512))
            return t2v.bundle.place(bundle, precision, "cuda" if torch.cuda.is_available() else "cpu")

        text = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(1))

        class PresetRank(DenoiserRank):
            def load(self, *stage):
                torch.set_num_threads(1)
                return build()

        rank_class, fresh = PresetRank, build  # rebuilt per row: one copy of 1.4B weights in this process
        call = dict(prompt="a prompt", prompt_embeds=text, negative_prompt_embeds=torch.zeros_like(text))
        name = args.preset
    else:
        size, steps = dict(num_frames=17, height=128, width=128), args.steps or 25
        rank_class, call, name = DenoiserRank, dict(prompt="a red ball bouncing"), "embedded"
        fresh = lambda: t2v.load(precision=precision, device=device)  # noqa: E731
    print(f"{name}: {size['width']}x{size['height']}x{size['num_frames']}, {steps} steps, guidance 5, {precision} "
          f"on {torch.cuda.get_device_name() if cuda else f'the CPU, {threads} threads'}", flush=True)

    rows, reference = [], None
    for layout_name in layouts:
        layout = ParallelLayout.parse(**({} if layout_name == "single" else
                                         {layout_name.rstrip("0123456789"): int(layout_name[-1])}))
        bundle = fresh()
        torch.set_num_threads(threads if layout.ranks == 1 else max(1, threads // layout.ranks))
        ranks = start_ranks(bundle, layout, rank_options, (None, precision, 1, None), rank_class)
        pipe = t2v.TextToVideoPipeline(bundle)
        stamps = []

        def on_step(_pipe, i, _t, tensors):
            sync()
            stamps.append(time.perf_counter())
            return tensors

        run = dict(call, **size, num_inference_steps=steps, guidance_scale=5.0, seed=7, output_type="pt")
        pipe(**{**run, "num_inference_steps": 2})  # warm-up: first forwards, rank start-up
        stamps.clear()
        t0 = time.perf_counter()
        frames = pipe(**run, callback_on_step_end=on_step).frames.float().cpu()
        total = time.perf_counter() - t0
        per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
        reference = frames if reference is None else reference
        rows.append((layout.name, per_step, total, float((frames - reference).abs().max())))
        print(f"  {layout.name:<9} {per_step * 1000:9.1f} ms/step {total:8.2f} s  max |frames - single| "
              f"{rows[-1][3]:.1e}", flush=True)
        for r in ranks:
            ray.kill(r)
        del pipe, bundle
        if layout.sequence > 1:
            torch.distributed.destroy_process_group()

    single = rows[0][1] if rows and rows[0][0] == "single" else None
    latent_frames = (size["num_frames"] - 1) // 4 + 1  # Wan's VAE: 4x in time, 8x in space, 16 channels
    shape = (1, 16, latent_frames, size["height"] // 8, size["width"] // 8)
    e = text if args.preset else torch.randn(1, 64, 384)
    shapes = [("this run", torch.randn(shape), e, torch.float32),
              ("Wan2.1 480p x 81", torch.randn(1, 16, 21, 60, 104), torch.randn(1, 512, 4096), torch.float32),
              ("Wan2.1 480p x 81", torch.randn(1, 16, 21, 60, 104), torch.randn(1, 512, 4096), torch.bfloat16)]
    print("per step, a guidance half's round trip through Ray (a rank that does not compute):")
    for label, x, emb, dtype in shapes:
        ms = round_trip_ms(x, emb, dtype, args.repeats)
        mb = x.numel() * 2 * dtype.itemsize / 2**20
        note = f", {100 * ms / 1000 / single:.2f}% of this run's single-rank step" if single and label == "this run" \
            else ""
        print(f"  {label:<17} {str(dtype)[6:]:<9} latents {tuple(x.shape)}, {mb:5.1f} MiB out and back: "
              f"{ms:6.1f} ms{note}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
