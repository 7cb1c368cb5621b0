"""The job API without Ray: a real HTTP server (uvicorn on 127.0.0.1) over the in-process generator, driven
by the official `openai` client and plain httpx."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest

from t2v.serve.api import Settings, create_app
from t2v.serve.store import (PriorityQueue, QueueWeights, VideoJob, credit_cost, queue_score,
                            to_generation_kwargs)
from t2v.video import probe



class Server:
    """uvicorn serving an app in a thread, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, video_id: str, timeout: float = 60) -> dict:
        """Poll GET /v1/videos/{id} until the job is completed or failed; its final JSON."""
        deadline = time.time() + timeout
        while True:
            v = httpx.get(f"{self.url}/v1/videos/{video_id}").json()
            if v["status"] in ("completed", "failed") or time.time() > deadline:
                return v
            time.sleep(0.1)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture
def server(generator, tmp_path):
    srv = Server(create_app(generator, Settings(store=str(tmp_path / "store"), poll_after_ms=50)))
    yield srv
    srv.stop()


def client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_openai_client_creates_polls_and_downloads(server):
    c = client(server)
    video = c.videos.create_and_poll(prompt="a red ball bouncing on a black background", size="32x32",
                                     seconds="1", extra_body={"seed": 3, "num_inference_steps": 2})
    assert video.status == "completed" and video.progress == 100 and video.object == "video"
    assert video.size == "32x32" and video.completed_at >= video.created_at and video.expires_at > video.completed_at
    data = c.videos.download_content(video.id).read()
    info = probe(data)
    assert (info.codec, info.width, info.height, info.num_frames) == ("h264", 32, 32, 9)  # 1 s at 8 fps -> 9
    png = c.videos.download_content(video.id, variant="thumbnail").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    extra = video.model_extra["t2v"]
    assert extra["params"]["seed"] == 3 and extra["params"]["num_inference_steps"] == 2
    assert extra["cost"] == credit_cost(9, 32, 32, 2) and extra["timings"]["denoise_s"] > 0
    # Quality scores are computed after the video is stored (off the critical path) and join the job soon.
    deadline = time.time() + 30
    while extra["quality"] is None and time.time() < deadline:
        time.sleep(0.05)
        extra = c.videos.retrieve(video.id).model_extra["t2v"]
    quality = extra["quality"]
    assert 0 <= quality["total"] <= 1 and {"flicker", "sharpness", "text_alignment"} <= set(quality["scores"])
    assert extra["timings"]["quality_after_s"] > 0


def test_poll_advice_follows_recent_jobs(generator, tmp_path):
    """openai-poll-after-ms: the configured ceiling until a job has finished, then about a twentieth of a
    typical job (at least 50 ms), so a client neither hammers the server nor waits long past the end."""
    srv = Server(create_app(generator, Settings(store=str(tmp_path / "store"), poll_after_ms=5000)))
    try:
        body = {"prompt": "a red ball", "size": "32x32", "num_inference_steps": 2}
        first = httpx.post(srv.url + "/v1/videos", json={**body, "seed": 1})
        assert first.headers["openai-poll-after-ms"] == "5000"
        total = srv.wait(first.json()["id"])["t2v"]["timings"]["total_s"]
        second = httpx.post(srv.url + "/v1/videos", json={**body, "seed": 2})
        assert int(second.headers["openai-poll-after-ms"]) == int(max(50, total * 1000 / 20))
        srv.wait(second.json()["id"])
    finally:
        srv.stop()


def test_status_progress_and_poll_header_while_running(server):
    r = httpx.post(server.url + "/v1/videos", json={"prompt": "a blue star", "size": "32x32",
                                                     "num_inference_steps": 30, "seed": 1})
    assert r.status_code == 200 and r.json()["status"] in ("queued", "in_progress")
    assert r.headers["openai-poll-after-ms"] == "50"
    seen = set()
    for _ in range(600):
        v = httpx.get(f"{server.url}/v1/videos/{r.json()['id']}").json()
        seen.add((v["status"], v["progress"]))
        if v["status"] == "completed":
            break
        time.sleep(0.02)
    assert any(s == "in_progress" and 0 < p < 100 for s, p in seen)  # progress moved between 0 and 100
    assert v["status"] == "completed"


