"""k8s/ and cluster/: every manifest validated against the real KubeRay CRDs (k8s/crds/, strict: unknown fields
fail) and Ray's cluster-launcher schema; the RayService serves exactly serve_configs/t2v-gpu.yaml."""

from __future__ import annotations

import copy
import functools
import json
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayCluster": "ray.io_rayclusters.yaml"}


def strict(schema):
    """Kubernetes prunes unknown fields silently; here they are errors (like kubeconform --strict)."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_spec_schema(kind: str) -> dict:
    crd = yaml.load((ROOT / "k8s" / "crds" / CRDS[kind]).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"]["properties"]["spec"])


def validate(manifest: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    jsonschema.validate(manifest["spec"], crd_spec_schema(manifest["kind"]))


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "k8s" / name).read_text())


RAYSERVICES = {"rayservice.yaml": 1, "rayservice-cfg2.yaml": 2, "rayservice-ulysses4.yaml": 4,
               "rayservice-wan22-experts.yaml": 1}  # GPUs per worker


@pytest.mark.parametrize("name", [*RAYSERVICES, "rayjob-train.yaml"])
def test_manifests_match_the_kuberay_crds(name):
    manifest = load(name)
    validate(manifest)
    cluster = manifest["spec"].get("rayClusterConfig") or manifest["spec"]["rayClusterSpec"]
    gpu = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == RAYSERVICES.get(name, 1)  # a parallel gang's GPUs on one pod
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for c in group["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": "t2v-s3"}} in c["envFrom"]  # S3 credentials from the Secret


def test_a_wrong_field_fails_validation():
    manifest = load("rayservice.yaml")
    typo = copy.deepcopy(manifest)
    typo["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParmas"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParmas"):
        validate(typo)
    wrong_type = copy.deepcopy(manifest)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong_type)
    job = load("rayjob-train.yaml")
    job["spec"]["entrypointt"] = "python x.py"
    with pytest.raises(jsonschema.ValidationError):
        validate(job)


@pytest.mark.parametrize("name", RAYSERVICES)
def test_rayservice_serves_exactly_the_tested_serve_config(name):
    from ray.serve.schema import ServeDeploySchema

    sys.path.insert(0, str(ROOT / "k8s"))
    try:
        import sync
    finally:
        sys.path.pop(0)
    manifest = load(name)
    serve = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    assert serve == yaml.safe_load((ROOT / "serve_configs" / sync.MANIFESTS[name][0]).read_text())
    ServeDeploySchema.model_validate(serve)
    assert sync.denoiser_gpus(serve) == RAYSERVICES[name]
    # And the committed file is what k8s/sync.py writes.
    assert sync.rayservice(name) == (ROOT / "k8s" / name).read_text()
    assert manifest["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_training_job_config_and_ingress():
    from t2v.train.config import TrainConfig

    job = load("rayjob-train.yaml")
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "jobs/train.py"] and (ROOT / entry[1]).exists()
    cfg = TrainConfig.from_yaml(str(ROOT / entry[entry.index("--config") + 1]))
    assert cfg.use_gpu and cfg.num_workers == 4 and cfg.checkpoint_dir.startswith("s3://")
    assert cfg.data.startswith("s3://") and cfg.out.startswith("s3://")
    ingress = load("ingress.yaml")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == f"{load('rayservice.yaml')['metadata']['name']}-serve-svc"  # KubeRay's Service
    assert backend["port"]["number"] == yaml.safe_load(load("rayservice.yaml")["spec"]["serveConfigV2"])[
        "http_options"]["port"]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "local.yaml"])
def test_cluster_launcher_configs_match_rays_schema(name):
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    jsonschema.validate(config, schema)
    bad = {**config, "max_wokers": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_dockerfile_copies_what_exists():
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
