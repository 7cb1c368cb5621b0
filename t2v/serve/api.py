"""The HTTP API: asynchronous video jobs in the shape of the OpenAI Videos API, and the web UI at /.

`create_app(generator, settings)` works with any generator that has `validate(fields)`, `generate(params,
progress)` and `version`: `stages.LocalGenerator` (one process, no Ray) or the Serve graph's handles
(`deployments.py`). The jobs themselves are the `JobService`'s (`service.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .. import lora
from ..errors import InputError, StorageError
from .auth import ANONYMOUS
from .requests import IMAGE_FIELDS, invalid, program_fields, video_fields
from .store import VideoJob
from .faults import replica_died
from .service import APIError, JobService, Settings

log = logging.getLogger("t2v.serve")
UI = Path(__file__).with_name("ui.html")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def read_fields(request: Request, max_bytes: int) -> dict:
    """A request's body as fields: a JSON object, or a form's string fields; too large or not an object is
    a 4xx in the OpenAI error shape. The body is counted as it streams in and refused as soon as it passes
    max_bytes, with or without a Content-Length (chunked uploads): no request holds more than max_bytes of
    body (and the one chunk in hand)."""
    length = request.headers.get("content-length")
    if length is not None and not (length.isascii() and length.isdigit()):
        raise APIError(400, "Content-Length is not a number", param="body", code="invalid_value")
    if length and int(length) > max_bytes:
        raise APIError(413, f"request body is {length} bytes (limit {max_bytes})", param="body",
                       code="body_too_large")
    body = bytearray()
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            if len(body) + len(chunk) > max_bytes:
                raise APIError(413, f"request body is over the limit of {max_bytes} bytes", param="body",
                               code="body_too_large")
            body += chunk
    body = bytes(body)
    if request.headers.get("content-type", "").startswith(FORM_TYPES):
        async def replay():  # the form parser reads the body we already hold, not the spent stream
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        for field in IMAGE_FIELDS:
            upload = form.get(field)
            if upload is not None and not isinstance(upload, str):  # a file part: the image itself
                fields[field] = await upload.read()
        objects = [(f, k) for f in IMAGE_FIELDS for k in ("image_url", "file_id")] + [("lora", "name"),
                                                                                    ("lora", "strength")]
        for field, key in objects:  # objects, as the openai client writes them in a form
            if f"{field}[{key}]" in fields:
                fields.setdefault(field, {})[key] = fields.pop(f"{field}[{key}]")
        return fields
    try:
        fields = json.loads(body or b"{}")
    except ValueError:
        raise APIError(400, "the body is not valid JSON", param="body", code="invalid_json") from None
    except RecursionError:  # arrays nested ~1000 deep, well inside the size limit
        raise APIError(400, "the body nests too deeply", param="body", code="invalid_json") from None
    if not isinstance(fields, dict):
        raise APIError(400, "the body must be a JSON object", param="body", code="invalid_json")
    return fields


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

    @app.exception_handler(StorageError)
    async def _storage_error(_request, exc: StorageError):
        # The job store refused a read or write after its retries: nothing of this request was accepted.
        log.error("the job store failed: %s", exc)
        return APIError(503, "the job store is unavailable; retry later", type_="server_error",
                        code="storage_unavailable", headers={"Retry-After": "5"}).response()

    @app.exception_handler(Exception)
    async def _internal_error(_request, exc: Exception):
        log.error("internal error", exc_info=exc)  # the details stay in the log
        if replica_died(exc):  # the replica checking the request died; its replacement will answer
            return APIError(503, "the server is restarting a component; retry shortly", type_="server_error",
                            code="replica_unavailable", headers={"Retry-After": "5"}).response()
        return APIError(500, "internal error; retry later", type_="server_error", code="internal_error").response()

    @app.exception_handler(RequestValidationError)
    async def _query_error(request, exc: RequestValidationError):
        # FastAPI's own checks (query parameters such as ?limit=) answer in the OpenAI shape, not its 422.
        errors = [{**e, "loc": e["loc"][1:]} for e in exc.errors()]  # ("query", "limit") -> limit
        return await _input_error(request, invalid(errors))

    def caller(request: Request) -> tuple[str, int]:
        """(tenant, user level) of the request's API key (auth.py); one anonymous tenant when auth is off."""
        if not settings.api_keys:
            return ANONYMOUS, 0
        auth = request.headers.get("authorization", "")
        found = settings.api_keys.authenticate(auth[7:] if auth.lower().startswith("bearer ") else "")
        if found is None:
            raise APIError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type_="authentication_error", code="invalid_api_key")
        return found

    def job_or_404(job_id: str, tenant: str) -> VideoJob:
        # Another tenant's job is answered exactly like a missing one: its existence is not told either.
        job = service.get(job_id)
        if job is None or job.tenant != tenant:
            raise APIError(404, f"no video with id {job_id!r}", param="video_id", code="not_found")
        return job

    def show(job: VideoJob) -> dict:
        body = job.to_api()
        if job.status == "completed":
            body["t2v"]["download_url"] = service.store.content_url(job.id, expires_s=settings.presign_expiry_s)
        return body

    def poll_headers(job: VideoJob) -> dict:
        return {"openai-poll-after-ms": str(service.poll_after_ms())} if job.status in ("queued", "in_progress") else {}

    async def submit(request: Request, program: bool = False) -> JSONResponse:
        tenant, level = caller(request)
        fields = await read_fields(request, settings.max_body_bytes)
        # The body against its route's request model: types and bounds, before anything is planned or queued.
        fields = (program_fields if program else video_fields)(fields)
        service.ensure_started()
        job = await service.create(fields, level, request.headers.get("idempotency-key"), program=program,
                                   tenant=tenant)
        return JSONResponse(show(job), headers=poll_headers(job))

    @app.post("/v1/videos")
    async def create_video(request: Request):
        return await submit(request)

    @app.post("/v1/programs")
    async def create_program(request: Request):
        """An education / ad / news programme (t2v.production.programs) as a video job: poll and download it
        as a video."""
        return await submit(request, program=True)

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str, request: Request):
        tenant, _ = caller(request)
        service.ensure_started()
        job = job_or_404(video_id, tenant)
        return JSONResponse(show(job), headers=poll_headers(job))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request, variant: str = "video"):
        tenant, _ = caller(request)
        job = job_or_404(video_id, tenant)
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
        tenant, _ = caller(request)
        if not 1 <= limit <= 100:
            raise APIError(400, f"limit {limit} is out of range (allowed: 1 to 100)", param="limit",
                           code="invalid_value")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be asc or desc, got {order!r}", param="order", code="invalid_value")
        jobs = [service.get(j.id) or j for j in service.store.all() if j.tenant == tenant]
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
        tenant, _ = caller(request)
        job_or_404(video_id, tenant)
        service.delete(video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.post("/v1/videos/{video_id}/cancel")
    async def cancel_video(video_id: str, request: Request):
        """Stop a queued or running video at its next denoising step; the job stays, failed with code
        "cancelled". A completed or failed video cannot be cancelled (409); cancelling twice is no error."""
        tenant, _ = caller(request)
        job = job_or_404(video_id, tenant)
        job = service.cancel(video_id) or job
        if job.status == "completed" or (job.status == "failed" and (job.error or {}).get("code") != "cancelled"):
            raise APIError(409, f"video {video_id} is {job.status}; only a queued or in-progress video can be "
                           "cancelled", param="video_id", code="video_not_cancellable")
        return JSONResponse(show(job))

    @app.get("/healthz")
    async def health():
        return {"status": "ok", "queued": len(service.queue), "running": len(service.running),
                "model": settings.model_name, "version": generator.version}

    started = int(time.time())

    def model_entries() -> list[dict]:
        """The served model and its adapters, as OpenAI's model objects (an adapter's `parent` is the model)."""
        base = settings.model_name
        out = [{"id": base, "object": "model", "created": started, "owned_by": "t2v", "root": base, "parent": None}]
        for name in lora.list_adapters(settings.adapter_root):
            out.append({"id": f"{base}+{name}", "object": "model", "created": started, "owned_by": "t2v",
                        "root": name, "parent": base})
        return out

    @app.get("/v1/models")
    async def list_models(request: Request):
        caller(request)
        return {"object": "list", "data": await asyncio.to_thread(model_entries)}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request):
        caller(request)
        for entry in await asyncio.to_thread(model_entries):
            if entry["id"] == model_id:
                return entry
        raise APIError(404, f"model {model_id!r} does not exist on this server", param="model",
                       code="model_not_found")

    @app.get("/v1/t2v/defaults")
    async def defaults(request: Request):
        """The served model's default parameters (the web UI starts from them)."""
        caller(request)
        params = await generator.validate({"prompt": "-", "seed": 0})
        return {k: v for k, v in params.items() if k not in ("kind", "prompt", "negative_prompt", "seed")}

    @app.get("/", response_class=HTMLResponse)
    async def ui():
        return HTMLResponse(UI.read_text())

    return app
