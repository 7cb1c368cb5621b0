"""A real-size Wan2.1 transformer and VAE (the wan2.1-1.3b or wan2.1-14b preset, random weights, nothing
downloaded): t2v's pipeline against diffusers' own WanPipeline on the same weights, seed and prompt
embeddings, then each runtime option on and off (t2v.runtime: VAE tiling, group offload, each step cache,
compile). Per row: seconds per step, total seconds, peak memory (GPU: torch.cuda.max_memory_allocated, weights
included; CPU: peak RSS above the process's after the weights are loaded, sampled: activations and buffers), and the frames' PSNR against t2v without options.

    python bench/real_size.py                      # the shape the lent GPU runs: 832x480, 81 frames, 50 steps
    python bench/real_size.py --cpu-reduced        # this CPU in minutes: 64x64, 5 frames, 8 steps, fp32
    python bench/real_size.py --cpu-reduced --mixture --options diffusers   # Wan2.2 A14B's two-expert layout

--mixture samples the preset's transformer as Wan2.2-T2V-A14B does its experts: a second transformer of the same
shape (other random weights) takes the steps below boundary_ratio 0.875, with its own guidance scale (3.0 against
4.0, the release's pair); diffusers' WanPipeline gets the same two (transformer_2, boundary_ratio). Two 1.3B-shaped
experts fit this CPU's memory where two 14B ones would not.

The text encoder (UMT5-XXL, 5.7B) is not run: both pipelines get the same prompt embeddings of its shape
(512 x 4096), so the table is the transformer's and the VAE's.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import threading
import time

import numpy as np
import torch


class PeakMemory:
    """Peak memory of what runs inside: CUDA's allocator peak, or on the CPU the process's RSS sampled every
    10 ms, above its value at entry."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._stop = rss(), threading.Event()
            self.peak_rss = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            self.peak_rss = max(self.peak_rss, rss())

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = self.peak_rss - self.base


def rss() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


