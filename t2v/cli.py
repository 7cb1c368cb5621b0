"""The `t2v` command: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .errors import T2VError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2v", description="Text-to-video with diffusers-format video bundles.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make a video from a sentence")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.mp4", help="output file: .mp4, .webm or .gif (default out.mp4)")
    gen.add_argument("--model", default=None, help="bundle folder or s3:// URI (default: the embedded model)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--no-optimize", action="store_true", help="keep the prompt as written (by default it goes "
                     "through the prompt optimizer, as in the API: rephrased for the embedded model, tags and a "
                     "negative prompt for others)")
    gen.add_argument("--frames", type=int, default=None)
    gen.add_argument("--seconds", type=float, default=None, help="duration (sets --frames); longer than the "
                     "model's clip: shots planned and co-denoised in overlapping windows")
    gen.add_argument("--plan", action="store_true", help="print the shot plan")
    gen.add_argument("--keyframe-fps", type=float, default=None, help="generate at this rate, interpolate to --fps")
    gen.add_argument("--interpolate", default="flow", help="keyframe interpolation: flow (Farneback) | linear")
    gen.add_argument("--motion-blur", type=float, default=0.0, help="0 to 1")
    gen.add_argument("--smooth", type=int, default=1, help="temporal smoothing window (odd frames; 1 = off)")
    gen.add_argument("--color-match", action="store_true", help="match every shot's colours to the first's")
    gen.add_argument("--fps", type=float, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None)
    gen.add_argument("--guidance-2", type=float, default=None,
                     help="a mixture of experts' (Wan2.2 A14B) guidance in its low-noise steps (default: --guidance)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--image", default=None, help="the video's first frame (PNG, JPEG or WebP of its aspect)")
    gen.add_argument("--last-image", default=None,
                     help="its last frame, for a first-last-frame model (the Wan2.1-FLF2V layout)")
    gen.add_argument("--lora", default=None, help="a LoRA adapter: a folder or s3:// URI, or the name of one of "
                     "the embedded model's (e.g. desert), optionally :strength")
    gen.add_argument("--sampler", default=None)
    gen.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | int8")
    _runtime_arguments(gen)
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.add_argument("--timings", action="store_true", help="print where the time went (load, text, denoise, ...)")

    info = sub.add_parser("info", help="components, parameter counts and supported sizes of a bundle")
    info.add_argument("--model", default=None)
    info.add_argument("--preset", default=None, help="a family preset's shapes instead of a bundle, e.g. "
                      "wan2.1-1.3b, wan2.1-14b or unet3d:tiny (built without memory: parameters and bf16 sizes)")

    ev = sub.add_parser("eval", help="prompt adherence on the synthetic world's held-out or training prompts")
    ev.add_argument("--model", default=None)
    ev.add_argument("--stage", default="video", choices=["video", "vae", "dit", "all"],
                    help="video: generated videos; vae: reconstructions of the rendered clips; dit: the denoiser's "
                         "loss with true vs shuffled vs empty captions; all: the three")
    ev.add_argument("--split", default="heldout", choices=["heldout", "train"])
    ev.add_argument("--n", type=int, default=200)
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ev.add_argument("--optimize", action="store_true", help="each prompt through the prompt optimizer first, as "
                    "t2v generate and the API do by default (default: the prompts as the world phrases them)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--sheet", default="eval.png", help="contact sheet PNG")
    ev.add_argument("--lora", default=None, help="a LoRA adapter folder, s3:// URI or embedded adapter's name, "
                    "optionally :strength")
    ev.add_argument("--background", default=None, help="prompts on this background only (e.g. a new word: desert)")
    ev.add_argument("--precision", default="fp32")
    _runtime_arguments(ev)

    prog = sub.add_parser("compose", help="an education / ad / news programme from a YAML spec")
    prog.add_argument("kind", choices=["education", "ad", "news"])
    prog.add_argument("spec", help="YAML or JSON file")
    prog.add_argument("-o", "--output", default="program.mp4")
    prog.add_argument("--model", default=None)
    prog.add_argument("--steps", type=int, default=None)
    prog.add_argument("--seed", type=int, default=0)
    prog.add_argument("--no-voice", action="store_true", help="no espeak-ng voice-over")

    assess = sub.add_parser("assess", help="quality scores of a video file (and its match to a prompt)")
    assess.add_argument("video")
    assess.add_argument("--prompt", default=None)
    assess.add_argument("--json", action="store_true", help="print the scores as JSON")

    data = sub.add_parser("data", help="make video-text parquet shards").add_subparsers(dest="data_command",
                                                                                       required=True)
    world = data.add_parser("world", help="render the synthetic world into shards (parallel on Ray)")
    world.add_argument("--out", required=True, help="folder or s3:// URI")
    world.add_argument("--clips", type=int, required=True)
    world.add_argument("--shards", type=int, default=1)
    world.add_argument("--split", default="train", choices=["train", "heldout"])
    world.add_argument("--seed", type=int, default=0)
    world.add_argument("--size", type=int, default=128, help="width and height")
    world.add_argument("--frames", type=int, default=17)
    world.add_argument("--fps", type=float, default=8.0)
    world.add_argument("--background", default=None, help="put --background-share of the clips on this "
                       "background (one of the world's new words, e.g. desert, to train an adapter on)")
    world.add_argument("--background-share", type=float, default=1.0)
    world.add_argument("--no-ray", action="store_true", help="render in this process")
    latents = data.add_parser("latents", help="add precomputed VAE latents to a copy of the shards")
    latents.add_argument("--data", required=True, help="shard folder or s3:// URI")
    latents.add_argument("--model", required=True, help="bundle whose VAE encodes the clips")
    latents.add_argument("--out", required=True)
    latents.add_argument("--no-ray", action="store_true")
    ingest = data.add_parser("ingest", help="real videos + a WebVid-style captions CSV -> shards")
    ingest.add_argument("--videos", required=True, help="folder of <videoid>.mp4 files")
    ingest.add_argument("--captions", required=True, help="CSV with videoid,name columns")
    ingest.add_argument("--out", required=True)
    ingest.add_argument("--shards", type=int, default=1)
    ingest.add_argument("--size", type=int, default=128)
    ingest.add_argument("--frames", type=int, default=17)
    ingest.add_argument("--fps", type=float, default=8.0)
    return parser


def _runtime_arguments(parser: argparse.ArgumentParser) -> None:
    """The runtime options (t2v.runtime) of a command that generates."""
    parser.add_argument("--memory", default=None,
                        help="comma-separated: vae_tiling[:px], vae_slicing, group_offload, expert_offload")
    parser.add_argument("--cache", default=None, help="step cache: first_block[:threshold], taylorseer[:interval], pab")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated block")


def _resolve_model(uri: str | None) -> str:
    from .bundle import DEFAULT_MODEL
    from .errors import BundleError

    if uri is None and not (DEFAULT_MODEL / "model_index.json").exists():
        raise BundleError(str(DEFAULT_MODEL), "no embedded default model is installed yet; pass --model PATH|URI")
    return uri or str(DEFAULT_MODEL)


def generate(args) -> int:
    from tqdm import tqdm

    from .errors import InputError
    from .images import read_image
    from .lora import from_spec
    from .production.generate import PostOptions, generate
    from .production.prompting import optimize_parts
    from .params import frames_for_seconds
    from .pipeline import TextToVideoPipeline
    from .video import _format, write_video

    _format(args.output)  # an unknown extension fails before any work
    images = {}
    for field, path in (("image", args.image), ("last_image", args.last_image)):
        if path and not Path(path).is_file():
            raise InputError(field, f"no such file: {path}")
        images[field] = read_image(Path(path).read_bytes(), field) if path else None
    adapter = from_spec(args.lora) if args.lora else None
    start = time.perf_counter()
    pipe = TextToVideoPipeline.from_pretrained(_resolve_model(args.model), precision=args.precision,
                                               memory=args.memory, cache=args.cache, compile=args.compile)
    load_adapter(pipe, adapter)
    loaded = time.perf_counter()
    cfg = pipe.bundle.config
    frames = args.frames
    if args.seconds is not None:
        tf = pipe.bundle.family.temporal_factor(pipe.bundle)
        frames = frames_for_seconds(args.seconds, args.fps or cfg.fps, tf)
    bars = []

    def progress(step, total):
        if not bars:  # created on the first step: inputs are valid by then
            bars.append(tqdm(total=total, desc="denoising", unit="step", disable=args.quiet, file=sys.stderr))
        bars[0].update(step - bars[0].n)

    prompt, negative = args.prompt, args.negative
    if not args.no_optimize:  # the API's default too (optimize_prompt), so both make the same video of a prompt
        prompt, optimized_negative, changes = optimize_parts(pipe.bundle, prompt, negative)
        negative = negative or optimized_negative or None
        if changes:
            print(f"prompt: {prompt!r} ({'; '.join(changes)}; --no-optimize keeps it as written)", file=sys.stderr)
    post = PostOptions(keyframe_fps=args.keyframe_fps, interpolate=args.interpolate, motion_blur=args.motion_blur,
                       smooth=args.smooth, color_match=args.color_match)
    try:
        out = generate(pipe, prompt, num_frames=frames, fps=args.fps, post=post, negative_prompt=negative,
                      seed=args.seed, progress=progress, height=args.height, width=args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
                      guidance_scale_2=args.guidance_2, **images)
    finally:
        for bar in bars:
            bar.close()
    if args.plan:
        print(out.plan.describe())
    written = time.perf_counter()
    write_video(args.output, out.frames, out.fps)
    h, w = out.frames.shape[1:3]
    print(f"{os.path.abspath(args.output)}: {len(out.frames)} frames, {w}x{h} at {out.fps:g} fps, "
          f"seed {out.params['seed']}, {time.perf_counter() - start:.1f} s")
    if args.timings:  # seconds; `start` is after the imports, so process start-up is what a caller measures besides
        t = out.timings
        parts = {"load": loaded - start, "text": t.get("encode_s", 0.0), "denoise": t.get("denoise_s", 0.0),
                 "decode": t.get("decode_s", 0.0), "post": t.get("postprocess_s", 0.0),
                 "encode": time.perf_counter() - written}
        print("timings: " + " ".join(f"{k}={v:.3f}" for k, v in parts.items()))
    return 0


def info_preset(name: str) -> int:
    """A preset's components built on the meta device: shapes and counts, no memory, nothing downloaded."""
    import torch

    from .families import FAMILIES

    family_name, _, preset = name.rpartition(":")  # "unet3d:tiny"; a bare name: the first family that has it
    family = next((f for f in FAMILIES.values() if preset in f.presets and family_name in ("", f.name)), None)
    if family is None:
        known = sorted(f"{f.name}:{p}" for f in FAMILIES.values() for p in f.presets)
        raise SystemExit(f"t2v: unknown preset {name!r} (known: {', '.join(known)})")
    name = preset
    components = family.build(name, text_encoder=True, device="meta")
    print(f"preset: {name} (family {family.name}, {family.pipeline_class}; random weights when built)")
    total = 0
    for part, module in components.items():
        if isinstance(module, float):  # a mixture's boundary_ratio
            print(f"  {part:<13} {module:g} (the second expert's steps: t < {module:g} x the training timesteps)")
            continue
        if not isinstance(module, torch.nn.Module):
            print(f"  {part:<13} {type(module).__name__}")
            continue
        n = sum(p.numel() for p in module.parameters())
        total += n
        print(f"  {part:<13} {type(module).__name__:<28} {count(n)} parameters  {bf16_bytes(module) / 2**30:8.3f} GiB in bf16")
    print(f"  {'total':<13} {'':<28} {count(total)} parameters")
    return 0


