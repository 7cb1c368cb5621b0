"""The job API against an attacker: API keys only from the environment or a mounted file (held as digests,
never printed), every route scoped to the caller's tenant, Idempotency-Key reserved atomically per tenant, and
the body limit enforced while the body streams in. (The real graph keeping keys out of Ray's logs and
dashboard: tests/test_serve_graph.py.)"""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from t2v.serve.api import Settings, create_app
from t2v.serve.auth import ANONYMOUS
from t2v.serve.store import JobStore, VideoJob
from test_serve_api import Server

ROOT = Path(__file__).resolve().parents[1]
A, B = {"Authorization": "Bearer key-of-a"}, {"Authorization": "Bearer key-of-b"}
BODY = {"prompt": "a red ball", "size": "32x32", "num_inference_steps": 1}
NEWS = {"kind": "news", "num_inference_steps": 1,
        "spec": {"headline": "Stars fall", "ticker": "markets up", "items": [{"prompt": "a star", "caption": "Live"}]}}


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and {"type", "param"} <= set(error)


class Held:
    """The real generator, except that programmes never finish (no voice-over needed) and validation takes a
    while, as a busy TextEncoder replica's round trip does: the window in which concurrent requests raced."""

    def __init__(self, inner):
        self.inner, self.version = inner, inner.version

    async def validate(self, fields):
        await asyncio.sleep(0.3)
        return await self.inner.validate(fields)

    async def validate_program(self, fields):
        return await self.inner.validate_program(fields)

    async def generate(self, params, progress, job_id=""):
        if params["kind"] == "program":
            await asyncio.Event().wait()
        return await self.inner.generate(params, progress, job_id)


# --- API keys -------------------------------------------------------------------------------------------------

def test_api_keys_come_from_the_environment_or_a_file_and_never_from_args(tmp_path, monkeypatch):
    from t2v.serve.deployments import build_app

    keyfile = tmp_path / "keys"  # as a Kubernetes Secret is mounted: one key per line
    keyfile.write_text("# rotated in May\nfile-key-1\n\nfile-key-2:4\n")
    monkeypatch.setenv("T2V_API_KEYS", "env-key-1, env-key-2:3")
    monkeypatch.setenv("T2V_API_KEYS_FILE", str(keyfile))
    settings = Settings.from_dict({"store": str(tmp_path / "s")})
    keys = settings.api_keys
    assert len(keys) == 4
    assert [keys.authenticate(k)[1] for k in ("env-key-1", "env-key-2", "file-key-1", "file-key-2")] == [0, 3, 0, 4]
    for wrong in ("env-key", "env-key-10", "", "# rotated in May", "file-key-2:4"):
        assert keys.authenticate(wrong) is None
    tenants = {keys.authenticate(k)[0] for k in ("env-key-1", "env-key-2", "file-key-1", "file-key-2")}
    assert len(tenants) == 4 and ANONYMOUS not in tenants
    # Held as digests: no key in the settings' repr (logs), their pickle (what Ray sends a replica) or a tenant id.
    for key in ("env-key-1", "env-key-2", "file-key-1", "file-key-2"):
        assert key not in repr(settings) and key.encode() not in pickle.dumps(settings)
        assert all(key not in t for t in tenants)
    # Keys in the Serve config's application args are refused by the app builder and by Settings, and the
    # message says where keys go instead, without repeating them.
    for refuse in (lambda: Settings.from_dict({"api_keys": {"leaked-key": 1}}),
                   lambda: build_app({"settings": {"api_keys": {"leaked-key": 1}}})):
        with pytest.raises(ValueError, match="T2V_API_KEYS_FILE") as e:
            refuse()
        assert "leaked-key" not in str(e.value)
    for name in ("t2v.yaml", "t2v-gpu.yaml"):  # no shipped config carries keys
        app = yaml.safe_load((ROOT / "serve_configs" / name).read_text())["applications"][0]
        assert "api_keys" not in app["args"]["settings"]


