"""The serving stages as plain functions over a pipeline (no Ray): check a request, encode the prompt,
sample it by its kind (`run_job`), decode + encode the video. The Ray Serve deployments (`deployments.py`)
call exactly these, one stage per deployment; `LocalGenerator` chains them in one process (tests, a laptop
without Ray Serve).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from typing import Any, Callable

import numpy as np
import torch

from ..bundle import COMPONENTS, load
from ..production.generate import PostOptions, generate, keyframes
from ..production.programs import CARD_SECONDS, ITEMS
from ..errors import InputError, JobCancelled
from ..long_video import limits
from ..params import frames_for_seconds, resolve
from ..production.planner import plan_video
from ..production.prompting import optimize_parts
from ..images import check_aspect, read_image
from ..parallel import layout_of
from ..pipeline import TextToVideoPipeline, check_frames, progress_callback
from ..runtime import RuntimeOptions, is_shapes_only
from ..sampling import as_predictor, bundle_forward, num_timesteps
from .. import lora
from ..video import png_bytes
from .requests import IMAGE_FIELDS, program_fields, video_fields
from .store import KINDS


def device() -> str:
    """Where a stage's replica runs its modules: the GPU Ray gave it, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def stage_pipeline(model: str | None, precision: str, threads: int | None, runtime: dict | None,
                   weights: tuple[str, ...] = COMPONENTS) -> TextToVideoPipeline:
    """A stage's pipeline: only the weights it runs are read (the other components are shapes, for limits and
    latent geometry), with the runtime options (memory, cache, compile) of the Serve config."""
    if threads:  # Ray gives a fractional-CPU actor one thread; a stage that runs alone may use more
        torch.set_num_threads(threads)
    options = RuntimeOptions.parse(**(runtime or {}))
    return TextToVideoPipeline(load(model, precision=precision, device=device(), runtime=options, weights=weights))


@dataclass
class GeneratedVideo:
    video: bytes | None  # mp4 (None: already in the job store)
    thumbnail: bytes | None  # PNG of the middle frame
    timings: dict
    # Quality scores (t2v.quality.assess) come after the video is stored, off the job's critical path: an awaitable.
    quality_later: Any = None
    frames: np.ndarray | None = field(default=None, repr=False)  # what `score` reads
    served_by: dict | None = None  # the Denoiser's parallel layout (`ParallelLayout.describe`) and Ray node


@dataclass
class Sampled:
    """A job after `run_job`: a programme finished where it was made (audio and all), or a video's latents
    or frames for `finish`."""

    latents: torch.Tensor | None = None
    frames: np.ndarray | None = None
    finished: GeneratedVideo | None = None
    timings: dict = field(default_factory=dict)
    handover: Any = None  # a mixture's high-noise expert's state at the switch (`sampling.Handover`), on the CPU


def model_version(bundle) -> str:
    """A short fingerprint of the weights and config (the result cache's key changes with the model)."""
    h = hashlib.sha256(json.dumps(bundle.config.__dict__, sort_keys=True, default=str).encode())
    for module in (m for m in (*bundle.experts, bundle.vae, bundle.image_encoder)
                   if m is not None and not is_shapes_only(m)):
        params = list(module.state_dict().values())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


POST_FIELDS = tuple(f.name for f in dataclass_fields(PostOptions))
GENERATION_FIELDS = ("negative_prompt", "seed", "num_inference_steps", "guidance_scale", "guidance_scale_2", "fps",
                     "sampler")


def generation_kwargs(request: dict, temporal_factor: int, default_fps: float) -> dict:
    """A checked request (`requests.video_fields`: OpenAI's seconds and size, t2v's fields) -> the
    TextToVideoPipeline's keyword arguments; `resolve` checks them against the model afterwards."""
    kw = {"prompt": request["prompt"], **{k: request[k] for k in GENERATION_FIELDS if k in request}}
    if "size" in request:
        kw["width"], kw["height"] = (int(v) for v in request["size"].split("x"))
    if "seconds" in request:
        kw["num_frames"] = frames_for_seconds(request["seconds"], kw.get("fps", default_fps), temporal_factor)
    return kw


