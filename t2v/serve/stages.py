"""The serving stages as plain functions over a pipeline (no Ray): check a request, encode the prompt,
denoise, decode + encode the video. The Ray Serve deployments (`deployments.py`) call exactly these, one
stage per deployment; `LocalGenerator` chains them in one process (tests, a laptop without Ray Serve).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..params import resolve
from ..pipeline import TextToVideoPipeline
from .jobs import to_generation_kwargs


@dataclass
class GeneratedVideo:
    video: bytes | None  # mp4 (None: already in the job store)
    thumbnail: bytes | None  # PNG of the middle frame
    timings: dict


def model_version(bundle) -> str:
    """A short fingerprint of the weights and config (the result cache's key changes with the model)."""
    h = hashlib.sha256(json.dumps(bundle.config.__dict__, sort_keys=True, default=str).encode())
    for module in (bundle.denoiser, bundle.vae):
        params = list(module.state_dict().values())
        for p in (params[0], params[len(params) // 2], params[-1]):
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def validate(bundle, fields: dict) -> dict:
    """Request fields (OpenAI + t2v) -> resolved parameters of one video, or InputError naming the field."""
    fam = bundle.family
    kw = to_generation_kwargs(fields, fam.temporal_factor(bundle), bundle.config.fps)
    p = resolve(bundle, kw.pop("prompt"), kw.pop("negative_prompt", None), **kw)
    params = p.as_dict()
    params["prompt"], params["negative_prompt"] = params.pop("prompts")[0], params.pop("negative_prompts")[0]
    return params


def encode(pipe: TextToVideoPipeline, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeds, negative prompt embeds) of one request."""
    embeds = pipe.encode_prompt([params["negative_prompt"], params["prompt"]])
    return embeds[1:], embeds[:1]


def denoise(pipe: TextToVideoPipeline, params: dict, embeds: torch.Tensor, negative_embeds: torch.Tensor,
            progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The sampling loop; progress(step, total) after every step."""
    total = params["num_inference_steps"]

    def on_step(_pipe, i, _t, tensors):
        if progress:
            progress(i + 1, total)
        return tensors

    out = pipe(params["prompt"], negative_prompt=params["negative_prompt"], num_frames=params["num_frames"],
               height=params["height"], width=params["width"], num_inference_steps=total,
               guidance_scale=params["guidance_scale"], seed=params["seed"], sampler=params["sampler"],
               fps=params["fps"], output_type="latent", prompt_embeds=embeds,
               negative_prompt_embeds=negative_embeds, callback_on_step_end=on_step)
    return out.frames


def finish(pipe: TextToVideoPipeline, latents: torch.Tensor, fps: float) -> GeneratedVideo:
    """Decode, then encode the mp4 and a PNG thumbnail."""
    from PIL import Image

    from ..video import encode_video

    t0 = time.perf_counter()
    frames = pipe.decode_latents(latents)[0]
    t1 = time.perf_counter()
    video = encode_video(frames, fps, ".mp4")
    buf = io.BytesIO()
    Image.fromarray(frames[len(frames) // 2]).save(buf, format="PNG")
    return GeneratedVideo(video=video, thumbnail=buf.getvalue(),
                          timings={"decode_s": t1 - t0, "encode_video_s": time.perf_counter() - t1})


class LocalGenerator:
    """All stages in this process, one job at a time (the pipeline's modules are not re-entrant)."""

    def __init__(self, bundle):
        self.bundle = bundle
        self.pipe = TextToVideoPipeline(bundle)
        self.version = model_version(bundle)
        self._lock = threading.Lock()

    async def validate(self, fields: dict) -> dict:
        return validate(self.bundle, fields)

    async def generate(self, params: dict, progress: Callable[[int, int], None], job_id: str = "") -> GeneratedVideo:
        return await asyncio.to_thread(self._generate, params, progress)

    def _generate(self, params, progress) -> GeneratedVideo:
        with self._lock:
            t0 = time.perf_counter()
            embeds, negative = encode(self.pipe, params)
            t1 = time.perf_counter()
            latents = denoise(self.pipe, params, embeds, negative, progress)
            t2 = time.perf_counter()
            result = finish(self.pipe, latents, params["fps"])
            result.timings.update(encode_prompt_s=t1 - t0, denoise_s=t2 - t1)
            return result