def count(n: int) -> str:
    return f"{n / 1e9:8.3f} B" if n >= 1e8 else f"{n / 1e6:8.2f} M"


def bf16_bytes(module) -> int:
    """Weight memory in bf16, counting what the model keeps in fp32 (`_keep_in_fp32_modules`) at 4 bytes."""
    keep = set(getattr(module, "_keep_in_fp32_modules", None) or [])
    total = 0
    for name, p in module.named_parameters():
        total += p.numel() * (4 if keep & set(name.split(".")) else 2)
    return total


def info(args) -> int:
    from .bundle import load

    if args.preset:
        return info_preset(args.preset)
    b = load(_resolve_model(args.model))
    fam, cfg = b.family, b.config
    print(f"model: {b.source}")
    print(f"family: {fam.name} ({fam.pipeline_class})")
    for name, n in b.num_parameters().items():
        module = getattr(b, name)
        print(f"  {name:<13} {type(module).__name__:<28} {n / 1e6:9.2f} M parameters")
    if b.denoiser_2 is not None:
        print(f"  {'boundary':<13} {b.boundary_ratio:g}: denoiser_2 takes the steps at t < {b.boundary_ratio:g} x "
              f"{b.scheduler.config.num_train_timesteps}")
    print(f"  {'scheduler':<13} {type(b.scheduler).__name__}")
    print(f"  {'tokenizer':<13} {type(b.tokenizer).__name__} (max {cfg.max_sequence_length} tokens)")
    t, m = fam.temporal_factor(b), fam.size_multiple(b)
    lo, hi = fam.frame_range(b)
    frames = f"1 + {t}k, up to {hi}" if t > 1 else (f"{lo}..{hi}" if lo < hi else f"{hi}")
    print(f"sizes: height/width {max(m, cfg.min_size)}..{cfg.max_size} in multiples of {m}; frames {frames}")
    print(f"defaults: {cfg.num_frames} frames, {cfg.width}x{cfg.height} at {cfg.fps:g} fps, "
          f"{cfg.num_inference_steps} steps, guidance {cfg.guidance_scale:g}")
    print(f"samplers: {', '.join(sorted(fam.samplers))}")
    return 0