def test_cluster_configs_bind_the_dashboard_to_loopback():
    """`ray up` clusters: the dashboard (job submission: code execution; Serve's REST API) only on the head's
    loopback, reached through `ray dashboard`. On Kubernetes the operator itself calls the dashboard through the
    head Service, so there Ray's token authentication guards it instead (authOptions; the CRDs: test_deploy.py)."""
    for name in ("aws-gpu.yaml", "local.yaml"):
        config = yaml.safe_load((ROOT / "cluster" / name).read_text())
        starts = [c for c in config["head_start_ray_commands"] if c.startswith("ray start")]
        assert starts and all("--dashboard-host=127.0.0.1" in c for c in starts), name
    for name in ("rayservice.yaml", "rayjob-train.yaml"):
        manifest = yaml.safe_load((ROOT / "k8s" / name).read_text())
        cluster = manifest["spec"].get("rayClusterConfig") or manifest["spec"]["rayClusterSpec"]
        assert cluster["authOptions"] == {"mode": "token"}, name


# --- tenants ----------------------------------------------------------------------------------------------------

def test_a_tenant_reaches_only_its_own_jobs_on_every_route(generator, tmp_path):
    keys = {"key-of-a": 0, "key-of-b": 0}  # in-process; a Serve replica reads them from its environment
    srv = Server(create_app(Held(generator), Settings(store=str(tmp_path / "s"), api_keys=keys)))
    try:
        assert_openai_error(httpx.get(srv.url + "/v1/videos"), 401, "invalid_api_key")
        video = httpx.post(srv.url + "/v1/videos", json={**BODY, "seed": 4}, headers=A).json()
        deadline = time.time() + 60
        while (v := httpx.get(f"{srv.url}/v1/videos/{video['id']}", headers=A).json())["status"] not in (
                "completed", "failed"):
            assert time.time() < deadline, f"the video is still {v['status']} after 60 s"
            time.sleep(0.05)
        assert v["status"] == "completed", v["error"]
        program = httpx.post(srv.url + "/v1/programs", json=NEWS, headers=A)
        assert program.status_code == 200, program.text
        ids = [video["id"], program.json()["id"]]
        for vid in ids:
            status = httpx.get(f"{srv.url}/v1/videos/{vid}", headers=A)
            assert status.status_code == 200, status.text
            if vid == ids[1]:  # Held never finishes a programme: it is not ready, and its content says so
                assert status.json()["status"] in ("queued", "in_progress"), status.json()
            for path, kind in ((f"/v1/videos/{vid}/content", "video/mp4"),
                               (f"/v1/videos/{vid}/content?variant=thumbnail", "image/png")):
                r = httpx.get(srv.url + path, headers=A)
                if status.json()["status"] == "completed":  # the owner gets the content
                    assert r.status_code == 200 and r.headers["content-type"] == kind and r.content, r.text
                else:  # the owner is told it is not ready
                    assert_openai_error(r, 409, "video_not_ready")
            for path in (f"/v1/videos/{vid}", f"/v1/videos/{vid}/content",
                         f"/v1/videos/{vid}/content?variant=thumbnail"):
                assert_openai_error(httpx.get(srv.url + path, headers=B), 404, "not_found")
            assert_openai_error(httpx.delete(f"{srv.url}/v1/videos/{vid}", headers=B), 404, "not_found")
        assert httpx.get(srv.url + "/v1/videos", headers=B).json()["data"] == []
        assert sorted(v["id"] for v in httpx.get(srv.url + "/v1/videos", headers=A).json()["data"]) == sorted(ids)
        assert_openai_error(httpx.get(f"{srv.url}/v1/videos?after={ids[0]}", headers=B), 400, "invalid_value")
        # The result cache is per tenant: B's identical request is B's own job, computed, naming no job of A's.
        again = httpx.post(srv.url + "/v1/videos", json={**BODY, "seed": 4}, headers=B).json()
        assert again["id"] not in ids and again["t2v"]["cached_from"] is None and again["status"] != "completed"
        assert httpx.post(srv.url + "/v1/videos", json={**BODY, "seed": 4}, headers=A).json()["t2v"][
            "cached_from"] == ids[0]
        assert httpx.delete(f"{srv.url}/v1/videos/{ids[1]}", headers=A).status_code == 200
    finally:
        srv.stop()