def main() -> None:
    import diffusers

    import t2v
    from t2v.families import WAN
    from t2v.runtime import RuntimeOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--cpu-reduced", action="store_true", help="64x64, 5 frames, 8 steps, fp32")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--precision", default=None, help="default: bf16 on a GPU, fp32 on the CPU")
    ap.add_argument("--options", nargs="*", default=None,
                    help="rows to run (default: all): diffusers vae_tiling vae_slicing group_offload first_block "
                         "taylorseer pab compile expert_offload (--mixture)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--mixture", action="store_true", help="two experts of the preset's shape, as Wan2.2 A14B")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reduced = args.cpu_reduced
    width, height = args.width or (64 if reduced else 832), args.height or (64 if reduced else 480)
    frames, steps = args.frames or (5 if reduced else 81), args.steps or (8 if reduced else 50)
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    components = WAN.build(args.preset)
    if args.mixture:  # Wan2.2 A14B's layout at this preset's size
        components["transformer_2"] = WAN.build(args.preset)["transformer"]
        components["boundary_ratio"] = 0.875
    guidance = dict(guidance_scale=4.0, guidance_scale_2=3.0) if args.mixture else dict(guidance_scale=5.0)
    print(f"{args.preset}{' as a mixture of two experts' if args.mixture else ''}: built in {time.perf_counter() - t0:.0f} s; {width}x{height}, {frames} frames, "
          f"{steps} steps, {precision} on {device}", flush=True)

    def fresh_bundle(options: RuntimeOptions):
        """The same weights for every row, placed and switched on the way `t2v.load` does it: a copy where options
        install hooks on the modules they change or move them; shared without options (on the CPU in fp32 a
        second copy of two 1.3B experts would not fit a 24 GiB machine)."""
        share = options == RuntimeOptions() and device == "cpu" and precision == "fp32"
        parts = {k: copy.deepcopy(v) if isinstance(v, torch.nn.Module) and not share else v
                 for k, v in components.items()}
        bundle = t2v.from_components("wan", parts, config=dict(
            num_frames=frames, height=height, width=width, num_inference_steps=steps, fps=16,
            max_sequence_length=512))
        return t2v.bundle.place(bundle, precision, device, options)

    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 512, components["transformer"].config.text_dim, generator=generator)
    embeds[:, 12:] = 0  # a 12-token prompt, zero past its length as WanPipeline pads it
    negative = torch.zeros_like(embeds)
    rows, base_frames = [], None
    wanted = args.options

    def record(name, seconds, denoise_s, peak, video, extra=""):
        nonlocal base_frames
        if base_frames is None:
            base_frames = video
        rows.append({"row": name, "s_per_step": denoise_s / steps, "total_s": seconds, "peak_gib": peak / 2**30,
                     "psnr_db": psnr(video, base_frames), "note": extra})
        r = rows[-1]
        print(f"  {name:<22} {r['s_per_step']:8.3f} s/step {r['total_s']:8.1f} s {r['peak_gib']:7.2f} GiB  "
              f"PSNR {r['psnr_db']:6.1f} dB  {extra}", flush=True)

    def run_t2v(name, options: RuntimeOptions):
        bundle = fresh_bundle(options)
        pipe = t2v.TextToVideoPipeline(bundle)
        call = dict(prompt="a prompt", prompt_embeds=embeds, negative_prompt_embeds=negative, num_frames=frames,
                    height=height, width=width, num_inference_steps=steps, seed=7, output_type="pt", **guidance)
        extra = ""
        if options.compile:  # the warm-up run compiles; the timed run is the second
            t0 = time.perf_counter()
            pipe(**call)
            extra = f"warm-up {time.perf_counter() - t0:.0f} s"
        gc.collect()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            out = pipe(**call)
            seconds = time.perf_counter() - t0
        record(name, seconds, out.timings["denoise_s"], mem.peak, out.frames.float().cpu(), extra)
        del pipe, bundle
        gc.collect()

    # 1. t2v, no options: the reference row (after one untimed call: the first touch of fresh weights and the
    #    allocator's first growth would otherwise be charged to it).
    run_t2v("t2v (warm-up, untimed)", RuntimeOptions())
    rows.clear()
    run_t2v("t2v", RuntimeOptions())

    # 2. diffusers' WanPipeline on the same weights, seed and embeddings.
    if wanted is None or "diffusers" in wanted:
        bundle = fresh_bundle(RuntimeOptions())
        ref = diffusers.WanPipeline(tokenizer=None, text_encoder=None, transformer=bundle.denoiser, vae=bundle.vae,
                                    scheduler=bundle.scheduler, transformer_2=bundle.denoiser_2,
                                    boundary_ratio=bundle.boundary_ratio)
        ref.set_progress_bar_config(disable=True)
        stamps = []
        gc.collect()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            video = ref(prompt_embeds=embeds.to(device, dtype), negative_prompt_embeds=negative.to(device, dtype),
                        num_frames=frames, height=height, width=width, num_inference_steps=steps, **guidance,
                        generator=torch.Generator().manual_seed(7), output_type="pt",
                        callback_on_step_end=lambda p, i, t, k: stamps.append(time.perf_counter()) or k).frames
            seconds = time.perf_counter() - t0
        denoise = stamps[-1] - t0 if stamps else seconds
        video = video.float().cpu()
        diff = (video - base_frames).abs().max().item()
        record("diffusers WanPipeline", seconds, denoise, mem.peak, video, f"max |frame diff| vs t2v {diff:.1e}")
        rows[-1]["t2v_over_diffusers"] = rows[0]["total_s"] / seconds
        rows[-1]["max_frame_diff"] = diff
        print(f"  t2v / diffusers = {rows[0]['total_s'] / seconds:.3f}", flush=True)
        del ref, bundle
        gc.collect()

    # 3. Each option alone.
    tile = "vae_tiling:32" if reduced else "vae_tiling"  # a reduced frame is smaller than diffusers' 256 px tile
    options = {"vae_tiling": RuntimeOptions.parse(memory=tile), "vae_slicing": RuntimeOptions.parse(memory="vae_slicing"),
               "group_offload": RuntimeOptions.parse(memory="group_offload"),
               "first_block": RuntimeOptions.parse(cache="first_block:0.05"),
               "first_block:0.2": RuntimeOptions.parse(cache="first_block:0.2"),
               "taylorseer": RuntimeOptions.parse(cache="taylorseer:3" if reduced else "taylorseer"),
               "pab": RuntimeOptions.parse(cache="pab"), "compile": RuntimeOptions(compile=True)}
    if args.mixture:  # one expert on the device at a time; on a CPU both stay in host memory (nothing saved)
        options["expert_offload"] = RuntimeOptions.parse(memory="expert_offload")
    for name, opts in options.items():
        if wanted is None or name in wanted:
            run_t2v(name if name != "vae_tiling" else tile, opts)  # (first_block: threshold 0.05)

    print("\n| row | s/step | total s | peak GiB | PSNR vs t2v (dB) | note |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['s_per_step']:.3f} | {r['total_s']:.1f} | {r['peak_gib']:.2f} | "
              f"{r['psnr_db']:.1f} | {r['note']} |")
    base = rows[0]["total_s"]
    print("\nspeed-up vs t2v without options: " + ", ".join(f"{r['row']} {base / r['total_s']:.2f}x" for r in rows[1:]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "shape": [frames, height, width], "steps": steps, "device": device,
                       "precision": precision, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