def load_adapter(pipe, adapter: tuple[str, str, float] | None) -> None:
    """--lora, resolved by lora.from_spec before any work: loaded into the pipeline and switched on."""
    if adapter is not None:
        uri, name, strength = adapter
        pipe.load_lora_weights(uri, name)
        pipe.set_adapters(name, strength)


def evaluate(args) -> int:
    from tqdm import tqdm

    from .errors import InputError
    from .quality.evaluate import conditioning_losses, conditioning_table, contact_sheet, evaluate_vae
    from .quality.evaluate import evaluate as run_eval
    from .pipeline import TextToVideoPipeline

    from .lora import from_spec
    from .world.scene import ALL_BACKGROUNDS

    if args.n < 1:
        raise InputError("n", f"{args.n} prompts", "≥ 1")
    if args.background is not None and args.background not in ALL_BACKGROUNDS:
        raise InputError("background", f"unknown background {args.background!r}", ", ".join(ALL_BACKGROUNDS))
    adapter = from_spec(args.lora) if args.lora else None
    pipe = TextToVideoPipeline.from_pretrained(_resolve_model(args.model), precision=args.precision,
                                               memory=args.memory, cache=args.cache, compile=args.compile)
    load_adapter(pipe, adapter)
    stages = ["vae", "dit", "video"] if args.stage == "all" else [args.stage]
    for stage in stages:
        with tqdm(total=args.n, desc=f"evaluating ({stage})", unit="clip", file=sys.stderr) as bar:
            progress = lambda i: bar.update(i - bar.n)  # noqa: E731
            if stage == "dit":
                print(conditioning_table(conditioning_losses(pipe, args.split, args.n, args.seed, progress=progress)))
                continue
            if stage == "vae":
                result, errors = evaluate_vae(pipe, args.split, args.n, args.seed, progress=progress)
            else:
                result = run_eval(pipe, args.split, args.n, args.steps, args.seed, progress=progress,
                                  background=args.background, optimize=args.optimize)
        print(f"[{stage}] " + result.table())
        if stage == "vae":
            print(errors.table())
        sheet = args.sheet if len(stages) == 1 else args.sheet.replace(".png", f"-{stage}.png")
        contact_sheet(result.rows, sheet)
        print(f"contact sheet: {os.path.abspath(sheet)}")
    return 0


