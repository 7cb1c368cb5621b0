"""Ray on many machines, on this one: a head and two worker nodes (`ray.cluster_utils.Cluster`: a raylet each)
that share nothing but the local S3 server, as a cluster shares S3. The model, adapters, job store,
training data and checkpoints live there. Serving and training each lose a worker node without grace mid-job; the
Denoiser autoscales over the nodes and back; and every file a process of one node read was written on that node
(an audit hook in every Ray process logs the files it opens: tests/file_audit)."""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import openai
import pytest
import yaml

import t2v
from t2v import storage
from test_faults import submit, wait_all

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "t2v-multinode"
# The head holds the job API, the text encoder and the decoder ("head" pins them there, as a cluster would keep
# its queue off spot nodes); each worker node has room for one Denoiser replica and two training workers.
HEAD = {"num_cpus": 2, "resources": {"head": 100}}
WORKER = {"num_cpus": 2, "resources": {"denoiser_slot": 1, "trainer": 2}}
ON_HEAD = {name: {"ray_actor_options": {"num_cpus": cpus, "resources": {"head": 1}}}
           for name, cpus in (("Ingress", 0.1), ("TextEncoder", 0.2), ("Decoder", 0.5))}
DENOISER_ON_WORKERS = {"ray_actor_options": {"num_cpus": 0.5, "resources": {"denoiser_slot": 1}}}
# Long enough (about 10 s a job here) that both replicas are mid-job when a node goes.
STEPS = 300


def node_env(audit: Path, node: str) -> dict:
    """Environment of a node's raylet, and so of every process it starts: each logs the files it opens
    (tests/file_audit), and Serve's replicas and handles report load for autoscaling every 0.5 s, not 10 s (a
    test-sized delay, as the autoscaling config's)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "file_audit"), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "T2V_FILE_AUDIT": str(audit), "T2V_NODE": node,
            "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
            "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


class LocalCluster:
    """A head and worker nodes on 127.0.0.1; workers are added and removed as a cloud adds and reclaims them."""

    def __init__(self, audit: Path):
        from ray.cluster_utils import Cluster

        self.audit, self.added = audit, 0
        # Test-sized failure detection: a node that stops answering is declared dead after ~3 s, not ~30 s.
        system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}
        self.cluster = Cluster(initialize_head=True, connect=True, head_node_args={
            **HEAD, "include_dashboard": False, "_system_config": system,
            "env_vars": node_env(audit, "head")})
        self.address = self.cluster.address
        self.workers = [self.add_worker() for _ in range(2)]

    def add_worker(self):
        self.added += 1
        node = self.cluster.add_node(**WORKER, env_vars=node_env(self.audit, f"worker{self.added}"))
        self.cluster.wait_for_nodes()
        return node

    def lose(self, node) -> None:
        """The node's raylet and every process on it killed at once (SIGKILL): a reclaimed spot machine."""
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def keep_two_workers(self) -> None:
        while len(self.workers) < 2:
            self.workers.append(self.add_worker())

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """One cluster for the module (started after the S3 server, so every node's processes reach it). The
    session's one-node Ray, if a test before started it, is stopped meanwhile and started again after."""
    import ray

    from conftest import start_local_ray

    was_running = ray.is_initialized()
    ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    c = LocalCluster(tmp_path_factory.mktemp("file-audit"))
    try:
        yield c
    finally:
        c.shutdown()
        if was_running:
            start_local_ray()


@pytest.fixture(scope="module")
def s3(cluster):
    """The module's bucket, versioned: every write of a key is kept, so a test can count them."""
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    return client


@pytest.fixture(scope="module")
def model_on_s3(s3, wan_dir):
    uri = f"s3://{BUCKET}/models/tiny-wan"
    storage.upload_dir(wan_dir, uri)
    return uri


def actor_nodes(class_name: str) -> list[str]:
    """Node ids of the live actors of a class, from the GCS actor table (ray.util.state would need the
    dashboard, which this cluster does not start)."""
    from ray._private import state

    return sorted(a["Address"]["NodeID"] for a in state.actors().values()
                  if a["State"] == "ALIVE" and a["ActorClassName"] == class_name)


