"""The Ray Serve graph: TextEncoder -> Denoiser -> Decoder, behind the job API's Ingress.

    serve run serve_configs/t2v.yaml

Each deployment is a thin shell over `stages.py`; replicas, autoscaling and `ray_actor_options` (GPUs, CPUs)
come from the YAML config, not from here. The graph is bound once, in `build_app`.
"""

from __future__ import annotations

import asyncio
import threading

import torch
from ray import serve

from ..bundle import load
from ..errors import InputError
from ..long_video import predict_window
from ..pipeline import TextToVideoPipeline
from . import stages
from .api import Settings, create_app
from .jobs import JobStore


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pipeline(model: str | None, precision: str, threads: int | None) -> TextToVideoPipeline:
    if threads:  # Ray gives a fractional-CPU actor one thread; a stage that runs alone may use more
        torch.set_num_threads(threads)
    return TextToVideoPipeline(load(model, precision=precision, device=_device()))


@serve.deployment
class TextEncoder:
    """Checks requests against the model's limits and encodes prompts, batching concurrent requests."""

    def __init__(self, model: str | None = None, precision: str = "fp32", threads: int | None = None):
        self.pipe = _pipeline(model, precision, threads)
        self._version = stages.model_version(self.pipe.bundle)

    def version(self) -> str:
        return self._version

    def validate(self, fields: dict) -> dict:
        return stages.validate(self.pipe.bundle, fields)

    def validate_program(self, fields: dict) -> dict:
        return stages.validate_program(self.pipe.bundle, fields)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode(self, requests: list[tuple[str, str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # One forward for every prompt and negative prompt waiting now.
        embeds = self.pipe.encode_prompt([p for p, _ in requests] + [n for _, n in requests]).cpu()
        n = len(requests)
        return [(embeds[i:i + 1], embeds[n + i:n + i + 1]) for i in range(n)]


@serve.deployment
class Denoiser:
    """The denoiser and its scheduler; streams ("progress", step, total) events, then ("latents", tensor), or
    for a composed job ("frames", uint8 array) after its windows and post-processing."""

    def __init__(self, model: str | None = None, precision: str = "fp32", threads: int | None = None,
                 fan_out: bool = True):
        self.pipe = _pipeline(model, precision, threads)
        self._lock = threading.Lock()  # one sampling loop at a time per replica
        self.fan_out = fan_out  # long videos: each step's windows go to every Denoiser replica

    async def predict_window(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance: float):
        """One window of one step of someone else's long video (no lock: it is a single forward)."""
        device = self.pipe.bundle.device

        def run():
            with torch.no_grad():
                return predict_window(self.pipe.bundle, x.to(device), t.to(device), embeds.to(device),
                                      guidance).cpu()

        return await asyncio.to_thread(run)

    def _remote_predictor(self):
        """Predict each step's windows on the Denoiser replicas (this one included) and gather them."""
        ctx = serve.get_replica_context()
        peers = serve.get_deployment_handle(ctx.deployment, app_name=ctx.app_name)
        device = self.pipe.bundle.device

        def predict(xs, t, embeds, guidance):
            calls = [peers.predict_window.remote(x.cpu(), t.cpu(), e.cpu(), guidance) for x, e in zip(xs, embeds)]
            return [c.result().to(device) for c in calls]

        return predict

    async def denoise(self, params: dict, embeds: torch.Tensor, negative: torch.Tensor):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def run():
            progress = lambda i, n: loop.call_soon_threadsafe(events.put_nowait, (i, n))  # noqa: E731
            with self._lock:
                if "program" in params:  # a whole programme, audio included: stored as made
                    return stages.program_job(self.pipe, params, progress)
                if stages.is_composed(params):  # long / multi-shot / post-processed
                    predictor = self._remote_predictor() if self.fan_out else None
                    return stages.compose_job(self.pipe, params, progress, predictor)
                return stages.denoise(self.pipe, params, embeds, negative, progress)

        task = asyncio.ensure_future(asyncio.to_thread(run))
        while not task.done() or not events.empty():
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield ("progress", *getter.result())
            else:
                getter.cancel()
        result = task.result()
        if "program" in params:
            yield ("program", result)
        else:
            yield ("frames", result) if stages.is_composed(params) else ("latents", result.cpu())


@serve.deployment
class Decoder:
    """VAE decode, video encode, and the upload of the mp4 and its thumbnail to the job store."""

    def __init__(self, model: str | None = None, precision: str = "fp32", threads: int | None = None):
        self.pipe = _pipeline(model, precision, threads)
        self._lock = threading.Lock()

    async def finish(self, latents: torch.Tensor | None, fps: float, store: str, job_id: str, frames=None,
                     prompt: str | None = None) -> dict:
        def run():
            with self._lock:
                result = stages.finish(self.pipe, latents, fps, frames, prompt)
            JobStore(store).put_content(job_id, result.video, result.thumbnail)
            return {"timings": result.timings, "quality": result.quality}

        return await asyncio.to_thread(run)


class ServeGenerator:
    """The job service's generator over the graph's handles (the Decoder stores the content itself)."""

    def __init__(self, encoder, denoiser, decoder, store: str):
        self.encoder, self.denoiser, self.decoder, self.store = encoder, denoiser, decoder, store
        self.version = None

    async def validate(self, fields: dict) -> dict:
        return await self._checked(self.encoder.validate, fields)

    async def validate_program(self, fields: dict) -> dict:
        return await self._checked(self.encoder.validate_program, fields)

    async def _checked(self, method, fields: dict) -> dict:
        if self.version is None:
            self.version = await self.encoder.version.remote()
        try:
            return await method.remote(fields)
        except Exception as e:  # a replica's InputError arrives wrapped in Ray's task error: unwrap it for a 400
            cause = getattr(e, "cause", None)
            if isinstance(cause, InputError):
                raise cause from None
            raise

    async def generate(self, params: dict, progress, job_id: str) -> stages.GeneratedVideo:
        import time

        t0 = time.perf_counter()
        embeds, negative = await self.encoder.encode.remote((params["prompt"], params["negative_prompt"]))
        t1 = time.perf_counter()
        result = {}
        async for event in self.denoiser.options(stream=True).denoise.remote(params, embeds, negative):
            if event[0] == "progress":
                progress(event[1], event[2])
            else:
                result[event[0]] = event[1]
        t2 = time.perf_counter()
        if "program" in result:  # finished in the Denoiser replica (audio and all)
            made = result["program"]
            return stages.GeneratedVideo(video=made.video, thumbnail=made.thumbnail, timings=made.timings)
        done = await self.decoder.finish.remote(result.get("latents"), params["fps"], self.store, job_id,
                                                frames=result.get("frames"), prompt=params["prompt"])
        return stages.GeneratedVideo(video=None, thumbnail=None, quality=done["quality"],
                                     timings={**done["timings"], "encode_prompt_s": t1 - t0, "denoise_s": t2 - t1})


@serve.deployment
@serve.ingress()
class Ingress:
    """The job API (FastAPI) and the web UI; the job queue lives here, so keep one replica."""

    def __init__(self, encoder, denoiser, decoder, settings: dict | None = None):
        self.settings = Settings.from_dict(settings)
        self.generator = ServeGenerator(encoder, denoiser, decoder, self.settings.store)

    def __serve_build_asgi_app__(self):
        self._asgi = create_app(self.generator, self.settings)  # ("app" is taken by serve.ingress)
        return self._asgi

    async def check_health(self):
        # Serve calls this periodically in the replica's loop: (re)start the workers, which also re-queues
        # jobs left unfinished by a previous run, even before the first request arrives.
        self._asgi.state.service.ensure_started()


def build_app(args: dict):
    """`serve run` / `serve deploy` entry point: args are the application's `args` in the YAML config."""
    args = dict(args or {})
    allowed = {"model", "precision", "threads", "fan_out", "settings"}
    if set(args) - allowed:
        raise ValueError(f"unknown application args: {', '.join(sorted(set(args) - allowed))} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    stage = (args.get("model"), args.get("precision", "fp32"), args.get("threads"))
    denoiser = Denoiser.bind(*stage, args.get("fan_out", True))
    return Ingress.bind(TextEncoder.bind(*stage), denoiser, Decoder.bind(*stage), args.get("settings"))
