"""The HTTP API: asynchronous video jobs in the shape of the OpenAI Videos API, and the web UI at /.

`create_app(generator, settings)` works with any generator that has `validate(fields)`, `generate(params,
progress)` and `version`: `stages.LocalGenerator` (one process, no Ray) or the Serve graph's handles
(`deployments.py`). Jobs live in a `JobStore`, so a restart loses none: queued and interrupted jobs are queued
again when the service starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..errors import InputError
from .jobs import JobStore, PriorityQueue, QueueWeights, VideoJob, canonical_hash, credit_cost, parse_priority

log = logging.getLogger("t2v.serve")
UI = Path(__file__).with_name("ui.html")


@dataclass
class Settings:
    store: str = "out/serve"  # job records and videos: a folder or s3:// prefix
    model_name: str = "t2v-default"  # what "model" must be (or omitted)
    api_keys: dict = field(default_factory=dict)  # key -> user level; empty: no authentication
    max_queued: int = 64  # beyond this, 429 with Retry-After
    max_body_bytes: int = 64 * 1024
    concurrency: int = 1  # jobs generating at once (the denoiser replicas' capacity)
    cache_ttl_s: float = 24 * 3600  # result cache: same canonical request -> the finished video
    content_ttl_s: float = 7 * 24 * 3600  # expires_at of a finished video
    poll_after_ms: int = 500
    presign_expiry_s: int = 3600  # S3 stores: finished jobs carry a presigned download URL valid this long
    queue_weights: QueueWeights = field(default_factory=QueueWeights)

    @classmethod
    def from_dict(cls, values: dict | None) -> "Settings":
        values = dict(values or {})
        if "queue_weights" in values:
            values["queue_weights"] = QueueWeights(**values["queue_weights"])
        return cls(**values)


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


class JobService:
    """Accepts jobs, orders them, runs them on the generator, and keeps every state change in the store."""

    def __init__(self, generator, settings: Settings):
        self.generator, self.settings = generator, settings
        self.store = JobStore(settings.store)
        self.queue = PriorityQueue(settings.queue_weights)
        self.running: dict[str, VideoJob] = {}
        self._wakeup: asyncio.Event | None = None
        self._workers: list[asyncio.Task] = []
        self._scoring: set[asyncio.Task] = set()
        self._recovered = False
        self._typical_s: float | None = None  # moving average of recent jobs' generation time

    # -- lifecycle ------------------------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the workers in the running event loop (idempotent), after re-queuing unfinished jobs."""
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
                     program: bool = False) -> VideoJob:
        body_hash = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        if idempotency_key:
            seen = self.store.idempotent(idempotency_key)
            if seen:
                if seen["body_hash"] != body_hash:
                    raise APIError(422, "Idempotency-Key was already used with a different request body",
                                   param="Idempotency-Key", code="idempotency_key_reused")
                job = self.get(seen["job_id"])
                if job:
                    return job
        model = fields.get("model") or self.settings.model_name
        if model != self.settings.model_name:
            raise APIError(400, f"model {model!r} is not served here", param="model", code="model_not_found")
        priority = parse_priority(fields.get("priority", 5))
        params = await (self.generator.validate_program(fields) if program else self.generator.validate(fields))
        now = time.time()
        job = VideoJob(
            id=VideoJob.new_id(), prompt=params["original_prompt"], model=model, params=params,
            seconds=f"{(params['num_frames'] - 1) / params['fps']:g}", size=f"{params['width']}x{params['height']}",
            created_at=int(now), created_ts=now, priority=priority, user_level=user_level, enqueued_at=now,
            cost=credit_cost(params["num_frames"], params["width"], params["height"], params["num_inference_steps"],
                             params["guidance_scale"] > 1),
            request_hash=canonical_hash(params, self.generator.version))
        cached = self.store.cached(job.request_hash, now)
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
        if idempotency_key:
            self.store.remember_idempotent(idempotency_key, job.id, body_hash)
        return job

    def poll_after_ms(self) -> int:
        """How long a client should wait before polling again: about a twentieth of a typical job (the
        official client keeps the first value it gets), at most settings.poll_after_ms."""
        if self._typical_s is None:
            return self.settings.poll_after_ms
        return int(min(self.settings.poll_after_ms, max(50, self._typical_s * 1000 / 20)))

    def get(self, job_id: str) -> VideoJob | None:
        return self.running.get(job_id) or self.store.get(job_id)

    def delete(self, job_id: str) -> bool:
        if not self.get(job_id):
            return False
        self.queue.remove(job_id)
        self.running.pop(job_id, None)  # a running job's result is dropped when it finishes
        self.store.delete(job_id)
        return True

    # -- the workers ------------------------------------------------------------------------------------------
    async def _work(self) -> None:
        while True:
            job = self.queue.pop()
            if job is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._run(job)

    async def _run(self, job: VideoJob) -> None:
        job.status, job.attempts = "in_progress", job.attempts + 1
        self.running[job.id] = job
        self.store.save(job)
        last_saved = [0]

        def progress(step: int, total: int) -> None:
            job.progress = min(99, int(100 * step / total))
            if job.progress - last_saved[0] >= 20:  # a durable trace of progress, not a write per step
                last_saved[0] = job.progress
                if job.id in self.running:
                    self.store.save(job)

        t0 = time.perf_counter()
        try:
            result = await self.generator.generate(job.params, progress, job.id)
        except Exception as e:  # noqa: BLE001 - any failure becomes the job's reason
            log.exception("job %s failed", job.id)
            job.status, job.error = "failed", {"code": "generation_failed", "message": f"{type(e).__name__}: {e}"}
        else:
            if job.id not in self.running:  # deleted meanwhile: drop what the generator stored
                self.store.delete(job.id)
                if result.quality_later is not None:
                    result.quality_later.close()
                return
            if result.video is not None:  # else the generator stored it (the Serve graph's Decoder)
                self.store.put_content(job.id, result.video, result.thumbnail)
            job.status, job.progress = "completed", 100
            job.timings = {**result.timings, "total_s": time.perf_counter() - t0}
            if "program" not in job.params:
                total = job.timings["total_s"]
                self._typical_s = total if self._typical_s is None else 0.7 * self._typical_s + 0.3 * total
            job.expires_at = int(time.time() + self.settings.content_ttl_s)
            self.store.remember_result(job.request_hash, job.id, time.time() + self.settings.cache_ttl_s)
        job.completed_at = int(time.time())
        if self.running.pop(job.id, None) is not None:
            self.store.save(job)
            if job.status == "completed" and result.quality_later is not None:
                task = asyncio.get_running_loop().create_task(self._score(job, result.quality_later))
                self._scoring.add(task)
                task.add_done_callback(self._scoring.discard)

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


