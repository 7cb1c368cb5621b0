"""The Ray Serve graph: TextEncoder -> Denoiser -> Decoder, behind the job API's Ingress.

    serve run serve_configs/t2v.yaml

Each deployment is a thin shell over `stages.py`; replicas, autoscaling and `ray_actor_options` (GPUs, CPUs)
come from the YAML config, not from here. The graph is bound once, in `build_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import ray
import torch
from ray import serve

from .. import lora
from ..errors import InputError, JobCancelled
from .. import parallel
from ..runtime import RuntimeOptions
from ..sampling import bundle_forward
from . import stages
from .api import create_app
from .ranks import parse_parallel, start_ranks
from .store import JobStore
from .faults import ReplicaStalled, seconds, until_stalled
from .service import Settings

log = logging.getLogger("ray.serve")  # Serve writes this logger to the replica's own log file


@serve.deployment
class TextEncoder:
    """Checks requests against the model's limits and encodes prompts, batching concurrent requests. Holds
    the text encoder's weights only."""

    def __init__(self, model: str | None = None, precision: str = "fp32", threads: int | None = None,
                 runtime: dict | None = None):
        self.pipe = stages.stage_pipeline(model, precision, threads, runtime, weights=("text_encoder",))

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
    """The denoiser and its scheduler; streams ("progress", step, total) events, then ("sampled", `stages.Sampled`):
    a clip's latents, a composed video's frames (after its windows and post-processing) or a finished programme.

    step_batching ({max_batch_size, wait_s}, from the YAML): concurrent jobs' sampling loops run side by side
    and every forward goes through one `@serve.batch` queue, so the steps waiting at the same moment run as one
    batch (`sampling.predict_batch`). That pays where a forward is launch-bound (a GPU at these sizes); on a
    CPU a forward is compute-bound, and jobs run one loop at a time instead.

    adapters ({root, max_per_replica}): LoRA adapters by name under root, loaded as jobs ask for them and kept
    in an LRU of max_per_replica per replica by Serve's model multiplexing, which also routes a job to a replica
    that has its adapter loaded. A batch of steps never mixes two adapters.

    window_timeout_s: a long video's window sent to a replica and not answered in this long is cancelled and
    sent again (`answered`).

    expert (a mixture of experts served split, `experts: split`): 0 or 1, the one expert whose weights this
    deployment holds and whose steps it takes; expert 0 streams ("sampled", Sampled with the handover), and
    expert 1's `denoise` goes on from it."""

    def __init__(self, model: str | None = None, precision: str = "fp32", threads: int | None = None,
                 fan_out: bool = True, step_batching: dict | None = None, runtime: dict | None = None,
                 parallel: dict | None = None, adapters: dict | None = None, expert: int | None = None,
                 window_timeout_s: float = 300.0):
        layout, rank_options = parse_parallel(parallel)
        adapter_root, per_replica = parse_adapters(adapters)
        if adapter_root and layout.ranks > 1:
            raise ValueError("adapters need a single-rank Denoiser (parallel layouts do not load adapters yet)")
        if (runtime or {}).get("cache") and (step_batching or fan_out or layout.ranks > 1):
            # A step cache keeps each latent's last step in this replica's transformer hooks: a batch of other
            # jobs' steps, or a window predicted on another replica, would compare against the wrong state; split
            # over ranks, each rank would decide on its own half or shard (and a sequence split's collectives
            # would wait for a rank that skipped).
            raise ValueError("runtime.cache needs step_batching: null, fan_out: false and no parallel layout (a "
                             "step cache lives in one replica, per sampling loop)")
        if step_batching and "expert_offload" in RuntimeOptions.parse(**(runtime or {})).memory:
            # Batched jobs straddling the switch would need both experts every step: each a move on and off the GPU.
            raise ValueError("runtime.memory expert_offload needs step_batching: null (jobs batched on both sides of "
                             "the switch would move an expert on and off the device at every step); or serve the "
                             "experts split (experts: split)")
        # Every weight (programmes encode prompts here too), but the other expert's when the experts are split.
        other = {0: "denoiser_2", 1: "denoiser"}.get(expert)
        self.pipe = stages.stage_pipeline(model, precision, threads, runtime,
                                          tuple(c for c in stages.COMPONENTS if c != other))
        self.expert = expert
        self._version = stages.model_version(self.pipe.bundle)
        self._lock = threading.Lock()  # one sampling loop at a time, or one VAE user when steps are batched
        self.fan_out = fan_out  # long videos: each step's windows go to every Denoiser replica
        self.window_timeout_s = float(window_timeout_s)
        self.step_batching = step_batching
        if step_batching:
            unknown = set(step_batching) - {"max_batch_size", "wait_s"}
            if unknown:
                raise ValueError(f"unknown step_batching keys: {', '.join(sorted(unknown))} "
                                 "(allowed: max_batch_size, wait_s)")
            self._forward.set_max_batch_size(int(step_batching.get("max_batch_size", 8)))
            self._forward.set_batch_wait_timeout_s(float(step_batching.get("wait_s", 0.002)))
        self._ranks = start_ranks(self.pipe.bundle, layout, rank_options, (model, precision, threads, runtime))
        bundle = self.pipe.bundle

        async def load_adapter(name: str) -> lora.Loaded:
            return await asyncio.to_thread(lora.Loaded, bundle, adapter_root, name)

        self._adapter = serve.multiplexed(max_num_models_per_replica=per_replica)(load_adapter)
        self.adapter_root = adapter_root
        if self._ranks:
            log.info("Denoiser parallel layout %s: %d ranks", layout.name, layout.ranks)

    def check_health(self):
        # A rank that died takes the layout with it: an unhealthy replica is replaced, ranks and all.
        if self._ranks:
            import ray

            ray.get([r.ping.remote() for r in self._ranks], timeout=30)

    def version(self) -> str:
        """The model's fingerprint (the result cache's key), from the replica that holds every weight."""
        return self._version

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def _forward(self, requests: list[tuple], choices: list) -> list[tuple[torch.Tensor, int]]:
        """The forwards waiting now, from any job or window, as one batch per adapter (`choices`, None for the
        base model): (prediction, the size of the batch it rode in) each."""
        bundle = self.pipe.bundle

        def run():
            with torch.no_grad():
                return lora.by_adapter(requests, choices, lambda choice, group: lora.with_adapter(
                    bundle, choice, bundle_forward(bundle, batched=True))(group))

        sizes = [choices.count(c) for c in choices]
        return list(zip(await asyncio.to_thread(run), sizes))

    async def predict_window(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance: float,
                             strength: float = 1.0):
        """One window of one step of someone else's long video (no lock: it is a single forward), with the
        adapter the call was routed by (its multiplexed model id) at `strength`."""
        device = self.pipe.bundle.device
        x, t, embeds = x.to(device), t.to(device), embeds.to(device)
        name = serve.get_multiplexed_model_id()
        choice = lora.Choice(name, strength) if name else None
        adapter = await self._adapter(name) if name else None
        with adapter.in_use() if adapter else contextlib.nullcontext():
            if self.step_batching:
                return (await self._forward((x, t, embeds, guidance), choice))[0].cpu()

            def run():
                with torch.no_grad():
                    forward = lora.with_adapter(self.pipe.bundle, choice, bundle_forward(self.pipe.bundle))
                    return forward([(x, t, embeds, guidance)])[0].cpu()

            return await asyncio.to_thread(run)

    def _remote_predictor(self, choice: lora.Choice | None):
        """Predict each step's windows on the Denoiser replicas (this one included) and gather them, routed to
        replicas that have the job's adapter loaded."""
        device = self.pipe.bundle.device
        peers = []  # their handle, got at the first step: a job without windows never needs one

        def predict(xs, t, embeds, guidance):
            if not peers:
                ctx = serve.get_replica_context()
                handle = serve.get_deployment_handle(ctx.deployment, app_name=ctx.app_name)
                peers.append(handle.options(multiplexed_model_id=choice.name) if choice else handle)
            strength = choice.strength if choice else 1.0
            senders = [lambda x=x, e=e: peers[0].predict_window.remote(x.cpu(), t.cpu(), e.cpu(), guidance, strength)
                       for x, e in zip(xs, embeds)]
            calls = [send() for send in senders]
            return [answered(c, send, self.window_timeout_s).to(device) for c, send in zip(calls, senders)]

        return predict

    def _batched_predictor(self, loop: asyncio.AbstractEventLoop, batch_sizes: list[int],
                           choice: lora.Choice | None):
        """For a sampling loop in a worker thread: its forwards join the replica's batch queue (the sizes of
        the batches they rode in are appended to batch_sizes)."""
        def predict(xs, t, embeds, guidance):
            calls = [asyncio.run_coroutine_threadsafe(self._forward((x, t, e, guidance), choice), loop)
                     for x, e in zip(xs, embeds)]
            results = [c.result() for c in calls]
            batch_sizes.extend(n for _, n in results)
            return [pred for pred, _ in results]

        return predict

    async def denoise(self, params: dict, embeds: torch.Tensor, negative: torch.Tensor, handover=None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        batch_sizes: list[int] = []
        cancel = threading.Event()
        last = [0, 0]  # the last step reported, of how many
        choice = lora.choice_of(params)
        adapter = await self._adapter(choice.name) if choice else None  # loaded here, or found in the LRU

        def run():
            def progress(i, n):
                last[:] = i, n
                loop.call_soon_threadsafe(events.put_nowait, (i, n))

            batched = self._batched_predictor(loop, batch_sizes, choice) if self.step_batching else None
            windows = self._remote_predictor(choice) if self.fan_out else batched
            with adapter.in_use() if adapter else contextlib.nullcontext():
                return stages.run_job(self.pipe, params, progress, (embeds, negative), predictor=batched,
                                      window_predictor=windows, lock=self._lock, cancel=cancel,
                                      expert=self.expert, handover=handover)

        def stopped(task):  # the operator's trace that a cancelled job freed the replica (tests read it too)
            if not task.cancelled() and isinstance(task.exception(), JobCancelled):
                log.info("sampling stopped after step %d of %d: the job was cancelled", *last)

        task = asyncio.ensure_future(asyncio.to_thread(run))
        task.add_done_callback(stopped)
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield ("progress", *getter.result())
                else:
                    getter.cancel()
        finally:
            # The caller cancelled the call (a cancelled or deleted job: CancelledError here) or closed the
            # stream: the worker thread cannot be interrupted, so it is told to stop at its next step, which
            # frees the lock for the next job. After a normal end the thread is done and this changes nothing.
            cancel.set()
        sampled = task.result()
        if batch_sizes:  # the largest batch this job's steps shared (observability: is batching happening?)
            yield ("step_batch_max", max(batch_sizes))
        if sampled.latents is not None:
            sampled.latents = sampled.latents.cpu()
        # The node too: on a cluster, which machine made a video (and whether a retried job moved).
        yield ("served_by", {**parallel.layout_of(self.pipe.bundle).describe(),
                             "node": ray.get_runtime_context().get_node_id()})
        yield ("sampled", sampled)


def answered(call, send, timeout_s: float, sends: int = 3):
    """The result of a handle call (`call`, sent by `send`) that is safe to send again: one not answered within
    timeout_s is cancelled and sent again, `sends` times in all. A window's response has been seen lost between
    replicas, leaving its job waiting for ever; a window is a pure function of its inputs, so a second send
    gives the same prediction."""
    for attempt in range(1, sends + 1):
        try:
            return call.result(timeout_s=timeout_s)
        except TimeoutError:
            call.cancel()
            if attempt == sends:
                raise TimeoutError(f"no answer from a Denoiser replica in {timeout_s} s, {sends} times "
                                   "(window_timeout_s)") from None
            log.warning("a window was not answered in %s s (window_timeout_s): sent again", timeout_s)
            call = send()


def parse_adapters(options: dict | None) -> tuple[str | None, int]:
    """A Serve config's `adapters` ({root, max_per_replica}) -> (root, the LRU's size per Denoiser replica)."""
    options = dict(options or {})
    unknown = set(options) - {"root", "max_per_replica"}
    if unknown:
        raise ValueError(f"unknown adapters keys: {', '.join(sorted(unknown))} (allowed: root, max_per_replica)")
    per_replica = int(options.get("max_per_replica", 4))
    if per_replica < 1:
        raise ValueError(f"adapters.max_per_replica: {per_replica} is not ≥ 1")
    return options.get("root"), per_replica


@serve.deployment
class Decoder:
    """VAE decode, video encode, the upload of the mp4 and its thumbnail to the job store, then quality scores.
    Streams ("stored", timings) as soon as the video is stored, then ("quality", scores)."""

    def __init__(self, model: str | None = None, precision: str = "fp32", threads: int | None = None,
                 runtime: dict | None = None):
        self.pipe = stages.stage_pipeline(model, precision, threads, runtime, weights=("vae",))  # the VAE's only
        self._lock = threading.Lock()

    async def finish(self, latents: torch.Tensor | None, fps: float, store: str, job_id: str, frames=None,
                     prompt: str | None = None):
        def run():
            with self._lock:
                made = stages.finish(self.pipe, latents, fps, frames)
            JobStore(store).put_content(job_id, made.video, made.thumbnail)
            return made

        made = await asyncio.to_thread(run)
        yield ("stored", made.timings)
        yield ("quality", await asyncio.to_thread(stages.score, made.frames, prompt))


class ServeGenerator:
    """The job service's generator over the graph's handles (the Decoder stores the content itself). low_noise:
    a mixture's low-noise expert's Denoiser when the experts are served split (`denoiser` is the high-noise one)."""

    def __init__(self, encoder, denoiser, decoder, store: str, low_noise=None, stall_timeout_s: float = 1800.0):
        self.encoder, self.denoiser, self.decoder, self.store = encoder, denoiser, decoder, store
        self.low_noise, self.stall_timeout_s = low_noise, stall_timeout_s
        self.version = None

    async def validate(self, fields: dict) -> dict:
        params = await self._checked(self.encoder.validate, fields)
        if self.low_noise is not None and params["kind"] != "video":
            raise InputError("seconds" if "plan" in params else "prompt", "this server runs each expert of the "
                             "mixture on replicas of its own, which make one clip at a time: no long, multi-shot or "
                             "post-processed videos", "a single clip (or a server with experts: single)")
        return params

    async def validate_program(self, fields: dict) -> dict:
        if self.low_noise is not None:
            raise InputError("kind", "this server runs each expert of the mixture on replicas of its own: programmes "
                             "need a server with experts: single")
        return await self._checked(self.encoder.validate_program, fields)

    async def _checked(self, method, fields: dict) -> dict:
        if self.version is None:
            versions = [await d.version.remote() for d in (self.denoiser, self.low_noise) if d is not None]
            self.version = "+".join(versions)
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
        # A job with an adapter goes to a replica that has it loaded, where one does (Serve's multiplexing).
        adapter = (params.get("lora") or {}).get("name", "")
        result = await self._denoise(self.denoiser, adapter, progress, params, embeds, negative)
        if self.low_noise is not None:  # the high-noise expert handed over at the switch: the low-noise one goes on
            result.update(await self._denoise(self.low_noise, adapter, progress, params, embeds, negative,
                                              result["sampled"].handover))
        t2 = time.perf_counter()
        sampled = result["sampled"]
        if sampled.finished is not None:  # a programme, finished in the Denoiser replica (audio and all)
            sampled.finished.served_by = result.get("served_by")
            return sampled.finished
        finished = self.decoder.options(stream=True).finish.remote(
            sampled.latents, params["fps"], self.store, job_id, frames=sampled.frames, prompt=params["prompt"])
        _, timings = await finished.__anext__()  # stored: the job is complete

        async def quality() -> dict:
            return (await finished.__anext__())[1]

        timings.update(encode_prompt_s=t1 - t0, denoise_s=t2 - t1)
        if "step_batch_max" in result:
            timings["step_batch_max"] = result["step_batch_max"]
        return stages.GeneratedVideo(video=None, thumbnail=None, quality_later=quality(), timings=timings,
                                     served_by=result.get("served_by"))

    async def _denoise(self, denoiser, adapter: str, progress, *args) -> dict:
        """A Denoiser's stream for one job: progress forwarded, the other events collected by name."""
        result = {}
        stream = denoiser.options(stream=True, multiplexed_model_id=adapter).denoise.remote(*args)
        try:
            async for event in until_stalled(stream, self.stall_timeout_s):
                if event[0] == "progress":
                    progress(event[1], event[2])
                else:
                    result[event[0]] = event[1]
        except (asyncio.CancelledError, ReplicaStalled):  # cancelled, deleted or stalled: the replica stops
            stream.cancel()
            raise
        return result


@serve.deployment
@serve.ingress()
class Ingress:
    """The job API (FastAPI) and the web UI; the job queue lives here, so keep one replica. Its API keys come
    from this replica's environment (T2V_API_KEYS / T2V_API_KEYS_FILE, auth.py), never from its args."""

    def __init__(self, encoder, denoiser, decoder, settings: dict | None = None, low_noise=None):
        self.settings = Settings.from_dict(settings)
        self.generator = ServeGenerator(encoder, denoiser, decoder, self.settings.store, low_noise,
                                        self.settings.stall_timeout_s)

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
    allowed = {"model", "precision", "threads", "fan_out", "window_timeout_s", "step_batching", "runtime", "parallel",
               "adapters", "settings", "experts"}
    if set(args) - allowed:
        raise ValueError(f"unknown application args: {', '.join(sorted(set(args) - allowed))} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    # Checked at build time, before any replica starts (keys in args, bad values); the keys file may exist only
    Settings.from_dict(args.get("settings"), environ={})  # where the replicas run, so no environment here
    runtime = args.get("runtime") or {}
    RuntimeOptions.parse(**runtime)  # a bad option fails the deploy here, naming it, not in every replica
    parse_parallel(args.get("parallel"))
    adapters = dict(args.get("adapters") or {})
    if adapters.get("root") is None and args.get("model") in (None, "default"):
        adapters["root"] = str(lora.DEFAULT_ROOT)  # the embedded model's own adapters
    adapter_root, _ = parse_adapters(adapters)
    settings = dict(args.get("settings") or {})
    if adapter_root:  # the Ingress lists and checks adapters where the Denoiser replicas load them
        settings["adapter_root"] = adapter_root
    experts = args.get("experts", "single")
    if experts not in ("single", "split"):
        raise ValueError(f"experts: {experts!r} (allowed: single, both experts of a mixture on each Denoiser replica; "
                         "split, each on a deployment of its own: Denoiser and LowNoiseDenoiser)")
    stage = (args.get("model"), args.get("precision", "fp32"), args.get("threads"))
    denoiser_args = (*stage, args.get("fan_out", True), args.get("step_batching"), runtime, args.get("parallel"),
                     adapters)
    timeout = {"window_timeout_s": seconds("window_timeout_s", args.get("window_timeout_s", 300.0))}
    if experts == "single":
        denoiser, low_noise = Denoiser.bind(*denoiser_args, **timeout), None
    else:  # the high-noise expert's replicas hand each job over to the low-noise expert's
        denoiser = Denoiser.bind(*denoiser_args, expert=0, **timeout)
        low_noise = Denoiser.options(name="LowNoiseDenoiser").bind(*denoiser_args, expert=1, **timeout)
    return Ingress.bind(TextEncoder.bind(*stage, runtime), denoiser, Decoder.bind(*stage, runtime), settings,
                        low_noise)
