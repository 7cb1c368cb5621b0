"""The job service: accepts jobs, orders them by priority, runs them on a generator and keeps every state
change in a `JobStore`, so a restart loses none (queued and interrupted jobs are queued again when it
starts). No HTTP here beyond the error shape; the routes are in `api.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from .. import lora
from ..errors import InputError, StorageError
from .auth import ANONYMOUS, APIKeys, refuse_keys_in_args
from .faults import failure, replica_died, seconds
from .store import JobStore, PriorityQueue, QueueWeights, VideoJob, canonical_hash, credit_cost, parse_priority

log = logging.getLogger("t2v.serve")
IDEMPOTENCY_WAIT_S = 30.0  # how long a repeated request waits for the first one with its key to make the job
IDEMPOTENCY_STALE_S = 120.0  # a reservation this old without its job: that request died, the key is free again
UNSAVED_RETRY_S = 2.0  # how often records the store refused are tried again (each try waits out its retries)


@dataclass
class Settings:
    """The job service's and its HTTP API's settings (the Ingress's `settings` in a Serve config)."""

    store: str = "out/serve"  # job records and videos: a folder or s3:// prefix
    model_name: str = "t2v-default"  # what "model" must be (or omitted), or "<model_name>+<adapter>"
    adapter_root: str | None = None  # LoRA adapters: a folder or s3:// prefix with one folder per adapter
    # sha256 digests -> user level (auth.py); empty: no authentication. From the environment in a Serve
    # config (from_dict); a {key: level} dict in-process. Never in repr, logs or the Serve config.
    api_keys: APIKeys = field(default_factory=APIKeys, repr=False)
    max_queued: int = 64  # beyond this, 429 with Retry-After
    max_body_bytes: int = 64 * 1024
    concurrency: int = 1  # jobs generating at once (the denoiser replicas' capacity)
    cache_ttl_s: float = 24 * 3600  # result cache: same canonical request -> the finished video
    content_ttl_s: float = 7 * 24 * 3600  # expires_at of a finished video
    poll_after_ms: int = 500
    presign_expiry_s: int = 3600  # S3 stores: finished jobs carry a presigned download URL valid this long
    queue_weights: QueueWeights = field(default_factory=QueueWeights)
    max_attempts: int = 2  # tries of a job whose replica dies under it (a replacement replica takes the next)
    stall_timeout_s: float = 1800.0  # a job's replica silent this long mid-job is taken for dead (ReplicaStalled)

    def __post_init__(self):
        self.stall_timeout_s = seconds("stall_timeout_s", self.stall_timeout_s)
        if not isinstance(self.api_keys, APIKeys):
            self.api_keys = APIKeys(self.api_keys)

    @classmethod
    def from_dict(cls, values: dict | None, environ: dict | None = None) -> "Settings":
        """The Serve config's settings; API keys from T2V_API_KEYS / T2V_API_KEYS_FILE (auth.py) in `environ`
        (default: this process's environment)."""
        values = dict(values or {})
        refuse_keys_in_args(values)
        values.pop("api_keys", None)  # an empty one, left from older configs
        if "queue_weights" in values:
            values["queue_weights"] = QueueWeights(**values["queue_weights"])
        return cls(**values, api_keys=APIKeys.from_environment(environ))


class APIError(Exception):
    """An error response in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


CANCELLED = {"code": "cancelled", "message": "the job was cancelled"}


class JobService:
    """Accepts jobs, orders them, runs them on the generator, and keeps every state change in the store."""

    def __init__(self, generator, settings: Settings):
        self.generator, self.settings = generator, settings
        self.store = JobStore(settings.store)
        self.queue = PriorityQueue(settings.queue_weights)
        self.running: dict[str, VideoJob] = {}
        self._unsaved: dict[str, VideoJob] = {}  # ended while the store refused writes: saved when it takes them
        self._next_save_s = 0.0  # time.monotonic() of the next try to save them
        self._generating: dict[str, asyncio.Task] = {}  # job id -> its generator call, cancelled to stop it
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self._scoring: set[asyncio.Task] = set()
        self._recovered = False
        self._typical_s: float | None = None  # moving average of recent jobs' generation time

    # -- lifecycle ------------------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the workers in the running event loop (idempotent), after re-queuing unfinished jobs."""
        if self._unsaved and time.monotonic() > self._next_save_s:
            self._save_unsaved()
        if self._workers and not all(t.done() for t in self._workers):
            return
        if not self._recovered:
            self._recovered = True
            for job in self.store.all():
                if job.status in ("queued", "in_progress"):
                    job.status, job.progress, job.enqueued_at = "queued", 0, time.time()
                    self.store.save(job)
                    self.queue.push(job)
                    log.info("re-queued %s after a restart", job.id)
        self._wakeup = asyncio.Event()
        if len(self.queue):
            self._wakeup.set()
        self._workers = [asyncio.get_running_loop().create_task(self._work())
                         for _ in range(self.settings.concurrency)]

    async def stop(self) -> None:
        tasks = self._workers + list(self._scoring)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._workers = []

    # -- requests --------------------------------------------------------------------------------------------
    async def create(self, fields: dict, user_level: int, idempotency_key: str | None,
                     program: bool = False, tenant: str = ANONYMOUS) -> VideoJob:
        if not idempotency_key:
            return await self._create(fields, user_level, program, tenant, VideoJob.new_id())
        body_hash = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        held = await self._reserve(tenant, idempotency_key, body_hash)
        if isinstance(held, VideoJob):
            return held
        try:
            job = await self._create(fields, user_level, program, tenant, held["job_id"])
        except BaseException:  # a refused (400, 429) or cancelled request binds nothing: the key may be retried
            self.store.release_idempotent(tenant, idempotency_key, held["job_id"])
            raise
        self.store.confirm_idempotent(tenant, idempotency_key, held)
        return job

    async def _reserve(self, tenant: str, key: str, body_hash: str) -> VideoJob | dict:
        """The job an earlier request with this tenant's Idempotency-Key made, or this request's reservation of
        the key. The reservation is atomic in the store, and the check and the reservation run with no await
        between them, so of concurrent requests one reserves and the others wait here for its job."""
        deadline, pause = time.monotonic() + IDEMPOTENCY_WAIT_S, 0.01
        while True:
            mine = VideoJob.new_id()
            entry = self.store.claim_idempotent(tenant, key, mine, body_hash)
            if entry is not None:
                if entry["job_id"] == mine:
                    return entry
                if entry["body_hash"] != body_hash:
                    raise APIError(422, "Idempotency-Key was already used with a different request body",
                                   param="Idempotency-Key", code="idempotency_key_reused")
                job = self.get(entry["job_id"])
                if job is not None:
                    return job
                if entry["state"] == "done" or time.time() - entry["at"] > IDEMPOTENCY_STALE_S:
                    # Its job was deleted since, or the request that reserved the key died: the key is free.
                    self.store.release_idempotent(tenant, key, entry["job_id"])
                    continue
            if time.monotonic() > deadline:
                raise APIError(409, "a request with this Idempotency-Key is still being processed; retry later",
                               param="Idempotency-Key", code="idempotency_key_in_use", headers={"Retry-After": "5"})
            pause = min(2 * pause, 0.5)  # the request holding the key is still validating: its job comes soon
            await asyncio.sleep(pause)

    def adapter_of(self, fields: dict, program: bool) -> tuple[str, lora.Choice | None]:
        """The model a job asks for, and its adapter: `model: "<model>+<adapter>"` or a `lora` field. An adapter
        that is not under the adapters root is a 404, as for an unknown model; nothing is queued."""
        from .requests import adapter_fields

        model, spec = adapter_fields(fields)
        base, plus, named = (model or self.settings.model_name).partition("+")
        if base != self.settings.model_name:
            raise APIError(400, f"model {base!r} is not served here", param="model", code="model_not_found")
        if plus and spec and spec["name"] != named:
            raise InputError("lora", f"names adapter {spec['name']!r}, but model names {named!r}")
        name, field_name = (named, "model") if plus else ((spec or {}).get("name"), "lora")
        if not name:
            return base, None
        choice = lora.Choice.parse(name, (spec or {}).get("strength", 1.0), field_name)
        if program:
            raise InputError(field_name, "programmes are made with the base model; adapters apply to videos")
        if not lora.exists(self.settings.adapter_root, name):
            raise APIError(404, f"adapter {name!r} does not exist on this server (GET /v1/models lists the models "
                           "and adapters)", param=field_name, code="model_not_found")
        return f"{base}+{name}", choice

    async def _create(self, fields: dict, user_level: int, program: bool, tenant: str, job_id: str) -> VideoJob:
        model, choice = self.adapter_of(fields, program)
        priority = parse_priority(fields.get("priority", 5))
        params = await (self.generator.validate_program(fields) if program else self.generator.validate(fields))
        if choice is not None:  # its version keys the result cache: a replaced adapter is not served from it
            params["lora"] = {"name": choice.name, "strength": choice.strength,
                              "version": lora.version(self.settings.adapter_root, choice.name)}
        now = time.time()
        job = VideoJob(
            id=job_id, prompt=params["original_prompt"], model=model, params=params, tenant=tenant,
            seconds=f"{(params['num_frames'] - 1) / params['fps']:g}", size=f"{params['width']}x{params['height']}",
            created_at=int(now), created_ts=now, priority=priority, user_level=user_level, enqueued_at=now,
            cost=credit_cost(params["num_frames"], params["width"], params["height"], params["num_inference_steps"],
                             params["guidance_scale"] > 1),
            request_hash=canonical_hash(params, self.generator.version))
        cached = self.store.cached(job.request_hash, now, tenant)
        if cached:
            self.store.put_content(job.id, self.store.content(cached.id), self.store.content(cached.id, "thumbnail"))
            job.status, job.progress, job.completed_at, job.cached_from = "completed", 100, int(now), cached.id
            job.expires_at, job.timings = int(now + self.settings.content_ttl_s), {"cached": True}
            job.quality = cached.quality
            self.store.save(job)
        else:
            if len(self.queue) >= self.settings.max_queued:
                raise APIError(429, f"the queue is full ({self.settings.max_queued} jobs); retry later",
                               type_="rate_limit_error", code="queue_full", headers={"Retry-After": "10"})
            self.store.save(job)
            self.queue.push(job)
            self.ensure_started()
            self._wakeup.set()
        return job

    def poll_after_ms(self) -> int:
        """How long a client should wait before polling again: about a twentieth of a typical job (the
        official client keeps the first value it gets), at most settings.poll_after_ms."""
        if self._typical_s is None:
            return self.settings.poll_after_ms
        return int(min(self.settings.poll_after_ms, max(50, self._typical_s * 1000 / 20)))

    def get(self, job_id: str) -> VideoJob | None:
        return self.running.get(job_id) or self._unsaved.get(job_id) or self.store.get(job_id)

    def delete(self, job_id: str) -> bool:
        if not self.get(job_id):
            return False
        self.queue.remove(job_id)
        self._stop(job_id)
        self._unsaved.pop(job_id, None)
        self.store.delete(job_id)
        return True

    def cancel(self, job_id: str) -> VideoJob | None:
        """Stop a queued or running job; its record stays, failed with code "cancelled" (the OpenAI video
        statuses have no cancelled one). A finished job is returned as it is."""
        job = self.get(job_id)
        if job is None or job.status not in ("queued", "in_progress"):
            return job
        self.queue.remove(job_id)
        self._stop(job_id)
        job.status, job.error, job.completed_at = "failed", dict(CANCELLED), int(time.time())
        self.store.save(job)
        return job

    def _stop(self, job_id: str) -> None:
        """A running job is no longer the service's (its result, if it still comes, is dropped), and its
        generator call is cancelled: the sampling stops at its next step, in this process or in a replica."""
        self.running.pop(job_id, None)
        task = self._generating.get(job_id)
        if task is not None:
            task.cancel()

    # -- the workers ------------------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job = self.queue.pop()
            if job is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._run(job)
            except Exception as e:  # noqa: BLE001 - the store refused a record: this worker goes on
                log.error("job %s: its record could not be saved", job.id, exc_info=e)
                self._end_unsaved(job, e)

    def _end_unsaved(self, job: VideoJob, error: Exception) -> None:
        """A job whose state the store refused: failed here, and saved once the store takes writes again (its
        stored record still says queued or in progress until then, so a restart would run it again)."""
        if self.running.pop(job.id, None) is None:
            return
        job.status, job.error, job.completed_at = "failed", failure(error), int(time.time())
        self._unsaved[job.id] = job

    def _save_unsaved(self) -> None:
        for job_id, job in list(self._unsaved.items()):
            try:
                self.store.save(job)
            except StorageError:
                self._next_save_s = time.monotonic() + UNSAVED_RETRY_S
                return
            self._unsaved.pop(job_id, None)

    async def _run(self, job: VideoJob) -> None:
        if self._unsaved:
            self._save_unsaved()
        job.status, job.attempts = "in_progress", job.attempts + 1
        self.running[job.id] = job
        self.store.save(job)
        last_saved = [0]

        def progress(step: int, total: int) -> None:
            job.progress = min(99, int(100 * step / total))
            if job.progress - last_saved[0] >= 20:  # a durable trace of progress, not a write per step
                last_saved[0] = job.progress
                if job.id in self.running:
                    try:
                        self.store.save(job)
                    except StorageError:  # only a trace: the job goes on
                        log.warning("job %s: its progress could not be saved", job.id)

        t0 = time.perf_counter()
        for attempt in range(1, max(1, self.settings.max_attempts) + 1):
            task = asyncio.ensure_future(self.generator.generate(job.params, progress, job.id))
            self._generating[job.id] = task
            try:
                await asyncio.wait({task})  # a cancelled job ends its task, not this worker
            except asyncio.CancelledError:  # the service stops: the job stays in progress, re-queued at start
                task.cancel()
                raise
            finally:
                self._generating.pop(job.id, None)
            if job.id not in self.running:  # cancelled or deleted meanwhile
                self._discard(job, task)
                return
            error = task.exception() if not task.cancelled() else asyncio.CancelledError()
            if error is None or not replica_died(error) or attempt >= self.settings.max_attempts:
                break
            log.warning("job %s: its replica died (attempt %d of %d), retrying: %r", job.id, attempt,
                        self.settings.max_attempts, error)
            job.progress, last_saved[0], job.attempts = 0, 0, job.attempts + 1
            self.store.save(job)
        if error is None:
            result = task.result()
            if result.video is not None:  # else the generator stored it (the Serve graph's Decoder)
                try:
                    self.store.put_content(job.id, result.video, result.thumbnail)
                except StorageError as e:
                    error = e
                    if result.quality_later is not None:
                        result.quality_later.close()  # no scores for a video that is not kept
        if error is not None:
            log.error("job %s failed", job.id, exc_info=error)
            job.status, job.error = "failed", failure(error)
            self._drop_content(job.id)  # a video an attempt (or the Decoder) stored before the failure
        else:
            job.status, job.progress = "completed", 100
            job.timings = {**result.timings, "total_s": time.perf_counter() - t0}
            job.served_by = result.served_by
            if job.kind != "program":  # a programme's length says nothing about a typical video's
                total = job.timings["total_s"]
                self._typical_s = total if self._typical_s is None else 0.7 * self._typical_s + 0.3 * total
            job.expires_at = int(time.time() + self.settings.content_ttl_s)
            try:  # the result cache is a shortcut: a job stands without its entry
                self.store.remember_result(job.request_hash, job.id, time.time() + self.settings.cache_ttl_s,
                                           job.tenant)
            except StorageError:
                log.warning("job %s: its result-cache entry could not be written", job.id)
        job.completed_at = int(time.time())
        if self.running.pop(job.id, None) is not None:
            try:
                self.store.save(job)
            except StorageError:
                log.exception("job %s ended %s; its record is saved once the store takes writes", job.id,
                              job.status)
                self._unsaved[job.id] = job
            if job.status == "completed" and result.quality_later is not None:
                scoring = asyncio.get_running_loop().create_task(self._score(job, result.quality_later))
                self._scoring.add(scoring)
                scoring.add_done_callback(self._scoring.discard)

    def _drop_content(self, job_id: str) -> None:
        try:
            self.store.delete_content(job_id)
        except StorageError:  # the store is down: a failed job's stray video is never served, only kept
            log.warning("job %s: its partial content could not be deleted", job_id)

    def _discard(self, job: VideoJob, task: asyncio.Task) -> None:
        """A cancelled or deleted job's generator call has ended: drop any video it stored (the Serve graph's
        Decoder stores it), and keep a cancelled job's record."""
        if not task.cancelled() and task.exception() is None:
            result = task.result()
            if result.quality_later is not None:
                result.quality_later.close()
        record = self.store.get(job.id)
        self.store.delete(job.id)
        if record is not None:
            self.store.save(record)

    async def _score(self, job: VideoJob, pending) -> None:
        """The quality scores arrive after the job completed; kept with the job unless it was deleted."""
        t0 = time.perf_counter()
        try:
            quality = await pending
        except Exception:  # noqa: BLE001 - the video stands without its scores
            log.exception("scoring %s failed", job.id)
            return
        if self.store.get(job.id) is not None:
            job.quality = quality
            job.timings["quality_after_s"] = time.perf_counter() - t0
            self.store.save(job)