def create_app(generator, settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    service = JobService(generator, settings)
    app = FastAPI(title="t2v", description="Text-to-video jobs in the OpenAI Videos API shape")
    app.state.service = service

    @app.on_event("startup")
    async def _start() -> None:
        service.ensure_started()

    @app.on_event("shutdown")
    async def _stop() -> None:
        await service.stop()

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(InputError)
    async def _input_error(_request, exc: InputError):
        return APIError(400, str(exc), param=exc.field, code="invalid_value").response()

    def user_level(request: Request) -> int:
        if not settings.api_keys:
            return 0
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        level = None
        for key, lvl in settings.api_keys.items():  # compare against every key: no early exit to time
            if hmac.compare_digest(given.encode(), str(key).encode()):
                level = int(lvl)
        if level is None:
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type_="authentication_error", code="invalid_api_key")
        return level

    def job_or_404(job_id: str) -> VideoJob:
        job = service.get(job_id)
        if job is None:
            raise APIError(404, f"no video with id {job_id!r}", param="video_id", code="not_found")
        return job

    def show(job: VideoJob) -> dict:
        body = job.to_api()
        if job.status == "completed":
            body["t2v"]["download_url"] = service.store.content_url(job.id, expires_s=settings.presign_expiry_s)
        return body

    def poll_headers(job: VideoJob) -> dict:
        return {"openai-poll-after-ms": str(service.poll_after_ms())} if job.status in ("queued", "in_progress") else {}

    @app.post("/v1/videos")
    async def create_video(request: Request):
        level = user_level(request)
        length = request.headers.get("content-length")
        if length and int(length) > settings.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes", param="body", code="body_too_large")
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            raise APIError(413, f"request body is {len(body)} bytes (limit {settings.max_body_bytes})",
                           param="body", code="body_too_large")
        kind = request.headers.get("content-type", "")
        if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            fields = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        else:
            try:
                fields = json.loads(body or b"{}")
            except ValueError:
                raise APIError(400, "the body is not valid JSON", param="body", code="invalid_json") from None
            if not isinstance(fields, dict):
                raise APIError(400, "the body must be a JSON object", param="body", code="invalid_json")
        service.ensure_started()
        job = await service.create(fields, level, request.headers.get("idempotency-key"))
        return JSONResponse(show(job), headers=poll_headers(job))

    @app.post("/v1/programs")
    async def create_program(request: Request):
        """An education / ad / news programme (t2v.programs) as a video job: poll and download it as a video."""
        level = user_level(request)
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            raise APIError(413, f"request body is {len(body)} bytes (limit {settings.max_body_bytes})",
                           param="body", code="body_too_large")
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            raise APIError(400, "the body is not valid JSON", param="body", code="invalid_json") from None
        service.ensure_started()
        job = await service.create(fields, level, request.headers.get("idempotency-key"), program=True)
        return JSONResponse(show(job), headers=poll_headers(job))

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str, request: Request):
        user_level(request)
        service.ensure_started()
        job = job_or_404(video_id)
        return JSONResponse(show(job), headers=poll_headers(job))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request, variant: str = "video"):
        user_level(request)
        job = job_or_404(video_id)
        if variant not in ("video", "thumbnail"):
            raise APIError(400, f"unknown variant {variant!r} (allowed: video, thumbnail)", param="variant",
                           code="invalid_value")
        if job.status != "completed":
            raise APIError(409, f"video {video_id} is {job.status}; content exists once it is completed",
                           param="video_id", code="video_not_ready")
        data = service.store.content(job.id, variant)
        return Response(data, media_type="image/png" if variant == "thumbnail" else "video/mp4")

    @app.get("/v1/videos")
    async def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc"):
        user_level(request)
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit {limit} is out of range (allowed: 1 to 100)", param="limit",
                           code="invalid_value")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be asc or desc, got {order!r}", param="order", code="invalid_value")
        jobs = [service.get(j.id) or j for j in service.store.all()]
        if order == "desc":
            jobs.reverse()
        if after:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise APIError(400, f"unknown cursor {after!r}", param="after", code="invalid_value")
            jobs = jobs[ids.index(after) + 1:]
        page = jobs[:limit]
        return {"object": "list", "data": [show(j) for j in page],
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
                "has_more": len(jobs) > limit}

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str, request: Request):
        user_level(request)
        if not service.delete(video_id):
            raise APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/healthz")
    async def health():
        return {"status": "ok", "queued": len(service.queue), "running": len(service.running),
                "model": settings.model_name, "version": generator.version}

    @app.get("/v1/t2v/defaults")
    async def defaults(request: Request):
        """The served model's default parameters (the web UI starts from them)."""
        user_level(request)
        params = await generator.validate({"prompt": "-", "seed": 0})
        return {k: v for k, v in params.items() if k not in ("prompt", "negative_prompt", "seed")}

    @app.get("/", response_class=HTMLResponse)
    async def ui():
        return HTMLResponse(UI.read_text())

    return app