def compose_program_cmd(args) -> int:
    import yaml

    from .production.generate import generate
    from .errors import InputError
    from .params import frames_for_seconds
    from .pipeline import TextToVideoPipeline
    from .production.programs import compose_program, write_program

    if not os.path.isfile(args.spec):
        raise InputError("spec", f"no such file: {args.spec}")
    with open(args.spec) as f:
        spec = yaml.safe_load(f)
    start = time.perf_counter()
    pipe = TextToVideoPipeline.from_pretrained(_resolve_model(args.model))
    cfg = pipe.bundle.config
    tf = pipe.bundle.family.temporal_factor(pipe.bundle)
    seeds = iter(range(args.seed, args.seed + 1000))

    def clip_fn(prompt, seconds):
        frames = frames_for_seconds(seconds, cfg.fps, tf)
        return generate(pipe, prompt, num_frames=frames, seed=next(seeds), num_inference_steps=args.steps).frames

    program = compose_program(args.kind, spec, clip_fn, fps=cfg.fps, size=(cfg.width, cfg.height),
                              voice=not args.no_voice)
    path = write_program(program, args.output)
    print(f"{os.path.abspath(path)}: {args.kind}, {len(program.frames)} frames ({len(program.frames) / cfg.fps:.1f} s)"
          f"{', voice-over' if program.audio is not None else ''}{', subtitles ' + str(path.with_suffix('.vtt')) if program.cues else ''}"
          f", {time.perf_counter() - start:.1f} s")
    return 0


