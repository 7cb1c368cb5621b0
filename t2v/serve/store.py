"""Video jobs in the OpenAI Videos API shape, without any web or Ray code: the durable job store (local folder or s3://), the priority queue, idempotency, the result cache and credit cost.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import asdict, dataclass, field

from .. import storage
from ..errors import InputError
from .auth import ANONYMOUS

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_JOB_ID = re.compile(r"video_[0-9a-f]{24}")
STATUSES = ("queued", "in_progress", "completed", "failed")
# What a job makes, set when it is validated: one clip, a composed video (long, multi-shot or post-processed:
# t2v.production.generate) or a programme (t2v.production.programs).
KINDS = ("video", "composed", "program")
MAX_PRIORITY = 9


# --- the request ----------------------------------------------------------------------------------------

def parse_priority(value) -> int:
    try:
        p = int(value)
    except (TypeError, ValueError):
        raise InputError("priority", f"must be an integer, got {value!r}", f"0 to {MAX_PRIORITY}") from None
    if not 0 <= p <= MAX_PRIORITY:
        raise InputError("priority", f"{p} is out of range", f"0 to {MAX_PRIORITY}")
    return p


def canonical_hash(params: dict, model_version: str) -> str:
    """The result-cache key: resolved parameters (seed included) and the model's version."""
    text = json.dumps({"params": params, "model": model_version}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def credit_cost(num_frames: int, width: int, height: int, steps: int, guidance: bool = True) -> float:
    """Credits of a job: frames x megapixels x denoising passes (x2 with guidance), 1 credit per 100 of them.
    What a job costs the GPUs grows with each factor; the unit is arbitrary but stable."""
    passes = steps * (2 if guidance else 1)
    return round(num_frames * width * height / 1e6 * passes / 100, 4)


# --- the job record ---------------------------------------------------------------------------------------

@dataclass
class VideoJob:
    id: str
    prompt: str
    model: str
    params: dict  # resolved generation parameters (GenerationParams.as_dict of one prompt) and the "kind"
    seconds: str
    size: str
    created_at: int
    status: str = "queued"
    progress: int = 0
    priority: int = 5
    user_level: int = 0
    cost: float = 0.0
    request_hash: str = ""
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict | None = None
    timings: dict = field(default_factory=dict)
    quality: dict | None = None  # t2v.quality.assess of the finished video
    cached_from: str | None = None
    attempts: int = 0
    served_by: dict | None = None  # the parallel layout that made the video ({"parallel": "cfg2", "ranks": 2})
    created_ts: float = 0.0  # time.time() at creation: orders the list within a second
    enqueued_at: float = 0.0  # for aging (time.time(); reset when a restart re-queues the job)
    tenant: str = ANONYMOUS  # whose job (auth.py); records from before tenants are the anonymous tenant's

    @staticmethod
    def new_id() -> str:
        return "video_" + secrets.token_hex(12)

    @property
    def kind(self) -> str:
        return self.params["kind"]

    def to_api(self) -> dict:
        """The OpenAI `Video` object, with t2v's own fields under "t2v"."""
        return {
            "id": self.id, "object": "video", "created_at": self.created_at, "completed_at": self.completed_at,
            "expires_at": self.expires_at, "status": self.status, "progress": self.progress, "model": self.model,
            "prompt": self.prompt, "seconds": self.seconds, "size": self.size, "error": self.error,
            "remixed_from_video_id": None,
            "t2v": {"kind": self.kind, "params": {k: v for k, v in self.params.items()
                                                  if k not in ("kind", "plan", "image", "last_image")},  # images: digests
                    "plan": self.params.get("plan"), "priority": self.priority, "cost": self.cost,
                    "timings": self.timings, "cached_from": self.cached_from, "quality": self.quality,
                    "attempts": self.attempts, "served_by": self.served_by},
        }

    @property
    def frames_pixels(self) -> int:
        p = self.params
        return int(p.get("num_frames", 1)) * int(p.get("width", 1)) * int(p.get("height", 1))


# --- durable storage ----------------------------------------------------------------------------------------

class JobStore:
    """Job records, results, idempotency keys and the cache index under one folder or s3:// prefix:

        jobs/<id>.json   content/<id>.mp4   content/<id>.png   idempotency/<sha>.json   cache/<sha>.json

    (<sha>: of the tenant with the Idempotency-Key or the request hash.)
    """

    def __init__(self, root: str):
        self.root = str(root)

    def _uri(self, *parts: str) -> str:
        # Names come from ids and hashes; anything else (a "..", a slash) would reach outside the store.
        for part in parts:
            if not _SAFE_NAME.fullmatch(part) or part.startswith("."):
                raise ValueError(f"unsafe name in the job store: {part!r}")
        return storage.join(self.root, *parts)

    def _write_json(self, uri: str, value: dict) -> None:
        storage.write_bytes(uri, json.dumps(value, sort_keys=True).encode())

    def _read_json(self, uri: str) -> dict | None:
        try:
            return json.loads(storage.read_bytes(uri))
        except FileNotFoundError:
            return None

    def save(self, job: VideoJob) -> None:
        self._write_json(self._uri("jobs", f"{job.id}.json"), asdict(job))

    def get(self, job_id: str) -> VideoJob | None:
        if not _JOB_ID.fullmatch(job_id):
            return None
        value = self._read_json(self._uri("jobs", f"{job_id}.json"))
        if not value:
            return None
        if "kind" not in value["params"]:  # stored before jobs carried their kind: the keys tell it
            p = value["params"]
            p["kind"] = "program" if "program" in p else "composed" if "post" in p else "video"
        return VideoJob(**value)

    def all(self) -> list[VideoJob]:
        folder = self._uri("jobs")
        if not storage.exists(folder):
            return []
        jobs = [self.get(name[:-5]) for name in storage.list_files(folder) if name.endswith(".json")]
        return sorted((j for j in jobs if j), key=lambda j: (j.created_ts, j.id))

    def delete(self, job_id: str) -> None:
        self.delete_content(job_id)
        storage.delete(self._uri("jobs", f"{job_id}.json"))

    def delete_content(self, job_id: str) -> None:
        for variant in ("video", "thumbnail"):
            storage.delete(self._content_uri(job_id, variant))

    def put_content(self, job_id: str, video: bytes, thumbnail: bytes) -> None:
        storage.write_bytes(self._uri("content", f"{job_id}.mp4"), video)
        storage.write_bytes(self._uri("content", f"{job_id}.png"), thumbnail)

    def content(self, job_id: str, variant: str = "video") -> bytes:
        return storage.read_bytes(self._content_uri(job_id, variant))

    def content_url(self, job_id: str, variant: str = "video", expires_s: int = 3600) -> str | None:
        """A presigned GET URL of a finished video (S3 stores only)."""
        kind = "image/png" if variant == "thumbnail" else "video/mp4"
        return storage.presigned_url(self._content_uri(job_id, variant), expires_s, kind)

    def _content_uri(self, job_id: str, variant: str) -> str:
        return self._uri("content", f"{job_id}.{'png' if variant == 'thumbnail' else 'mp4'}")

    def _per_tenant(self, folder: str, tenant: str, key: str) -> str:
        return self._uri(folder, hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest() + ".json")

    # Idempotency-Key, per tenant -> {job_id, body_hash, state: pending | done, at}: same key + same body is the
    # same job. The entry is reserved before the job exists (atomically, storage.create_exclusive), so of
    # concurrent requests with one key exactly one makes the job.
    def claim_idempotent(self, tenant: str, key: str, job_id: str, body_hash: str) -> dict | None:
        """Reserve the key for job_id; the entry holding the key: this one if the reservation won, another
        request's otherwise, None while that one is not readable yet."""
        uri = self._per_tenant("idempotency", tenant, key)
        entry = {"job_id": job_id, "body_hash": body_hash, "state": "pending", "at": time.time()}
        if storage.create_exclusive(uri, json.dumps(entry).encode()):
            return entry
        return self._read_json(uri)  # None: released between the two calls (the caller tries again)

    def _holder(self, uri: str) -> str | None:
        return (self._read_json(uri) or {}).get("job_id")

    def confirm_idempotent(self, tenant: str, key: str, entry: dict) -> None:
        """Mark the reservation done, unless it has been taken over since (a request that outlived the stale
        limit must not overwrite its successor's)."""
        uri = self._per_tenant("idempotency", tenant, key)
        if self._holder(uri) == entry["job_id"]:
            self._write_json(uri, {**entry, "state": "done"})

    def release_idempotent(self, tenant: str, key: str, job_id: str) -> None:
        """Free the key if job_id still holds it (never another request's reservation)."""
        uri = self._per_tenant("idempotency", tenant, key)
        if self._holder(uri) == job_id:
            storage.delete(uri)

    # Result cache: canonical request hash -> a completed job, until its TTL passes. Per tenant: a shared
    # cache would answer one tenant at once with what another asked for, telling it that someone did.
    def cached(self, request_hash: str, now: float, tenant: str = ANONYMOUS) -> VideoJob | None:
        entry = self._read_json(self._per_tenant("cache", tenant, request_hash))
        if not entry or entry["expires_at"] < now:
            return None
        job = self.get(entry["job_id"])
        return job if job and job.status == "completed" and job.tenant == tenant else None

    def remember_result(self, request_hash: str, job_id: str, expires_at: float, tenant: str = ANONYMOUS) -> None:
        self._write_json(self._per_tenant("cache", tenant, request_hash), {"job_id": job_id, "expires_at": expires_at})


# --- the priority queue ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueWeights:
    """score = priority * priority + user_level * level - length * megavoxels + aging * seconds waited.
    Aging guarantees that a long, low-priority job is eventually served."""

    priority: float = 10.0
    level: float = 5.0
    length: float = 2.0  # per million output voxels (frames x pixels): short first
    aging: float = 1.0  # per second in the queue


def queue_score(job: VideoJob, now: float, w: QueueWeights = QueueWeights()) -> float:
    return (w.priority * job.priority + w.level * job.user_level - w.length * job.frames_pixels / 1e6
            + w.aging * max(0.0, now - job.enqueued_at))


class PriorityQueue:
    """Jobs waiting for the generator; `pop` takes the highest score now (scores change with waiting time,
    so they are computed at pop time; queues are short, a scan is cheap)."""

    def __init__(self, weights: QueueWeights = QueueWeights()):
        self.weights = weights
        self._jobs: dict[str, VideoJob] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def push(self, job: VideoJob) -> None:
        self._jobs[job.id] = job

    def remove(self, job_id: str) -> bool:
        return self._jobs.pop(job_id, None) is not None

    def pop(self, now: float | None = None) -> VideoJob | None:
        if not self._jobs:
            return None
        now = time.time() if now is None else now
        best = max(self._jobs.values(), key=lambda j: (queue_score(j, now, self.weights), -j.enqueued_at))
        return self._jobs.pop(best.id)
