"""The Ray Serve graph as shipped: `serve run serve_configs/t2v.yaml` (with a tiny model and a temporary
store swapped in), driven over HTTP by the official openai client; a restart that loses no job; and an API key,
given through the environment, found in none of Ray's logs nor on its dashboard."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import yaml

from t2v.ports import free_port
from t2v.serve.process import ServeProcess

ROOT = Path(__file__).resolve().parents[1]


CONFIGS = ["t2v.yaml", "t2v-gpu.yaml", "t2v-gpu-cfg2.yaml", "t2v-wan14b-80gb.yaml", "t2v-wan14b-24gb.yaml",
           "t2v-wan14b-ulysses4.yaml", "t2v-wan22-a14b-experts.yaml"]


def test_every_shipped_config_is_tested():
    assert sorted(p.name for p in (ROOT / "serve_configs").glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_serve_configs_are_valid_and_cover_every_stage(name):
    from ray.serve.schema import ServeDeploySchema

    from t2v.runtime import RuntimeOptions

    config = yaml.safe_load((ROOT / "serve_configs" / name).read_text())
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    args = config["applications"][0]["args"]
    runtime = RuntimeOptions.parse(**(args.get("runtime") or {}))  # every option known to t2v
    if runtime.cache:  # what the Denoiser would refuse at start
        assert args["step_batching"] is None and args["fan_out"] is False
    if "24gb" in name:  # the 14B transformer does not fit: offloaded, decoded in tiles
        assert {"group_offload", "vae_tiling"} <= set(runtime.memory)
    if "80gb" in name:
        assert "group_offload" not in runtime.memory
    from t2v.serve.deployments import parse_parallel

    layout, rank_options = parse_parallel(args.get("parallel"))  # what the Denoiser would refuse at start
    denoiser = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Denoiser")
    if layout.ranks > 1:  # a gang: the replica in the first bundle, one bundle per other rank, on one node
        assert not runtime.cache
        bundles = denoiser["placement_group_bundles"]
        assert len(bundles) == layout.ranks and denoiser["placement_group_strategy"] == "STRICT_PACK"
        for bundle, need in zip(bundles, [denoiser["ray_actor_options"]] + [rank_options] * (layout.ranks - 1)):
            assert bundle.get("GPU", 0) >= need.get("num_gpus", 0) and bundle["CPU"] >= need["num_cpus"]
        if layout.sequence > 1:
            heads = {"wan2.1-t2v-14b": 40, "wan2.1-t2v-1.3b": 12}[args["settings"]["model_name"]]
            assert heads % layout.ulysses == 0
    expected = {"t2v-gpu-cfg2.yaml": "cfg2", "t2v-wan14b-ulysses4.yaml": "ulysses4"}.get(name, "single")
    assert layout.name == expected
    stages = {d["name"]: d for d in config["applications"][0]["deployments"]}
    split = args.get("experts") == "split"  # a mixture's low-noise expert on a deployment of its own
    assert set(stages) == {"Ingress", "TextEncoder", "Denoiser", "Decoder"} | ({"LowNoiseDenoiser"} if split else set())
    if split:
        assert stages["LowNoiseDenoiser"]["ray_actor_options"] == stages["Denoiser"]["ray_actor_options"]
    for d in stages.values():
        assert d["ray_actor_options"]["num_cpus"] > 0 and d["max_ongoing_requests"] >= 1
        assert "num_replicas" in d or "autoscaling_config" in d
    assert stages["Denoiser"]["autoscaling_config"]["max_replicas"] >= 2
    if name == "t2v.yaml":  # fits this 2-CPU machine, with the Denoiser scaled out
        most = lambda d: d.get("num_replicas") or d["autoscaling_config"]["max_replicas"]  # noqa: E731
        assert sum(d["ray_actor_options"]["num_cpus"] * most(d) for d in stages.values()) <= 2
    else:
        assert stages["Denoiser"]["ray_actor_options"]["num_gpus"] == 1


def test_the_ingress_builds_its_app_through_serve_ingress_late_bound_hook():
    """Ingress makes its FastAPI app per replica in `__serve_build_asgi_app__`, the late-bound form of
    `serve.ingress()` (no app argument) that Ray documents on serve.ingress; ray's upper bound in pyproject.toml
    is the newest release this was tested on. If a Ray release drops the form, this says so by name."""
    import inspect

    from ray import serve

    from t2v.serve.deployments import Ingress

    hint = ("Ray no longer offers serve.ingress()'s late-bound __serve_build_asgi_app__ hook that "
            "t2v.serve.deployments.Ingress uses: build the app with serve.ingress(app) instead")
    assert "__serve_build_asgi_app__" in (inspect.getdoc(serve.ingress) or ""), hint
    with pytest.raises(ValueError, match="__serve_build_asgi_app__"):
        serve.ingress()(type("WithoutTheHook", (), {}))
    assert callable(getattr(Ingress.func_or_class, "__serve_build_asgi_app__", None)), hint


def test_free_ports_are_drawn_outside_the_kernels_ephemeral_range_and_rays_worker_ports():
    # A port the kernel hands out is where Ray's processes get theirs too: serve run once lost its HTTP port so.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [free_port() for _ in range(40)]
    assert all(19999 < p < low for p in ports) and len(set(ports)) > 30
    with socket.socket() as held:  # each is free: it binds
        held.bind(("127.0.0.1", ports[0]))


@contextlib.contextmanager
def serve_app(tmp_path: Path, model, denoiser_replicas: int | None = None, settings: dict | None = None, **args):
    """`serve run` of serve_configs/t2v.yaml serving `model`, with these application args and job settings, a
    temporary store, and Ray in a temp folder of its own. denoiser_replicas: a fixed count instead of autoscaling.
    Yields (the running ServeProcess, Ray's temp folder)."""
    config = yaml.safe_load((ROOT / "serve_configs" / "t2v.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"].update(model=str(model), **args)
    app["args"]["settings"].update(store=str(tmp_path / "store"), poll_after_ms=100, **(settings or {}))
    if denoiser_replicas is not None:
        denoiser = next(d for d in app["deployments"] if d["name"] == "Denoiser")
        denoiser.pop("autoscaling_config")
        denoiser["num_replicas"] = denoiser_replicas
    path = tmp_path / "t2v.yaml"
    path.write_text(yaml.safe_dump(config))
    ray_tmp = Path(tempfile.mkdtemp(prefix="t2vray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    serve = ServeProcess(path, f"http://127.0.0.1:{port}", tmp_path / "serve.log", cwd=ROOT,
                         env={"RAY_TMPDIR": str(ray_tmp)})
    try:
        yield serve, ray_tmp
    finally:
        serve.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def assert_nowhere(key: str, folders: list[Path]) -> int:
    """No file under the folders holds the key; how many files were searched."""
    files = [p for folder in folders for p in ([folder] if folder.is_file() else folder.rglob("*")) if p.is_file()]
    holding = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert not holding, f"the API key is in {holding}"
    return len(files)


def assert_key_not_exposed(key: str, ray_tmp: Path, serve_log: Path, dashboard: str | None = None) -> None:
    """The key is in no file Ray wrote (every session's logs: controller, replicas' worker-*.out/err, ...), not
    in serve run's output, and not in the dashboard's Serve REST API (the application's config and args)."""
    assert assert_nowhere(key, [ray_tmp, serve_log]) > 10
    logs = b"".join(p.read_bytes() for p in ray_tmp.rglob("*.log") if p.is_file())
    assert b"Importing application 't2v' with arguments" in logs  # where the args (and keys, before) were printed
    if dashboard:
        apps = httpx.get(dashboard + "/api/serve/applications/", timeout=30)
        assert apps.status_code == 200 and '"t2v"' in apps.text and "import_path" in apps.text
        assert key not in apps.text


@pytest.mark.slow
def test_serve_graph_runs_jobs_and_keeps_them_across_a_restart(tmp_path, wan_dir, generator):
    config = yaml.safe_load((ROOT / "serve_configs" / "t2v.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["model"] = str(wan_dir)
    args["settings"]["store"] = str(tmp_path / "store")
    args["settings"]["poll_after_ms"] = 100
    path = tmp_path / "t2v.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    # The API key only in the environment, as a Secret gives it; Ray in a temp folder of its own, so every log it
    # writes is this test's (short: Ray's socket paths have a length limit).
    key = "t2v-test-key-" + secrets.token_hex(16)
    ray_tmp = Path(tempfile.mkdtemp(prefix="t2vray-", dir="/tmp"))
    env = {"T2V_API_KEYS": key, "RAY_TMPDIR": str(ray_tmp)}

    serve = ServeProcess(path, f"http://127.0.0.1:{port}", log, cwd=ROOT, env=env)
    try:
        assert httpx.get(serve.url + "/v1/videos").status_code == 401
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key=key, max_retries=0)
        video = c.videos.create_and_poll(prompt="a red ball bouncing on a black background", size="32x32",
                                         extra_body={"seed": 1, "num_inference_steps": 3})
        assert video.status == "completed", video.error
        dashboard = re.findall(r"View the dashboard at (?:\x1b\[[\d;]*m)*(http://[\w.:]+)", log.read_text())[-1]
        assert_key_not_exposed(key, ray_tmp, log, dashboard)
        from t2v.video import probe

        info = probe(c.videos.download_content(video.id).read())
        assert (info.width, info.height, info.num_frames) == (32, 32, 9)
        timings = video.model_extra["t2v"]["timings"]
        assert timings["denoise_s"] > 0 and timings["decode_s"] > 0  # went through every stage
        # A bad field raised in the TextEncoder replica is a 400 naming it, not a 500.
        bad = httpx.post(serve.url + "/v1/videos", json={"prompt": "x", "num_inference_steps": 0},
                         headers={"Authorization": f"Bearer {key}"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "num_inference_steps"
        # A long, two-shot video: each step's windows fan out to the Denoiser replicas and are fused.
        long = c.videos.create_and_poll(prompt="a red ball, then a blue star", size="32x32", seconds="3",
                                        extra_body={"seed": 2, "num_inference_steps": 3})
        assert long.status == "completed", long.error
        assert len(long.model_extra["t2v"]["plan"]["shots"]) == 2
        assert probe(c.videos.download_content(long.id).read()).num_frames == 25
        # Progress streams from the Denoiser replica while it samples.
        job = c.videos.create(prompt="a blue star spinning", size="32x32", extra_body={"num_inference_steps": 300})
        seen = set()
        deadline = time.time() + 300
        while (v := c.videos.retrieve(job.id)).status in ("queued", "in_progress"):
            assert time.time() < deadline, f"the job is still {v.status} at {v.progress}% after 300 s"
            seen.add(v.progress)
            time.sleep(0.1)
        assert v.status == "completed", v.error
        assert any(0 < p < 100 for p in seen)
        # Cancelling a running job stops its sampling in the Denoiser replica at the next step.
        doomed = c.videos.create(prompt="a white heart", size="32x32", extra_body={"num_inference_steps": 1000})
        deadline = time.time() + 120
        while (p0 := c.videos.retrieve(doomed.id).progress) == 0:  # until it samples
            assert time.time() < deadline, "the job to cancel did not start sampling within 120 s"
            time.sleep(0.02)
        t0 = time.perf_counter()
        while (p1 := c.videos.retrieve(doomed.id).progress) < p0 + 5:  # 50 more steps (progress is in % of 1000)
            assert time.time() < deadline, f"the job to cancel is at {p1}% after 120 s"
            time.sleep(0.02)
        pace = 10 * (p1 - p0) / (time.perf_counter() - t0)  # its steps per second, measured
        r = httpx.post(f"{serve.url}/v1/videos/{doomed.id}/cancel", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["error"]["code"] == "cancelled"
        at_cancel = 10 * r.json()["progress"]  # the replica had done at least this many steps when it was cancelled
        stopped = re.compile(rb"sampling stopped after step (\d+) of 1000: the job was cancelled")
        deadline = time.time() + 60
        while not (found := [m for p in ray_tmp.rglob("*Denoiser*.log") for m in stopped.findall(p.read_bytes())]):
            assert time.time() < deadline, "the Denoiser replica did not stop the cancelled job"
            time.sleep(0.2)
        # "At the next step": past where it was, by no more than the steps of one second at its pace (time for the
        # cancel to cross the proxy, the Ingress and Ray's stream to the replica: a step or two, some 3 ms, on an
        # idle 2-core machine; the margin is for a busy CI machine) and the 10 steps that one percent of progress
        # hides. A cancel that only took effect at the end would be some 2 s of steps late.
        print(f"cancelled at step >= {at_cancel}, stopped after step {int(found[0])}, pace {pace:.0f} steps/s")
        assert at_cancel <= int(found[0]) <= at_cancel + 10 + pace, (at_cancel, int(found[0]), pace)
        assert c.videos.retrieve(doomed.id).status == "failed"
        # A job accepted just before the server stops is still there after the restart, and completes.
        pending = c.videos.create(prompt="a green heart", size="32x32", extra_body={"num_inference_steps": 300})
    finally:
        serve.stop()
    # Restart with per-step batching on (as t2v-gpu.yaml has it): concurrent jobs' steps share forwards.
    args["step_batching"] = {"max_batch_size": 4, "wait_s": 0.01}
    args["settings"]["concurrency"] = 3  # the pending job and the two below in the Denoiser at once
    path.write_text(yaml.safe_dump(config))
    serve = ServeProcess(path, f"http://127.0.0.1:{port}", log, cwd=ROOT, env=env)
    try:
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key=key, max_retries=0)
        assert pending.id in [v.id for v in c.videos.list().data]
        # Right after a restart, under CI load, a kept-alive connection can drop before the proxy answers: these
        # creates retry, each with its own Idempotency-Key, so a retried one is still one job (as clients should).
        retrying = c.with_options(max_retries=3)
        pair = [retrying.videos.create(prompt=p, size="32x32", extra_body={"seed": 5, "num_inference_steps": 40},
                                       extra_headers={"Idempotency-Key": f"pair-{i}-{secrets.token_hex(4)}"})
                for i, p in enumerate(("a red ball bouncing on a black background", "a blue star spinning"))]
        done = c.videos.poll(pending.id, poll_interval_ms=200)
        assert done.status == "completed", done.error
        info = probe(c.videos.download_content(pending.id).read())  # a whole video: every frame at its size
        assert (info.codec, info.width, info.height, info.num_frames) == ("h264", 32, 32, 9)
        for job in pair:
            v = c.videos.poll(job.id, poll_interval_ms=200)
            assert v.status == "completed", v.error
            assert v.model_extra["t2v"]["timings"]["step_batch_max"] >= 2  # rode in a batch with another job
        # A batched job makes the video it makes alone (in-process, no Ray), up to float and x264 noise.
        from t2v.video import read_video

        served = read_video(c.videos.download_content(pair[0].id).read()).astype(float)
        params = asyncio.run(generator.validate({"prompt": "a red ball bouncing on a black background",
                                                 "size": "32x32", "seed": 5, "num_inference_steps": 40}))
        alone = asyncio.run(generator.generate(params, None))
        alone.quality_later.close()  # not needed here
        assert np.abs(served - read_video(alone.video).astype(float)).mean() < 2.0
    finally:
        serve.stop()
    assert_key_not_exposed(key, ray_tmp, log)  # both runs' logs, complete now that Ray has stopped
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_mixture_served_with_each_expert_on_its_own_replicas_hands_jobs_over_and_retries_a_lost_one(tmp_path):
    """`experts: split` on a tiny Wan2.2-T2V-A14B: the Denoiser takes the high-noise steps and hands the job's
    state to the LowNoiseDenoiser, which holds the other expert: the in-process pipeline's video; a job whose
    low-noise replica is killed after the switch runs again and completes."""
    from layouts import build_wan22_a14b
    from test_faults import replica_pids, wait_all

    import t2v
    from t2v.serve.process import serve_shipped_config
    from t2v.video import encode_video, read_video

    model = build_wan22_a14b(tmp_path / "a14b")
    ray_tmp = Path(tempfile.mkdtemp(prefix="t2vray-", dir="/tmp"))
    low = {"num_replicas": 1, "max_ongoing_requests": 4, "ray_actor_options": {"num_cpus": 0.5}}
    serve = serve_shipped_config(tmp_path, str(model), args={"experts": "split", "adapters": None},
                                 deployments={"Denoiser": {"num_replicas": 1}, "LowNoiseDenoiser": low},
                                 settings={"max_attempts": 2, "poll_after_ms": 100}, env={"RAY_TMPDIR": str(ray_tmp)})
    try:
        replicas = replica_pids(ray_tmp)
        assert len(replicas["Denoiser"]) == 1 and len(replicas["LowNoiseDenoiser"]) == 1  # one per expert
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        body = {"seed": 3, "num_inference_steps": 6, "guidance_scale": 4.0, "guidance_scale_2": 2.0,
                "optimize_prompt": False}
        video = c.videos.create_and_poll(prompt="a red ball", size="32x32", seconds="1", extra_body=body)
        assert video.status == "completed", video.error
        served = read_video(c.videos.download_content(video.id).read()).astype(float)
        alone = t2v.TextToVideoPipeline.from_pretrained(model)(
            "a red ball", num_frames=17, height=32, width=32, seed=3, num_inference_steps=6, guidance_scale=4.0,
            guidance_scale_2=2.0).frames[0]
        assert np.abs(served - read_video(encode_video(alone, 16))).mean() < 0.5  # up to x264's rounding
        # A long video (past the layout's 81 frames) needs both experts on one replica: refused here, naming the
        # field, before anything is queued.
        r = httpx.post(serve.url + "/v1/videos", json={"prompt": "a red ball", "size": "32x32", "seconds": 8})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seconds"
        # Killed after the switch (past the high-noise expert's share of the steps): the job runs again.
        job = c.videos.create(prompt="a blue square", size="32x32", extra_body={"num_inference_steps": 400})
        deadline = time.time() + 300
        while c.videos.retrieve(job.id).progress < 50:
            assert time.time() < deadline, "the job did not reach its low-noise steps"
            time.sleep(0.1)
        os.kill(replica_pids(ray_tmp)["LowNoiseDenoiser"][0], signal.SIGKILL)
        done = wait_all(serve.url, [job.id], timeout=600)[job.id]
        assert done["status"] == "completed" and done["t2v"]["attempts"] == 2, done
    finally:
        serve.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