def test_list_pages_with_a_cursor_and_delete(server):
    c = client(server)
    ids = [c.videos.create(prompt=f"a green square {i}", size="32x32",
                           extra_body={"num_inference_steps": 1}).id for i in range(3)]
    first = c.videos.list(limit=2)
    assert [v.id for v in first.data] == ids[::-1][:2] and first.has_more
    rest = c.videos.list(limit=2, after=first.last_id)
    assert [v.id for v in rest.data] == [ids[0]] and not rest.has_more
    assert [v.id for v in c.videos.list(order="asc").data] == ids
    deleted = c.videos.delete(ids[1])
    assert deleted.deleted and deleted.id == ids[1]
    with pytest.raises(openai.NotFoundError):
        c.videos.retrieve(ids[1])
    assert ids[1] not in [v.id for v in c.videos.list().data]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "size": "33x32"}, "width"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "seconds": "-1"}, "seconds"),
    ({"prompt": "x", "priority": 11}, "priority"),
    ({"prompt": "x", "model": "sora-2"}, "model"),
    ({"prompt": ""}, "prompt"),
    ({"size": "32x32"}, "prompt"),
])
def test_invalid_fields_name_the_param(server, body, param):
    r = httpx.post(server.url + "/v1/videos", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert httpx.get(server.url + "/v1/videos").json()["data"] == []  # nothing was queued


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/programs"])
def test_a_json_body_that_is_not_an_object_is_a_400(server, path):
    r = httpx.post(server.url + path, json=[{"prompt": "a red ball", "size": "32x32"}])
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "body" and error["code"] == "invalid_json" and error["type"] == "invalid_request_error"
    assert error["message"]
    assert httpx.get(server.url + "/v1/videos").json()["data"] == []  # nothing was queued


def test_unknown_id_and_not_ready_and_too_large(server):
    r = httpx.get(server.url + "/v1/videos/video_doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.post(server.url + "/v1/videos", content=b"{" + b" " * 70_000 + b"}",
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    job = httpx.post(server.url + "/v1/videos", json={"prompt": "a star", "size": "32x32",
                                                       "num_inference_steps": 40}).json()
    r = httpx.get(f"{server.url}/v1/videos/{job['id']}/content")
    assert r.status_code == 409 and r.json()["error"]["code"] == "video_not_ready"


def test_idempotency_key(server):
    body = {"prompt": "a white heart", "size": "32x32", "num_inference_steps": 1}
    a = httpx.post(server.url + "/v1/videos", json=body, headers={"Idempotency-Key": "k1"}).json()
    b = httpx.post(server.url + "/v1/videos", json=body, headers={"Idempotency-Key": "k1"}).json()
    assert a["id"] == b["id"]
    r = httpx.post(server.url + "/v1/videos", json={**body, "prompt": "a black heart"},
                   headers={"Idempotency-Key": "k1"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "Idempotency-Key"
    assert len(httpx.get(server.url + "/v1/videos").json()["data"]) == 1


def test_result_cache_returns_the_same_video_without_recomputing(server):
    c = client(server)
    args = dict(prompt="a yellow triangle", size="32x32", extra_body={"seed": 5, "num_inference_steps": 2})
    first = c.videos.create_and_poll(**args)
    second = c.videos.create(**args)  # completed at once
    assert second.status == "completed" and second.model_extra["t2v"]["cached_from"] == first.id
    assert c.videos.download_content(second.id).read() == c.videos.download_content(first.id).read()
    other_seed = c.videos.create(prompt="a yellow triangle", size="32x32",
                                 extra_body={"seed": 6, "num_inference_steps": 2})
    assert other_seed.status == "queued" and other_seed.model_extra["t2v"]["cached_from"] is None


def test_api_keys(generator, tmp_path):
    srv = Server(create_app(generator, Settings(store=str(tmp_path / "s"), api_keys={"secret-1": 2})))
    try:
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").videos.list()
        r = httpx.get(srv.url + "/v1/videos")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        v = client(srv, key="secret-1").videos.create(prompt="a red ball", size="32x32",
                                                      extra_body={"num_inference_steps": 1})
        assert v.status in ("queued", "in_progress")
    finally:
        srv.stop()


def test_full_queue_answers_429_with_retry_after(generator, tmp_path):
    srv = Server(create_app(generator, Settings(store=str(tmp_path / "s"), max_queued=0)))
    try:
        r = httpx.post(srv.url + "/v1/videos", json={"prompt": "a red ball", "size": "32x32"})
        assert r.status_code == 429 and r.headers["Retry-After"] == "10"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        srv.stop()


class GatedGenerator:
    """The real generator behind a gate the test opens: stands for a server that stops mid-queue."""

    def __init__(self, inner):
        self.inner, self.version, self.gate = inner, inner.version, asyncio.Event()

    async def validate(self, fields):
        return await self.inner.validate(fields)

    async def generate(self, params, progress, job_id=""):
        await self.gate.wait()
        return await self.inner.generate(params, progress, job_id)


def test_jobs_survive_a_restart(generator, tmp_path):
    store = str(tmp_path / "store")
    first = Server(create_app(GatedGenerator(generator), Settings(store=store)))
    ids = [httpx.post(first.url + "/v1/videos", json={"prompt": f"a purple circle {i}", "size": "32x32",
                                                      "num_inference_steps": 1}).json()["id"] for i in range(2)]
    first.stop()  # one job was in progress, one queued
    second = Server(create_app(generator, Settings(store=store)))
    try:
        c = client(second)
        assert sorted(v.id for v in c.videos.list().data) == sorted(ids)
        for i in ids:
            v = c.videos.poll(i, poll_interval_ms=50)
            assert v.status == "completed"
            assert probe(c.videos.download_content(i).read()).num_frames == 9
    finally:
        second.stop()


# --- pure pieces ----------------------------------------------------------------------------------------------

def job(id, priority=5, level=0, frames=17, size=128, waited=0.0, now=1000.0):
    return VideoJob(id=id, prompt="p", model="m", params={"num_frames": frames, "width": size, "height": size},
                    seconds="2", size=f"{size}x{size}", created_at=0, priority=priority, user_level=level,
                    enqueued_at=now - waited)


def test_priority_queue_orders_by_priority_level_length_and_aging():
    q = PriorityQueue()
    for j in (job("low", priority=1), job("high", priority=9), job("vip", priority=5, level=3),
              job("long", priority=5, frames=65, size=256), job("short", priority=5, frames=9, size=64)):
        q.push(j)
    assert [q.pop(now=1000.0).id for _ in range(5)] == ["high", "vip", "short", "long", "low"]
    # Aging: a low-priority job that has waited long enough overtakes a fresh high-priority one.
    w = QueueWeights()
    q.push(job("old", priority=1, waited=0))
    q.push(job("new", priority=9, now=1000.0 + 100))
    assert q.pop(now=1000.0 + 100).id == "old"
    assert queue_score(job("a", waited=10), 1000.0, w) - queue_score(job("a"), 1000.0, w) == pytest.approx(10 * w.aging)


def test_request_mapping_and_cost():
    kw = to_generation_kwargs({"prompt": "a ball", "seconds": "4", "size": "256x128", "seed": "7"}, 4, 8.0)
    assert kw == {"prompt": "a ball", "seed": 7, "width": 256, "height": 128, "num_frames": 33}
    assert to_generation_kwargs({"prompt": "a", "seconds": 2, "fps": 16}, 4, 8.0)["num_frames"] == 33
    assert credit_cost(17, 128, 128, 25) == round(17 * 128 * 128 / 1e6 * 50 / 100, 4)
    assert credit_cost(33, 128, 128, 25) > credit_cost(17, 128, 128, 25) > credit_cost(17, 64, 64, 25)


def test_ui_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "<video" in r.text and "/v1/videos" in r.text


def test_jobs_and_videos_on_s3_with_presigned_downloads(generator, s3_bucket):
    from t2v import storage

    store = f"s3://{s3_bucket}/jobs"
    srv = Server(create_app(generator, Settings(store=store, presign_expiry_s=120)))
    try:
        c = client(srv)
        video = c.videos.create_and_poll(prompt="a red ball", size="32x32", extra_body={"num_inference_steps": 1})
        assert video.status == "completed"
        assert storage.exists(f"{store}/jobs/{video.id}.json") and storage.exists(f"{store}/content/{video.id}.mp4")
        url = video.model_extra["t2v"]["download_url"]
        from urllib.parse import parse_qs, urlparse

        query = parse_qs(urlparse(url).query)
        expires = int(query["X-Amz-Expires"][0]) if "X-Amz-Expires" in query else int(query["Expires"][0]) - time.time()
        assert 100 < expires <= 121 and s3_bucket in url
        direct = httpx.get(url)
        assert direct.status_code == 200 and direct.headers["content-type"] == "video/mp4"
        assert direct.content == c.videos.download_content(video.id).read()
    finally:
        srv.stop()


def test_no_request_reaches_outside_the_store(server, tmp_path):
    from t2v.serve.store import JobStore

    secret = tmp_path / "secret.json"
    secret.write_text('{"not": "a job"}')
    for path in ["/v1/videos/..%2Fsecret", "/v1/videos/..%2F..%2Fsecret/content", "/v1/videos/%2e%2e",
                 "/v1/videos/video_..%2F..%2Fsecret"]:
        r = httpx.get(server.url + path)
        assert r.status_code == 404, path
    assert httpx.delete(server.url + "/v1/videos/..%2Fsecret").status_code == 404
    store = JobStore(str(tmp_path / "store"))
    for bad in ("../secret", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="unsafe"):
            store.content(bad)
    assert store.get("../secret") is None
    assert secret.read_text() == '{"not": "a job"}'
    assert httpx.get(server.url + "/v1/videos").json()["data"] == []  # local stores: no presigned URL
