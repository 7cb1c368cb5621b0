"""Write the RayService manifests: the template with serveConfigV2 set to a Serve config, so a cluster serves
exactly the config that is tested locally (one source of truth), and each GPU worker pod sized for one of
its Denoiser replicas (a 2- or 4-GPU gang for the parallel layouts: their placement groups are STRICT_PACK).

    python k8s/sync.py

    rayservice.yaml            serve_configs/t2v-gpu.yaml            one GPU per Denoiser replica
    rayservice-cfg2.yaml       serve_configs/t2v-gpu-cfg2.yaml       guidance-parallel gangs of 2 GPUs
    rayservice-ulysses4.yaml   serve_configs/t2v-wan14b-ulysses4.yaml   sequence-parallel gangs of 4 GPUs
    rayservice-wan22-experts.yaml   serve_configs/t2v-wan22-a14b-experts.yaml   a GPU per expert replica
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SERVE_CONFIGS = HERE.parent / "serve_configs"
# manifest -> (Serve config, RayService name)
MANIFESTS = {
    "rayservice.yaml": ("t2v-gpu.yaml", "t2v"),
    "rayservice-cfg2.yaml": ("t2v-gpu-cfg2.yaml", "t2v-cfg2"),
    "rayservice-ulysses4.yaml": ("t2v-wan14b-ulysses4.yaml", "t2v-ulysses4"),
    "rayservice-wan22-experts.yaml": ("t2v-wan22-a14b-experts.yaml", "t2v-wan22-experts"),
}


def denoiser_gpus(serve_config: dict) -> int:
    """GPUs one Denoiser replica takes: its placement group's, or its own num_gpus."""
    denoiser = next(d for d in serve_config["applications"][0]["deployments"] if d["name"] == "Denoiser")
    bundles = denoiser.get("placement_group_bundles")
    if bundles:
        return int(sum(b.get("GPU", 0) for b in bundles))
    return math.ceil(denoiser["ray_actor_options"].get("num_gpus", 0))


def rayservice(manifest: str = "rayservice.yaml") -> str:
    config_name, name = MANIFESTS[manifest]
    template = (HERE / "rayservice.template.yaml").read_text()
    serve = (SERVE_CONFIGS / config_name).read_text()
    gpus = denoiser_gpus(yaml.safe_load(serve))
    # serveConfigV2 is a YAML document in a string: keep it a readable literal block, comments included.
    block = "serveConfigV2: |\n" + "".join(f"    {line}\n" if line.strip() else "\n" for line in serve.splitlines())
    replacements = {
        'serveConfigV2: ""  # filled by k8s/sync.py from serve_configs/t2v-gpu.yaml\n': block,
        "serve_configs/t2v-gpu.yaml, then run": f"serve_configs/{config_name}, then run",
        "  name: t2v\n": f"  name: {name}\n",
        # a worker pod per Denoiser replica: its GPUs, and CPUs and memory in proportion
        'requests: {cpu: "8", memory: 32Gi, nvidia.com/gpu: 1}':
            f'requests: {{cpu: "{8 * gpus}", memory: {32 * gpus}Gi, nvidia.com/gpu: {gpus}}}',
        'limits: {cpu: "8", memory: 32Gi, nvidia.com/gpu: 1}':
            f'limits: {{cpu: "{8 * gpus}", memory: {32 * gpus}Gi, nvidia.com/gpu: {gpus}}}',
    }
    for marker, text in replacements.items():
        assert marker in template, f"the template lost {marker.strip()!r}"
        template = template.replace(marker, text, 1)
    return template


def main() -> None:
    for manifest in MANIFESTS:
        text = rayservice(manifest)
        yaml.safe_load(text)  # still one valid document
        (HERE / manifest).write_text(text)
        print(f"wrote {HERE / manifest}")


if __name__ == "__main__":
    main()