def validate_program(bundle, fields: dict) -> dict:
    """POST /v1/programs: {kind, spec, seed?, num_inference_steps?, guidance_scale?} -> job parameters."""
    from ..production.programs import check_spec

    fields = program_fields(fields)  # types and bounds (the API has checked them already; other callers not)
    bundle.family.check_images(bundle, False, False, ("model", "model"))  # its clips start from prompts alone
    program_kind, spec = fields.get("kind"), fields.get("spec")
    check_spec(program_kind, spec)
    items = spec[ITEMS[program_kind]]
    title = spec.get("title") or spec.get("headline") or spec.get("brand")
    # Every clip's prompt and length against the model now, not when the job reaches that clip.
    p = resolve(bundle, [i["prompt"] for i in items], num_inference_steps=fields.get("num_inference_steps"),
                guidance_scale=fields.get("guidance_scale"), seed=fields.get("seed"))
    params = p.as_dict()
    params.pop("prompts"), params.pop("negative_prompts")
    lim = limits(bundle)
    for i, item in enumerate(items):
        try:
            lim.check_length(frames_for_seconds(float(item.get("seconds", 2)), p.fps, lim.temporal_factor), p.fps)
        except InputError as e:
            raise InputError(f"{ITEMS[program_kind]}[{i}].seconds", e.message, e.allowed) from None
    seconds = sum(float(i.get("seconds", 2)) for i in items) + 2 * CARD_SECONDS
    params.update(kind="program", prompt=f"{program_kind}: {title}", original_prompt=f"{program_kind}: {title}",
                  negative_prompt="", prompt_changes=[], program={"kind": program_kind, "spec": spec},
                  num_frames=int(round(seconds * params["fps"])))
    return params


