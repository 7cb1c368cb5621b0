"""`serve run CONFIG` as a child process that is ready when its /healthz answers (tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..ports import free_port


class ServeProcess:
    """Start `serve run config` (its own process group) and wait until the HTTP API answers; `stop()` sends
    Ctrl-C like a user would, so Serve shuts down cleanly. `env`: variables added to its environment (and so
    to every Ray process it starts), e.g. T2V_API_KEYS."""

    def __init__(self, config: str | Path, url: str, log: str | Path, cwd: str | Path | None = None,
                 timeout: float = 240, env: dict | None = None):
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), **(env or {})}
        serve = os.path.join(os.path.dirname(sys.executable), "serve")
        self.log_path, self.url = Path(log), url.rstrip("/")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([serve, "run", str(config)], cwd=cwd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"serve run did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 60) -> None:
        """Ctrl-C, then wait until the port is closed: Ray's HTTP proxy is a process of its own that can still
        answer for a moment after `serve run` exits, and a server started next on the same port would otherwise
        pass its health check on the old proxy, then refuse connections when that proxy goes."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                httpx.get(self.url + "/healthz", timeout=1)
            except httpx.ConnectError:
                return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_shipped_config(folder: str | Path, model: str | None = None, denoiser_replicas: int | None = None,
                         root: str | Path | None = None, config: str = "t2v.yaml", args: dict | None = None,
                         deployments: dict | None = None, settings: dict | None = None,
                         env: dict | None = None) -> ServeProcess:
    """`serve run` of a shipped config (serve_configs/t2v.yaml by default) on a free loopback port with a job
    store in `folder`: what benchmarks measure. Optionally another model, a fixed number of Denoiser replicas,
    application args (e.g. precision, step_batching), job-service settings, per-deployment options
    ({name: {option: value}}, e.g. to fit the GPU layout onto one GPU; a deployment the config does not list is
    added) and environment variables."""
    import yaml

    root = Path(root or Path(__file__).resolve().parents[2])
    folder = Path(folder)
    port = free_port()
    config = yaml.safe_load((root / "serve_configs" / config).read_text())
    config["http_options"].update(host="127.0.0.1", port=port)
    app = config["applications"][0]
    app["args"].update(model=model, **(args or {}))
    app["args"]["settings"].update({"store": str(folder / "store"), **(settings or {})})  # or settings' s3:// store
    options = {name: dict(opts) for name, opts in (deployments or {}).items()}
    if denoiser_replicas:
        options.setdefault("Denoiser", {})["num_replicas"] = denoiser_replicas
    for d in app["deployments"]:
        for key, value in options.pop(d["name"], {}).items():
            if key == "num_replicas":
                d.pop("autoscaling_config", None)
            d[key] = value
    app["deployments"] += [{"name": name, **opts} for name, opts in options.items()]  # e.g. LowNoiseDenoiser
    (folder / "t2v.yaml").write_text(yaml.safe_dump(config))
    return ServeProcess(folder / "t2v.yaml", f"http://127.0.0.1:{port}", folder / "serve.log", cwd=root, env=env)