def test_records_from_before_tenants_belong_to_the_anonymous_tenant_only(generator, tmp_path):
    store = JobStore(str(tmp_path / "s"))
    old = VideoJob(id=VideoJob.new_id(), prompt="p", model="t2v-default", created_at=1, seconds="1", size="32x32",
                   params={"kind": "video", "num_frames": 9, "width": 32, "height": 32}, status="failed")
    store.save(old)
    path = tmp_path / "s" / "jobs" / f"{old.id}.json"
    record = json.loads(path.read_text())
    record.pop("tenant", None)  # as versions before tenants wrote it
    path.write_text(json.dumps(record))
    keyed = Server(create_app(generator, Settings(store=str(tmp_path / "s"), api_keys={"key-of-a": 0})))
    try:
        assert_openai_error(httpx.get(f"{keyed.url}/v1/videos/{old.id}", headers=A), 404, "not_found")
        assert httpx.get(keyed.url + "/v1/videos", headers=A).json()["data"] == []
    finally:
        keyed.stop()
    anonymous = Server(create_app(generator, Settings(store=str(tmp_path / "s"))))
    try:
        assert httpx.get(f"{anonymous.url}/v1/videos/{old.id}").json()["id"] == old.id
        assert [v["id"] for v in httpx.get(anonymous.url + "/v1/videos").json()["data"]] == [old.id]
    finally:
        anonymous.stop()


# --- idempotency --------------------------------------------------------------------------------------------------

def test_concurrent_creates_with_one_idempotency_key_make_one_job_per_tenant(generator, tmp_path):
    srv = Server(create_app(Held(generator), Settings(store=str(tmp_path / "s"), max_queued=1000,
                                                      api_keys={"key-of-a": 0, "key-of-b": 0})))
    rounds, threads = 5, 16
    try:
        for _ in range(rounds):
            key = f"retry-{uuid.uuid4()}"
            callers = [A] * threads + [B] * 4  # B reuses A's key at the same moment: its own job
            start, answers = threading.Barrier(len(callers)), [None] * len(callers)

            def create(i):
                with httpx.Client(base_url=srv.url, timeout=60) as http:
                    http.get("/healthz")  # connected before the barrier: the creates then arrive together
                    start.wait()
                    answers[i] = http.post("/v1/videos", json=BODY, headers={**callers[i], "Idempotency-Key": key})

            pool = [threading.Thread(target=create, args=(i,)) for i in range(len(callers))]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
            a_ids = {r.json()["id"] for r, who in zip(answers, callers) if who is A}
            b_ids = {r.json()["id"] for r, who in zip(answers, callers) if who is B}
            assert len(a_ids) == 1 and len(b_ids) == 1 and a_ids != b_ids
        stored = JobStore(str(tmp_path / "s")).all()
        assert len(stored) == 2 * rounds and len({j.tenant for j in stored}) == 2
        assert len(httpx.get(srv.url + "/v1/videos", headers=A).json()["data"]) == rounds
        # A refused request binds nothing: the same key then works with a valid body.
        bad = httpx.post(srv.url + "/v1/videos", json={"prompt": ""}, headers={**A, "Idempotency-Key": "k2"})
        assert bad.status_code == 400
        ok = httpx.post(srv.url + "/v1/videos", json=BODY, headers={**A, "Idempotency-Key": "k2"})
        assert ok.status_code == 200, ok.text
        # Once its job is deleted, a key makes a new one.
        assert httpx.delete(f"{srv.url}/v1/videos/{ok.json()['id']}", headers=A).status_code == 200
        again = httpx.post(srv.url + "/v1/videos", json=BODY, headers={**A, "Idempotency-Key": "k2"})
        assert again.status_code == 200 and again.json()["id"] != ok.json()["id"]
    finally:
        srv.stop()