def assess_video(args) -> int:
    import json

    from .quality.assess import assess
    from .errors import InputError
    from .video import read_video

    if not os.path.isfile(args.video):
        raise InputError("video", f"no such file: {args.video}")
    result = assess(read_video(args.video), args.prompt)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    return 0


def data(args) -> int:
    from .errors import InputError

    for name in ("clips", "shards", "size", "frames"):
        value = getattr(args, name, 1)  # not every data command has every field
        if value < 1:
            raise InputError(name, f"{value} is not allowed", "≥ 1")
    if hasattr(args, "clips") and args.clips < args.shards:
        raise InputError("shards", f"{args.shards} shards for {args.clips} clips", f"≤ clips ({args.clips})")
    start = time.perf_counter()
    if not getattr(args, "no_ray", True):
        import ray

        ray.init(ignore_reinit_error=True, log_to_driver=False)
    if args.data_command == "world":
        from .data.shards import WorldSpec, write_world

        spec = WorldSpec(clips=args.clips, shards=args.shards, split=args.split, seed=args.seed, width=args.size,
                         height=args.size, num_frames=args.frames, fps=args.fps, background=args.background,
                         background_share=args.background_share)
        shards = write_world(args.out, spec, parallel=not args.no_ray)
        print(f"{args.out}: {sum(shards.values())} clips ({args.split}) in {len(shards)} shards, "
              f"{time.perf_counter() - start:.1f} s")
    elif args.data_command == "latents":
        from .data.latents import add_latents

        counts = add_latents(args.data, args.model, args.out, parallel=not args.no_ray)
        print(f"{args.out}: latents for {sum(counts.values())} clips in {len(counts)} shards, "
              f"{time.perf_counter() - start:.1f} s")
    else:
        from .data.ingest import IngestSpec, ingest

        spec = IngestSpec(num_frames=args.frames, fps=args.fps, width=args.size, height=args.size, shards=args.shards)
        result = ingest(args.videos, args.captions, args.out, spec)
        print(f"{args.out}: {result['rows']} clips in {len(result['shards'])} shards, "
              f"{len(result['skipped'])} skipped, {time.perf_counter() - start:.1f} s")
        for videoid, why in result["skipped"]:
            print(f"  skipped {videoid}: {why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"generate": generate, "info": info, "eval": evaluate, "assess": assess_video, "data": data,
                    "compose": compose_program_cmd}
        return commands[args.command](args)
    except T2VError as e:
        print(f"t2v: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """The `t2v` console script: main(), then exit without the interpreter's last garbage collection, which walks
    the object graphs of torch, diffusers and transformers for 0.6 s on a 2-core CPU after the work is done (files
    are closed and atexit handlers run as usual; the memory goes back to the system with the process)."""
    import gc

    # Importing torch, diffusers and transformers makes millions of long-lived objects, and the default thresholds
    # walk them all again and again while they load (0.5 s of start-up on 2 cores). Young garbage is still
    # collected as usual; only the full walks of the old generation become rare.
    gc.set_threshold(100_000, 100, 100)
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
