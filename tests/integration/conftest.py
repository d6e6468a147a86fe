"""One local Ray cluster and one chaos application for the integration tier.

The application is configs/chaos.yaml deployed the way `serve run` deploys a
config file (the controller calls serve_app.app:build_app with the file's
args), with fast timers layered over its args so breaker waits and health
periods take a second or two.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import load_serve_config

TOKEN = "integration-test-token"
APP = "genguard"
MODELS = ("hunyuan-video", "wan-t2v", "wan-i2v", "wan-ati", "newbie-image", "qwen-image", "qwen-image-edit")

FAST_RESILIENCE: dict[str, Any] = {
    "retry": {"max_attempts": 2, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "multiplier": 2.0,
              "jitter": 0.5, "attempt_timeout_s": 3.0},
    "max_total_attempts": 5,
    "breaker": {"fail_max": 6, "sliding_window": "count", "window_size_calls": 20,
                "failure_rate_threshold": 0.8, "minimum_calls": 10, "wait_in_open_s": 1.5,
                "half_open_permits": 1, "slow_call_duration_s": 30.0},
    "degradation": {
        "levels": [
            {"name": "light", "step_factor": 0.75, "min_steps": 2},
            {"name": "medium", "step_factor": 0.5, "min_steps": 2, "max_side_px": 64, "max_frames": 9},
            {"name": "heavy", "step_factor": 0.25, "min_steps": 1, "max_side_px": 48, "max_frames": 5},
        ],
        "policy": {"window_s": 5, "min_samples": 1000, "healthy_period_s": 2, "raise_interval_s": 1,
                   "raise_on_breaker_open": False},
    },
    "supervisor": {"report_interval_s": 2.0, "flush_failure_s": 0.02, "refresh_timeout_s": 5.0,
                   "stale_after_s": 8.0, "health_poll_s": 0.5, "tick_s": 0.1},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast_app_config(name: str = APP, route_prefix: str = "/") -> dict[str, Any]:
    """configs/chaos.yaml's application with the fast test timers."""
    doc = load_serve_config("chaos")
    app = copy.deepcopy(doc["applications"][0])
    app["name"] = name
    app["route_prefix"] = route_prefix
    args = app["args"]
    args["resilience"] = copy.deepcopy(FAST_RESILIENCE)
    args["deadline"] = {"default_s": 20, "max_s": 60}
    args["fault_injection"] = {"enabled": True, "poll_s": 0.2}
    for m in args["models"].values():
        # Replica replacement on repeated failures has its own test; here a
        # fault must not make Serve restart replicas under the other tests.
        m["unhealthy_after_failures"] = 10_000
    for dep in app["deployments"]:
        if dep["name"] in ("qwen-image", "newbie-image"):
            dep["max_ongoing_requests"] = 1
            dep["max_queued_requests"] = 2
        if dep["name"] != "router":
            dep["health_check_period_s"] = 1
    return app


