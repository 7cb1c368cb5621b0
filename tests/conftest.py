"""Shared fixtures: tiny bundles built from config, bundles in the exact layouts of real checkpoints,
and a real S3 endpoint (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

import t2v
from t2v.families import LATTE, UNET3D, WAN

# Small enough that a whole generation takes well under a second on 2 cores.
WAN_TINY = dict(max_sequence_length=32, num_frames=9, height=32, width=32, num_inference_steps=3, fps=8)
UNET3D_TINY = dict(max_sequence_length=32, num_frames=4, height=32, width=32, num_inference_steps=3, fps=8)
LATTE_TINY = dict(UNET3D_TINY, num_frames=5, max_frames=5)  # the tiny preset's video_length


def needs_program(name: str):
    """Skip a test when a system program is missing, except in CI (CI=true): .ci/run installs every program the
    suite uses, so there a missing one fails the test instead of hiding behind a skip."""
    return pytest.mark.skipif(shutil.which(name) is None and not os.environ.get("CI"),
                              reason=f"needs {name} (.ci/run installs it from Debian)")


def fresh_python(code: str) -> subprocess.CompletedProcess:
    """`code` run by a new interpreter of this environment (what a process imports, or does at exit, unaffected by
    the test session's own imports); its exit status and text output."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def build_tiny(family, seed: int = 0) -> t2v.Bundle:
    torch.manual_seed(seed)
    config = {WAN.name: WAN_TINY, UNET3D.name: UNET3D_TINY, LATTE.name: LATTE_TINY}[family.name]
    return t2v.from_components(family, family.build("tiny"), config=config)


@pytest.fixture(scope="session")
def wan_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "wan-tiny"
    build_tiny(WAN).save(str(path))
    return path


@pytest.fixture(scope="session")
def unet3d_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "unet3d-tiny"
    build_tiny(UNET3D).save(str(path))
    return path


@pytest.fixture(scope="session")
def latte_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "latte-tiny"
    build_tiny(LATTE).save(str(path))
    return path


@pytest.fixture(scope="session")
def wan_pipe(wan_dir):
    return t2v.TextToVideoPipeline.from_pretrained(wan_dir)


@pytest.fixture(scope="session")
def unet3d_pipe(unet3d_dir):
    return t2v.TextToVideoPipeline.from_pretrained(unet3d_dir)


@pytest.fixture(scope="session")
def latte_pipe(latte_dir):
    return t2v.TextToVideoPipeline.from_pretrained(latte_dir)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port; boto3 finds it through AWS_ENDPOINT_URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    import boto3

    name = "t2v-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def start_local_ray():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # address="local": always a cluster of the suite's own. Without it, ray.init joins any Ray already running on
    # the machine (another checkout's tests, a user's `ray start`) and refuses num_cpus.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A real local Ray (2 CPUs). Started after the S3 server so workers inherit its endpoint. A module that
    needs a cluster of its own (test_multinode) stops it for its tests and starts it again after them."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def generator(wan_dir):
    """The job API's in-process generator over the tiny wan bundle."""
    from t2v.serve.stages import LocalGenerator

    return LocalGenerator(t2v.load(wan_dir))