def test_the_store_reserves_a_key_once_for_any_number_of_writers(tmp_path, s3_bucket):
    # A local store shared by processes: 16 writers at once, each with its own JobStore; one reserves the key.
    root, n = str(tmp_path / "s"), 16
    start, results = threading.Barrier(n), [None] * n

    def claim(i):
        start.wait()
        results[i] = JobStore(root).claim_idempotent("tenant", "key", f"video_{i:024x}", "body")

    pool = [threading.Thread(target=claim, args=(i,)) for i in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    winners = [i for i, entry in enumerate(results) if entry and entry["job_id"] == f"video_{i:024x}"]
    assert len(winners) == 1
    assert all(entry is None or entry["job_id"] == f"video_{winners[0]:024x}" for entry in results)
    # S3: the reservation is a conditional put; a second writer reads the first one's entry.
    s3 = JobStore(f"s3://{s3_bucket}/jobs")
    first = s3.claim_idempotent("tenant", "key", "video_" + "1" * 24, "body")
    second = JobStore(f"s3://{s3_bucket}/jobs").claim_idempotent("tenant", "key", "video_" + "2" * 24, "body")
    assert first["job_id"] == second["job_id"] == "video_" + "1" * 24
    assert s3.claim_idempotent("other-tenant", "key", "video_" + "3" * 24, "body")["job_id"] == "video_" + "3" * 24


# --- the body limit -------------------------------------------------------------------------------------------------

LIMIT, CHUNK = 64 * 1024, 16 * 1024


async def chunked(total: int, pulled: list[int]):
    """A body of `total` bytes with no Content-Length (chunked), counting what the server pulled. One buffer,
    yielded again and again, so the client allocates nothing per chunk."""
    piece = b" " * CHUNK
    while pulled[0] < total:
        pulled[0] += CHUNK
        yield piece


def in_process(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t2v")


@pytest.mark.parametrize("path, content_type", [
    ("/v1/videos", "application/json"), ("/v1/programs", "application/json"),
    ("/v1/videos", "multipart/form-data; boundary=x"), ("/v1/videos", "application/x-www-form-urlencoded")])
def test_a_chunked_body_over_the_limit_is_refused_as_it_streams(generator, tmp_path, path, content_type):
    app = create_app(generator, Settings(store=str(tmp_path / "s"), max_body_bytes=LIMIT))

    async def main():
        async with in_process(app) as client:
            pulled = [0]
            r = await client.post(path, content=chunked(8 << 20, pulled), headers={"content-type": content_type})
            assert r.request.headers["transfer-encoding"] == "chunked" and "content-length" not in r.request.headers
            assert_openai_error(r, 413, "body_too_large")
            assert r.json()["error"]["param"] == "body" and r.json()["error"]["type"] == "invalid_request_error"
            assert pulled[0] <= LIMIT + CHUNK  # stopped at the chunk that crossed the limit, of 8 MB offered

    asyncio.run(main())


def test_refused_bodies_leave_no_memory_behind(generator, tmp_path):
    """Five 16 MB chunked bodies against a 64 KB limit: Python allocations peak under 2 MB above the start (the
    limit, a chunk, the request's objects) and end within 256 KB of it. Reading the body first peaked at 16 MB."""
    app = create_app(generator, Settings(store=str(tmp_path / "s"), max_body_bytes=LIMIT))

    async def main():
        async with in_process(app) as client:
            post = lambda: client.post("/v1/videos", content=chunked(16 << 20, [0]))  # noqa: E731
            assert (await post()).status_code == 413  # warm-up: first-request imports and caches
            tracemalloc.start()
            try:
                for _ in range(5):
                    assert (await post()).status_code == 413
                return tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()

    current, peak = asyncio.run(main())
    assert peak < 2 << 20, f"peak {peak} bytes"
    assert current < 256 << 10, f"{current} bytes stayed"


def test_a_real_server_refuses_a_chunked_upload_over_the_limit(server):
    def body():
        for _ in range(16):  # 256 KB against the 64 KB default, no Content-Length
            yield b" " * CHUNK

    r = httpx.post(server.url + "/v1/videos", content=body(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, "body_too_large")
    assert httpx.get(server.url + "/v1/videos").json()["data"] == []


@pytest.fixture
def server(generator, tmp_path):
    srv = Server(create_app(generator, Settings(store=str(tmp_path / "store"))))
    yield srv
    srv.stop()