def replica_nodes(deployment: str) -> list[str]:
    return actor_nodes(f"ServeReplica:t2v:{deployment}")


def t2v_status():
    """The t2v application's status from Serve's controller (None until it is deployed)."""
    from ray import serve

    return serve.status().applications.get("t2v")


def running_replicas(deployment: str) -> int:
    app = t2v_status()
    return app.deployments[deployment].replica_states.get("RUNNING", 0) if app else 0


def app_running() -> bool:
    """Serve reports the app RUNNING once every deployment's replicas run."""
    app = t2v_status()
    return app is not None and app.status == "RUNNING"


def wait_for(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while not (value := check()):
        assert time.time() < deadline, f"not within {timeout:.0f} s: {what}"
        time.sleep(every)
    return value


def serve_on(cluster: LocalCluster, folder: Path, model: str, denoiser: dict, args: dict | None = None):
    """`serve run` of the shipped t2v.yaml against the cluster (RAY_ADDRESS), its job store on S3."""
    from ray import serve
    from ray.serve import context

    from t2v.serve.process import serve_shipped_config

    # This driver's serve.status() caches the controller of the graph a test before ran: forget it, and stop that
    # graph if it is still there (`serve run` against a running cluster would join it, keeping its HTTP port).
    context._set_global_client(None)
    serve.shutdown()
    served = serve_shipped_config(
        folder, model, args=args, deployments={**ON_HEAD, "Denoiser": {**DENOISER_ON_WORKERS, **denoiser}},
        settings={"store": f"s3://{BUCKET}/store/{folder.name}", "max_attempts": 3, "poll_after_ms": 100,
                  "concurrency": 2},
        env={"RAY_ADDRESS": cluster.address})
    # /healthz answers once the Ingress runs; the Denoiser replicas on the worker nodes may still be starting.
    wait_for(app_running, 240, "every deployment running")
    return served


def stop_graph(served) -> None:
    """Ctrl-C to `serve run`, then Serve shut down from this driver too: the next test's graph starts clean."""
    from ray import serve

    served.stop()
    serve.shutdown()


def body(seed: int, **extra) -> dict:
    return {"prompt": ["a red ball bouncing", "a blue square sliding"][seed % 2], "size": "32x32", "seconds": "1",
            "seed": seed, "num_inference_steps": STEPS, "guidance_scale": 4.0, "optimize_prompt": False, **extra}


def cross_node_reads(audit: Path, workers: int) -> list[str]:
    """Files that one node's processes read and only another node's processes wrote (after checking that the
    audit saw the head and at least `workers` worker nodes open files)."""
    written, read = collections.defaultdict(set), collections.defaultdict(set)
    logs = list(audit.glob("*.log"))
    active = {log.name.rsplit("-", 1)[0] for log in logs if log.stat().st_size}
    assert "head" in active and len(active - {"head"}) >= workers, active
    for log in logs:
        node = log.name.rsplit("-", 1)[0]
        for line in log.read_text(errors="replace").splitlines():
            kind, path = line.split(" ", 1)
            (written if kind == "W" else read)[path].add(node)
    return sorted(f"{p}: written on {sorted(written[p])}, read on {sorted(read[p] - written[p])}"
                  for p in read if p in written and read[p] - written[p])


def test_serving_loses_a_worker_node_mid_job_and_every_job_completes_once(cluster, s3, model_on_s3, wan_dir,
                                                                           tmp_path):
    """Two Denoiser replicas, one on each worker node, both mid-job; one node is lost without grace. Every
    accepted job completes exactly once: the lost node's job runs again on the survivor (its video is the same
    seed's video made alone), a job sent during the loss is accepted, `GET /v1/videos` lists them all, and no
    video is written to the store twice. A node added back gets its replica back. Also through the graph on the
    cluster: a first frame, a LoRA adapter and a long video whose windows fan out over both nodes, and no file
    read on one node that only another node wrote."""
    from peft import LoraConfig

    from t2v import lora
    from t2v.video import encode_video, read_video

    adapters = f"s3://{BUCKET}/adapters"
    bundle = t2v.load(wan_dir)
    lora.add_trainable(bundle, LoraConfig(r=4, lora_alpha=8, target_modules=list(lora.DEFAULT_TARGETS),
                                          init_lora_weights=False))
    lora.save(bundle, f"{adapters}/desert")
    serve = serve_on(cluster, tmp_path, model_on_s3, {"num_replicas": 2},
                     args={"adapters": {"root": adapters, "max_per_replica": 2}})
    store = f"store/{tmp_path.name}/"
    figures = {}
    try:
        c = openai.OpenAI(base_url=serve.url + "/v1", api_key="unused", max_retries=0)
        workers = sorted(w.node_id for w in cluster.workers)
        assert replica_nodes("Denoiser") == workers  # one replica on each worker node
        # 1. What crosses nodes besides prompts: an image, an adapter, a long video's windows.
        first = c.videos.create_and_poll(prompt="a red ball", size="32x32", poll_interval_ms=200,
                                         input_reference=("first.png", png_bytes(), "image/png"),
                                         extra_body={"seed": 1, "num_inference_steps": 4})
        adapted = c.videos.create_and_poll(model="t2v-default+desert", prompt="a red ball", size="32x32",
                                           poll_interval_ms=200, extra_body={"seed": 1, "num_inference_steps": 4})
        long = c.videos.create_and_poll(prompt="a red ball, then a blue star", size="32x32", seconds="3",
                                        poll_interval_ms=200, extra_body={"seed": 2, "num_inference_steps": 3})
        for v in (first, adapted, long):
            assert v.status == "completed", v.error
        # 2. Four jobs; the node goes once both replicas are sampling.
        deadline = time.time() + 600
        seeds = {submit(serve.url, body(seed), deadline): seed for seed in range(4)}
        ids = list(seeds)

        def sampling() -> list[str]:
            jobs = [c.videos.retrieve(i) for i in ids]
            return [j.id for j in jobs if j.status == "in_progress" and j.progress > 0]

        in_flight = wait_for(lambda: (s if len(s := sampling()) == 2 else None), 120, "both replicas sampling",
                             every=0.1)
        lost, survivor = cluster.workers[0], cluster.workers[1]
        lost_at = time.time()
        cluster.lose(lost)
        late = submit(serve.url, body(4), deadline)  # accepted while the node is being declared dead
        seeds[late] = 4
        ids.append(late)
        final = wait_all(serve.url, ids, timeout=600)
        figures["all jobs final after the loss (s)"] = round(time.time() - lost_at, 1)
        assert [v["status"] for v in final.values()] == ["completed"] * 5, {i: v["error"] for i, v in final.items()}
        attempts = {i: v["t2v"]["attempts"] for i, v in final.items()}
        # Of the two jobs sampling when the node went, the lost node's ran again (on the survivor); the
        # survivor's did not.
        assert sorted(attempts[i] for i in in_flight) == [1, 2], attempts
        retried = [i for i, n in attempts.items() if n > 1]
        assert all(final[i]["t2v"]["served_by"]["node"] == survivor.node_id for i in retried + [late])
        # Their videos are their seeds' videos made alone.
        pipe = t2v.TextToVideoPipeline.from_pretrained(wan_dir)
        for job_id in retried + [late]:
            b = body(seeds[job_id])
            served = read_video(c.videos.download_content(job_id).read()).astype(float)
            alone = pipe(b["prompt"], num_frames=len(served), height=32, width=32, seed=b["seed"],
                         num_inference_steps=STEPS, guidance_scale=4.0).frames[0]
            assert np.abs(served - read_video(encode_video(alone, pipe.bundle.config.fps))).mean() < 0.5  # x264
        listed = {v.id for v in c.videos.list(limit=100)}
        assert set(ids) | {first.id, adapted.id, long.id} <= listed
        # Nothing written twice: each job's video and thumbnail have exactly one version in the store.
        versions = collections.Counter(v["Key"] for page in s3.get_paginator("list_object_versions").paginate(
            Bucket=BUCKET, Prefix=store + "content/") for v in page.get("Versions", []))
        for job_id in ids:
            assert versions[f"{store}content/{job_id}.mp4"] == 1 and versions[f"{store}content/{job_id}.png"] == 1
        # 3. A node comes back: Serve places the missing replica on it.
        added_at = time.time()
        cluster.keep_two_workers()
        wait_for(lambda: replica_nodes("Denoiser") == sorted(w.node_id for w in cluster.workers)
                 and running_replicas("Denoiser") == 2, 180, "a Denoiser replica on the new node")
        figures["replica back on the added node (s)"] = round(time.time() - added_at, 1)
        again = c.videos.create_and_poll(prompt="a red ball", size="32x32", poll_interval_ms=200,
                                         extra_body={"seed": 9, "num_inference_steps": 4})
        assert again.status == "completed", again.error
    finally:
        stop_graph(serve)
        cluster.keep_two_workers()
    print("serving, a worker node lost:", figures)
    assert cross_node_reads(cluster.audit, workers=3) == []  # the lost node, the survivor, the one added


def png_bytes() -> bytes:
    import io

    from PIL import Image

    picture = np.zeros((32, 32, 3), np.uint8)
    picture[8:24, 8:24] = (220, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def test_the_denoiser_autoscales_from_one_replica_onto_both_worker_nodes_and_back(cluster, model_on_s3,
                                                                                   tmp_path):
    """t2v.yaml's Denoiser autoscaling (its bounds and target; delays test-sized): a burst of jobs takes it from
    its min to its max replicas, on different nodes, and it returns to its min once idle."""
    shipped = yaml.safe_load((ROOT / "serve_configs" / "t2v.yaml").read_text())
    denoiser = next(d for d in shipped["applications"][0]["deployments"] if d["name"] == "Denoiser")
    scaling = denoiser["autoscaling_config"]
    scaling = {**scaling, "upscale_delay_s": 1, "downscale_delay_s": 4, "look_back_period_s": 2,
               "metrics_interval_s": 0.5}
    low, high = scaling["min_replicas"], scaling["max_replicas"]
    assert (low, high) == (1, 2)  # the layout below is sized for these
    serve = serve_on(cluster, tmp_path, model_on_s3, {"autoscaling_config": scaling})
    timeline: list[tuple[float, int, list[str]]] = []
    stop = threading.Event()
    start = time.time()

    def watch():
        while not stop.is_set():
            timeline.append((round(time.time() - start, 1), running_replicas("Denoiser"), replica_nodes("Denoiser")))
            time.sleep(0.25)

    try:
        wait_for(lambda: running_replicas("Denoiser") == low, 60, "the min replicas before the burst")
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        deadline = time.time() + 600
        ids = [submit(serve.url, body(seed), deadline) for seed in range(16)]  # ~30 s of work for one replica
        final = wait_all(serve.url, ids, timeout=600)
        assert all(v["status"] == "completed" for v in final.values())
        wait_for(lambda: running_replicas("Denoiser") == low and len(replica_nodes("Denoiser")) == low, 120,
                 "back to the min replicas once idle")
        stop.set()
        watcher.join()
    finally:
        stop.set()
        stop_graph(serve)
    changes = [timeline[0]] + [p for q, p in zip(timeline, timeline[1:]) if p[1:] != q[1:]]
    print("Denoiser replicas over time (s, running, nodes):",
          [(t, n, [x[:8] for x in nodes]) for t, n, nodes in changes])
    peak = max(timeline, key=lambda p: p[1])
    assert peak[1] == high and len(set(peak[2])) == high  # at its max, one replica on each worker node
    assert set(peak[2]) <= {w.node_id for w in cluster.workers}
    assert timeline[-1][1] == low


def test_training_loses_a_worker_node_and_resumes_from_its_last_checkpoint(cluster, s3, tmp_path):
    """Ray Train, two workers on two nodes, data streamed from S3 shards by Ray Data, checkpoints to S3; one
    worker node is lost after a checkpoint, mid-way to the next. The run restarts its workers from that
    checkpoint (the step count continues right after it and every sample is counted once), the loss keeps
    falling, and the final bundle, written to S3, loads."""
    from t2v.data.shards import WorldSpec, write_world
    from t2v.train import TrainConfig
    from test_train_ray import fit_in_background, reports

    data, out = f"s3://{BUCKET}/world", f"s3://{BUCKET}/trained/tiny"
    write_world(data, WorldSpec(clips=48, shards=2, width=32, height=32, num_frames=9), parallel=False)
    cfg = TrainConfig(family="wan", preset="tiny", data=data, out=out, steps=60, batch_size=2, lr=2e-3,
                      warmup_steps=3, num_frames=9, size=32, checkpoint_every=10, log_every=2, num_workers=2,
                      cpus_per_worker=0.5, data_cpus=0.25, max_failures=2, worker_resources={"trainer": 1},
                      placement_strategy="SPREAD",
                      bundle_config=dict(num_frames=9, height=32, width=32, num_inference_steps=4,
                                         max_sequence_length=64))
    log = tmp_path / "reports.jsonl"
    runner, outcome = fit_in_background(cfg, f"s3://{BUCKET}/runs", log)

    lost_after = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and runner.is_alive():
            seen = reports(log)
            ckpts = [r["step"] for r in seen if r["checkpoint"]]
            if ckpts and seen[-1]["step"] > ckpts[-1]:
                nodes = actor_nodes("RayTrainWorker")
                assert nodes == sorted(w.node_id for w in cluster.workers)  # one worker on each node
                lost_after = (ckpts[-1], seen[-1]["step"], time.time())
                cluster.lose(next(w for w in cluster.workers if w.node_id == nodes[0]))
                break
            time.sleep(0.2)
        if lost_after:  # the first report after the loss: workers restarted on the survivor
            wait_for(lambda: len(reports(log)) > len(seen), 300, "a report after the restart")
            lost_after += (time.time() - lost_after[2],)
        runner.join(timeout=600)
    finally:
        cluster.keep_two_workers()
    assert lost_after, "the run ended before a node could be lost"
    result = outcome["result"]
    assert result.error is None
    history = reports(log)
    steps = [r["step"] for r in history]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == lost_after[0] + cfg.log_every  # resumed right after the last checkpoint
    assert steps[-1] == cfg.steps and result.metrics["step"] == cfg.steps
    assert result.metrics["samples_seen"] == cfg.steps * cfg.batch_size * cfg.num_workers  # none counted twice
    losses = [r["loss_avg"] for r in history]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    print(f"training, a worker node lost after step {lost_after[1]} (checkpoint {lost_after[0]}): training again "
          f"{lost_after[3]:.0f} s later, from step {steps[restart]}")
    assert t2v.load(out).family.name == "wan"
    assert cross_node_reads(cluster.audit, workers=2) == []


def test_the_file_audit_sees_a_file_written_on_one_node_and_read_on_another(cluster, tmp_path):
    """The run-level check itself, on purpose: a task on one worker node writes a local file that a task on the
    other reads (what a stage must never do); the audit names it. (Last in the module: the file stays logged.)"""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path = str(tmp_path / "handed-over-by-disk.bin")
    a, b = (w.node_id for w in cluster.workers)

    @ray.remote(num_cpus=0)
    def write(p):
        with open(p, "wb") as f:
            f.write(b"latents")

    @ray.remote(num_cpus=0)
    def read(p):
        with open(p, "rb") as f:
            return f.read()

    ray.get(write.options(scheduling_strategy=NodeAffinitySchedulingStrategy(a, soft=False)).remote(path))
    assert ray.get(read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(b, soft=False)).remote(path)) \
        == b"latents"
    flagged = [line for line in cross_node_reads(cluster.audit, workers=2) if line.startswith(path + ":")]
    assert len(flagged) == 1, cross_node_reads(cluster.audit, workers=2)
