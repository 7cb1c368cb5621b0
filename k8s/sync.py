"""Write k8s/rayservice.yaml: the template with serveConfigV2 set to serve_configs/t2v-gpu.yaml, so the
cluster serves exactly the config that is tested locally (one source of truth).

    python k8s/sync.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SERVE_CONFIG = HERE.parent / "serve_configs" / "t2v-gpu.yaml"


def rayservice() -> str:
    template = (HERE / "rayservice.template.yaml").read_text()
    serve = SERVE_CONFIG.read_text()
    # serveConfigV2 is a YAML document in a string: keep it a readable literal block, comments included.
    block = "serveConfigV2: |\n" + "".join(f"    {line}\n" if line.strip() else "\n" for line in serve.splitlines())
    marker = 'serveConfigV2: ""  # filled by k8s/sync.py from serve_configs/t2v-gpu.yaml\n'
    assert marker in template, "the template lost its serveConfigV2 placeholder"
    return template.replace(marker, block)


def main() -> None:
    text = rayservice()
    yaml.safe_load(text)  # still one valid document
    (HERE / "rayservice.yaml").write_text(text)
    print(f"wrote {HERE / 'rayservice.yaml'}")


if __name__ == "__main__":
    main()