def program_job(pipe: TextToVideoPipeline, params: dict, progress, on_step=None) -> GeneratedVideo:
    """A whole programme: its clips through generate(), cards, overlays, voice-over, one mp4 with audio.
    progress(clip, clips) after each clip; on_step(step, total) after each of a clip's steps."""
    import tempfile

    from ..production.programs import compose_program, write_program

    items = params["program"]["spec"].get("sections") or params["program"]["spec"].get("clips") or \
        params["program"]["spec"].get("items")
    done = [0]

    def clip_fn(prompt: str, seconds: float) -> np.ndarray:
        frames = frames_for_seconds(seconds, params["fps"], pipe.bundle.family.temporal_factor(pipe.bundle))
        out = generate(pipe, prompt, num_frames=frames, fps=params["fps"], seed=params["seed"] + done[0],
                      num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
                      guidance_scale_2=params.get("guidance_scale_2"), height=params["height"],
                      width=params["width"], progress=on_step)
        done[0] += 1
        if progress:
            progress(done[0], len(items))
        return out.frames

    t0 = time.perf_counter()
    program = compose_program(params["program"]["kind"], params["program"]["spec"], clip_fn, fps=params["fps"],
                              size=(params["width"], params["height"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_program(program, f"{tmp}/program.mp4")
        video = path.read_bytes()
    return GeneratedVideo(video=video, thumbnail=thumbnail(program.frames),
                          timings={"program_s": time.perf_counter() - t0})


def validate(bundle, fields: dict) -> dict:
    """Request fields (OpenAI + t2v) -> resolved parameters of one video, or InputError naming the field.
    A video longer than the model's clip, with several shots or with post-processing is "composed": its
    parameters carry the post options and the shot plan (returned with the job). Sets the job's "kind"."""
    cfg, lim = bundle.config, limits(bundle)
    request = video_fields(fields)  # types and bounds (the API has checked them already; other callers not)
    check_frames(bundle, *(field in request for field in IMAGE_FIELDS), tuple(IMAGE_FIELDS))
    kw = generation_kwargs(request, lim.temporal_factor, cfg.fps)
    post = PostOptions(**{k: request[k] for k in POST_FIELDS if k in request})
    post.check()
    tf = lim.temporal_factor
    frames = kw.pop("num_frames", cfg.num_frames)
    fps = float(kw.get("fps", cfg.fps))
    lim.check_length(frames, fps)  # before the planner: its work grows with the length
    prompt = original = kw.pop("prompt")
    changes: list[str] = []
    if request.get("optimize_prompt", True):
        prompt, negative, changes = optimize_parts(bundle, prompt, kw.get("negative_prompt"))
        if negative and not kw.get("negative_prompt"):
            kw["negative_prompt"] = negative
    key_frames, _ = keyframes(frames, fps, float(post.keyframe_fps or fps), tf)
    plan = plan_video(prompt, key_frames, float(post.keyframe_fps or fps), max_shots=lim.max_shots,
                      clip_frames=cfg.num_frames)
    composed = key_frames > cfg.num_frames or len(plan.shots) > 1 or post != PostOptions()
    # Every per-clip field goes through the model's own limits (a composed video's windows are native clips).
    # A composed video's windows each read one shot's prompt: each must fit the model, not the joined text.
    shot_prompts = [s.prompt for s in plan.shots] if composed else [prompt]
    p = resolve(bundle, shot_prompts, negative_prompt=kw.pop("negative_prompt", None),
                num_frames=cfg.num_frames if composed else frames, **kw)
    params = p.as_dict()
    params.pop("prompts")
    params["kind"] = "composed" if composed else "video"
    params["prompt"], params["negative_prompt"] = prompt, params.pop("negative_prompts")[0]
    params["original_prompt"], params["prompt_changes"] = original, changes
    if composed:  # its length was checked first; keyframes() keeps the key frames on the model's grid
        params.update(num_frames=frames, post=asdict(post), plan=plan.to_dict())
    for name, key in IMAGE_FIELDS.items():
        if name in request:
            params[key] = frame_png(request[name], p.width, p.height, name)
            params[f"{key}_sha256"] = hashlib.sha256(params[key].encode()).hexdigest()
    return params


def frame_png(data: bytes, width: int, height: int, field: str) -> str:
    """A request's image (input_reference: its first frame; last_frame_reference: its last) -> that frame: read
    safely, its aspect checked, resized to the video, as base64 PNG (it travels in the job's parameters, so a
    retry or a restart still has it)."""
    from PIL import Image

    image = read_image(data, field)
    check_aspect(image.size, width, height, field)
    return base64.b64encode(png_bytes(np.asarray(image.resize((width, height), Image.LANCZOS)))).decode()


def job_image(params: dict, key: str = "image"):
    """A job's first frame (key "image") or last ("last_image"), an RGB image of the video's size, if it gave one."""
    if params.get(key) is None:
        return None
    return read_image(base64.b64decode(params[key]))


def compose_job(pipe: TextToVideoPipeline, params: dict, progress: Callable[[int, int], None] | None,
                predictor: Callable | None = None):
    """A composed job's frames [T, H, W, 3] (planning, windows, post-processing: t2v.production.generate); `predictor`
    predicts each step's windows elsewhere (the Serve graph's Denoiser replicas)."""
    out = generate(pipe, params["prompt"], num_frames=params["num_frames"], fps=params["fps"],
                  post=PostOptions(**params["post"]), negative_prompt=params["negative_prompt"] or None,
                  seed=params["seed"], progress=progress, height=params["height"], width=params["width"],
                  num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
                  guidance_scale_2=params.get("guidance_scale_2"), sampler=params["sampler"], predictor=predictor,
                  image=job_image(params),
                  last_image=job_image(params, "last_image"))
    return out.frames


def encode(pipe: TextToVideoPipeline, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeds, negative prompt embeds) of one request."""
    embeds = pipe.encode_prompt([params["negative_prompt"], params["prompt"]])
    return embeds[1:], embeds[:1]


def denoise(pipe: TextToVideoPipeline, params: dict, embeds: torch.Tensor, negative_embeds: torch.Tensor,
            progress: Callable[[int, int], None] | None = None, predictor: Callable | None = None,
            modules_lock=None, expert: int | None = None, handover=None):
    """The sampling loop; progress(step, total) after every step; `predictor` runs the forwards elsewhere
    (the Denoiser's per-step batching); modules_lock: held while the call encodes its images here. expert,
    handover: one expert's steps of a mixture (`TextToVideoPipeline`): expert 0 returns its Handover."""
    total = num_timesteps(pipe.bundle, params["sampler"], params["num_inference_steps"])
    out = pipe(params["prompt"], negative_prompt=params["negative_prompt"], num_frames=params["num_frames"],
               height=params["height"], width=params["width"], num_inference_steps=params["num_inference_steps"],
               guidance_scale=params["guidance_scale"], guidance_scale_2=params.get("guidance_scale_2"),
               seed=params["seed"], sampler=params["sampler"], fps=params["fps"], output_type="latent",
               prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, callback_on_step_end=progress_callback(progress, total),
               predictor=predictor, image=job_image(params), last_image=job_image(params, "last_image"),
               modules_lock=modules_lock, expert=expert, handover=handover)
    return out.handover if expert == 0 else out.frames


def finish(pipe: TextToVideoPipeline, latents: torch.Tensor | None, fps: float,
           frames: np.ndarray | None = None) -> GeneratedVideo:
    """Decode (unless given frames), encode the mp4 and a PNG thumbnail; the frames stay for `score`."""
    from ..video import encode_video

    t0 = time.perf_counter()
    frames = pipe.decode_latents(latents)[0] if frames is None else frames
    t1 = time.perf_counter()
    video = encode_video(frames, fps, ".mp4")
    return GeneratedVideo(video=video, thumbnail=thumbnail(frames), frames=frames,
                          timings={"decode_s": t1 - t0, "encode_video_s": time.perf_counter() - t1})


def thumbnail(frames: np.ndarray) -> bytes:
    """A video's thumbnail: its middle frame as PNG."""
    return png_bytes(frames[len(frames) // 2])


def stop_when(cancel: threading.Event | None, progress: Callable[[int, int], None] | None):
    """`progress` that first raises JobCancelled once `cancel` is set. Both pipelines call progress from their
    `callback_on_step_end` after every step (a programme: after every clip), so the loop stops at its next step."""
    if cancel is None:
        return progress

    def report(step: int, total: int) -> None:
        if cancel.is_set():
            raise JobCancelled("the job was cancelled")
        if progress is not None:
            progress(step, total)

    return report


def run_job(pipe: TextToVideoPipeline, params: dict, progress: Callable[[int, int], None] | None,
            embeds: tuple[torch.Tensor, torch.Tensor] | None = None, predictor: Callable | None = None,
            window_predictor: Callable | None = None, lock=None, cancel: threading.Event | None = None,
            expert: int | None = None, handover=None) -> Sampled:
    """Sample one job by its kind. embeds: (prompt, negative) from a text-encoder stage (else encoded here);
    predictor: where a clip's steps are predicted (the Denoiser's step batching); window_predictor: where a
    composed video's windows are; lock: held while the job uses the pipeline's own modules, which are not
    re-entrant (a clip whose forwards all go through `predictor` needs no lock); cancel: once set, the
    sampling raises JobCancelled at its next step. A job that names an adapter (`params["lora"]`, loaded by the
    caller) has it switched on for each of its forwards here; a predictor passed in switches it itself. expert,
    handover: a clip's steps of one expert of a mixture (the high-noise one's Sampled carries the handover)."""
    kind, lock = params["kind"], contextlib.nullcontext() if lock is None else lock
    here = as_predictor(lora.with_adapter(pipe.bundle, lora.choice_of(params), bundle_forward(pipe.bundle)))
    progress = stop_when(cancel, progress)
    t0 = time.perf_counter()
    if kind == "program":  # its progress is per clip; a cancel is seen at every step of a clip
        with lock:
            return Sampled(finished=program_job(pipe, params, progress, stop_when(cancel, None)))
    if kind == "composed":
        with lock:  # it decodes too, and the causal VAE's caches are not re-entrant
            frames = compose_job(pipe, params, progress, window_predictor or here)
        return Sampled(frames=frames, timings={"generate_s": time.perf_counter() - t0})
    if kind != "video":
        raise ValueError(f"unknown job kind {kind!r} (known: {', '.join(KINDS)})")
    timings = {}
    if embeds is None:
        with lock:
            embeds = encode(pipe, params)
        timings["encode_prompt_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    split = dict(expert=expert, handover=None if handover is None else handover.to(pipe.bundle.device))
    if predictor is None:
        with lock:
            out = denoise(pipe, params, *embeds, progress, here, **split)
    else:
        out = denoise(pipe, params, *embeds, progress, predictor, modules_lock=lock, **split)
    timings["denoise_s"] = time.perf_counter() - t1
    if expert == 0:  # the high-noise expert's Handover, to travel to the low-noise expert's replica
        return Sampled(handover=out.to("cpu"), timings=timings)
    return Sampled(latents=out, timings=timings)


def score(frames: np.ndarray, prompt: str | None) -> dict:
    """The finished video's quality scores (t2v.quality.assess)."""
    from ..quality.assess import assess

    return assess(frames, prompt).to_dict()


class LocalGenerator:
    """All stages in this process, one job at a time (the pipeline's modules are not re-entrant)."""

    def __init__(self, bundle, adapter_root: str | None = None, max_adapters: int = 4):
        self.bundle = bundle
        self.pipe = TextToVideoPipeline(bundle)
        self.version = model_version(bundle)
        self._lock = threading.Lock()
        self.adapters = lora.LRU(bundle, adapter_root, max_adapters)  # loaded as jobs ask for them

    async def validate(self, fields: dict) -> dict:
        return validate(self.bundle, fields)

    async def validate_program(self, fields: dict) -> dict:
        return validate_program(self.bundle, fields)

    async def generate(self, params: dict, progress: Callable[[int, int], None], job_id: str = "") -> GeneratedVideo:
        """Cancelling this call (the job service's cancel or delete) stops the sampling at its next step; the
        call ends once the worker thread has stopped, so the next job finds the pipeline free."""
        cancel = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(self._generate, params, progress, cancel))
        try:
            result = await asyncio.shield(work)  # a thread cannot be cancelled: it is told to stop instead
        except asyncio.CancelledError:
            cancel.set()
            await asyncio.wait({work})
            if not work.cancelled():
                work.exception()  # its JobCancelled, expected: retrieved, so asyncio does not warn of it
            raise
        if result.frames is not None:
            result.quality_later = asyncio.to_thread(score, result.frames, params["prompt"])
        return result

    def _generate(self, params, progress, cancel: threading.Event | None = None) -> GeneratedVideo:
        with self._lock:
            choice = lora.choice_of(params)
            with self.adapters.get(choice.name).in_use() if choice else contextlib.nullcontext():
                sampled = run_job(self.pipe, params, progress, cancel=cancel)
            result = sampled.finished or finish(self.pipe, sampled.latents, params["fps"], sampled.frames)
        result.timings.update(sampled.timings)
        result.served_by = layout_of(self.bundle).describe()
        return result