class ChaosApp:
    """HTTP and admin helpers around the deployed application."""

    def __init__(self, url: str, app_name: str = APP):
        self.url = url
        self.app_name = app_name
        self.http = httpx.Client(base_url=url, timeout=120)
        self.auth = {"Authorization": f"Bearer {TOKEN}"}

    def post(self, path: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
        return self.http.post(path, json=body, **kw)

    def image(self, **body: Any) -> httpx.Response:
        return self.post("/v1/images", {"prompt": "a red fox", **body})

    def video(self, **body: Any) -> httpx.Response:
        return self.post("/v1/videos", {"prompt": "a red fox running", **body})

    def fault(self, model: str, mode: str, rate: float = 1.0, **kw: Any) -> dict[str, Any]:
        r = self.http.post("/admin/faults", json={"model": model, "mode": mode, "rate": rate, **kw},
                           headers=self.auth)
        assert r.status_code == 201, r.text
        time.sleep(0.6)  # replicas pick faults up within poll_s (0.2 s)
        return dict(r.json())

    def clear_faults(self) -> None:
        r = self.http.delete("/admin/faults", headers=self.auth)
        assert r.status_code == 200, r.text

    def status(self) -> dict[str, Any]:
        return dict(self.http.get("/v1/status").json())

    def breaker(self, model: str) -> str:
        return str(self.status()["models"][model]["breaker"]["state"])

    def wait_breaker(self, model: str, state: str, timeout: float = 15) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.breaker(model) == state:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"{model} breaker not {state} after {timeout}s: {self.status()['models'][model]}")

    def reset(self) -> None:
        self.clear_faults()
        r = self.http.post("/admin/reset", headers=self.auth)
        assert r.status_code == 200, r.text
        r = self.http.put("/admin/degradation", json={"level": "auto"}, headers=self.auth)
        assert r.status_code == 200, r.text

    def wait_all_healthy(self, models: tuple[str, ...] = MODELS, timeout: float = 180) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = self.status()["models"]
            if all(st[m]["health"] == "healthy" and st[m]["replicas"]["running"] >= 1 for m in models):
                return
            time.sleep(0.25)
        raise AssertionError(f"models not healthy: {self.status()['models']}")

    def calls(self, model: str) -> int:
        """Generations the model's replica has started (its own counter)."""
        from ray import serve

        h = serve.get_deployment_handle(model, app_name=self.app_name)
        return int(h.info.remote().result(timeout_s=30)["calls"])

    def replica_actor_names(self, model: str) -> list[str]:
        import ray

        prefix = f"SERVE_REPLICA::{self.app_name}#{model}#"
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["namespace"] == "serve" and a["name"].startswith(prefix))

    def report(self, until: Any = None, timeout: float = 10.0) -> dict[str, Any]:
        """GET /v1/errors/report, polled until ``until(report)`` holds
        (outcome batches reach the supervisor every report_interval_s)."""
        t0 = time.monotonic()
        while True:
            rep = dict(self.http.get("/v1/errors/report").json())
            if until is None or until(rep) or time.monotonic() - t0 > timeout:
                return rep
            time.sleep(0.25)

    def kill_replica(self, model: str) -> str:
        import ray

        names = self.replica_actor_names(model)
        assert names, f"no live replica of {model}"
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
        return names[0]


def deploy(apps: list[dict[str, Any]], port: int) -> None:
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    doc = load_serve_config("chaos")
    schema = ServeDeploySchema.model_validate(
        {"proxy_location": "HeadOnly",
         "http_options": {"host": "127.0.0.1", "port": port, "request_timeout_s": doc["http_options"]["request_timeout_s"]},
         "applications": apps}
    )
    client = serve_api.serve_start(http_options={"host": "127.0.0.1", "port": port})
    client.deploy_apps(schema, _blocking=False)


def wait_app_running(name: str = APP, timeout: float = 300) -> None:
    """Until Serve reports the application RUNNING (every deployment healthy)."""
    from ray import serve

    t0 = time.monotonic()
    status = None
    while time.monotonic() - t0 < timeout:
        app = serve.status().applications.get(name)
        status = None if app is None else str(getattr(app.status, "value", app.status))
        if status == "RUNNING":
            return
        time.sleep(0.5)
    raise AssertionError(f"application {name} not RUNNING: {status}")


def wait_ready(url: str, timeout: float = 600) -> dict[str, Any]:
    t0 = time.monotonic()
    last: Any = None
    while time.monotonic() - t0 < timeout:
        try:
            r = httpx.get(url + "/readyz", timeout=5)
            last = r.text
            if r.status_code == 200:
                return dict(r.json())
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    raise AssertionError(f"{url} not ready: {last}")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    os.environ["GENGUARD_ADMIN_TOKEN"] = TOKEN  # inherited by the replicas
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="genguard-tests", log_to_driver=False)
        started = True
    yield
    if started:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_cluster: None) -> int:
    return free_port()


@pytest.fixture(scope="session")
def chaos_app(ray_cluster: None, serve_port: int, tiny_dir: Path) -> ChaosApp:
    app = fast_app_config()
    app["args"]["models_root"] = str(tiny_dir)
    deploy([app], serve_port)
    url = f"http://127.0.0.1:{serve_port}"
    t0 = time.monotonic()
    wait_ready(url)
    print(f"\n[integration] chaos app ready in {time.monotonic() - t0:.1f}s")
    return ChaosApp(url)


@pytest.fixture
def chaos(chaos_app: ChaosApp) -> Iterator[ChaosApp]:
    """The chaos app, reset before and after the test (no fault or OPEN breaker leaks)."""
    wait_app_running()
    chaos_app.wait_all_healthy()
    chaos_app.reset()
    yield chaos_app
    chaos_app.reset()
