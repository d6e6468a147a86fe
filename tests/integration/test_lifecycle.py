"""Start-up and restart behaviour: broken deployments, bad configs, supervisor
and router restarts."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import (
    ChaosApp,
    deploy,
    fast_app_config,
    wait_app_running,
    wait_ready,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def _app_status(name: str) -> tuple[str, str]:
    from ray import serve

    st = serve.status().applications.get(name)
    if st is None:
        return ("MISSING", "")
    return (str(getattr(st.status, "value", st.status)), st.message or "")


def _image_only(name: str, prefix: str, tiny_dir: Path, qwen_source: str) -> dict:
    app = fast_app_config(name=name, route_prefix=prefix)
    args = app["args"]
    args["models_root"] = str(tiny_dir)
    args["models"] = {k: v for k, v in args["models"].items() if k in ("qwen-image", "newbie-image")}
    args["models"]["qwen-image"]["source"] = qwen_source
    args["workflows"] = {"text-to-image": {"chain": ["qwen-image", "newbie-image"]}}
    app["deployments"] = [d for d in app["deployments"] if d["name"] in ("router", "qwen-image", "newbie-image")]
    return app


def test_constructor_failing_model_keeps_app_serving(chaos: ChaosApp, serve_port: int, tiny_dir: Path) -> None:
    """A deployment whose constructor fails on every try: the app keeps serving
    through the other model, /readyz is 200 listing it unhealthy, /v1/status says down."""
    main = fast_app_config()
    main["args"]["models_root"] = str(tiny_dir)
    broken = _image_only("broken", "/broken", tiny_dir, "/nonexistent/qwen-image")
    deploy([main, broken], serve_port)
    url = f"{chaos.url}/broken"
    try:
        deadline = time.monotonic() + 240
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(url + "/readyz", timeout=5)
                body = r.json()
                if r.status_code == 200:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        assert body is not None and body["ready"] is True, body
        assert body["workflows"]["text-to-image"]["healthy"] == ["newbie-image"]
        st = httpx.get(url + "/v1/status", timeout=10).json()
        assert st["models"]["qwen-image"]["health"] == "down"
        r = httpx.post(url + "/v1/images", json={"prompt": "a fox"}, timeout=60)
        assert r.status_code == 200 and r.headers["x-model"] == "newbie-image"
        assert r.headers["x-fallback-depth"] == "1"
        attempts = int(r.headers["x-attempts"])
        assert attempts == 1, "a model known to be down is skipped, not called"
        # The main application is untouched.
        assert chaos.image().status_code == 200
    finally:
        deploy([main], serve_port)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _app_status("broken")[0] != "MISSING":
            time.sleep(1)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda a: a["workflows"].__setitem__("text-to-video", {"chain": ["hunyuan-video", "wan-t2v", "hunyuan-video"]}),
         "workflows.text-to-video.chain.2"),
        (lambda a: a["workflows"].__setitem__("text-to-image", {"chain": ["qwen-image", "qwen-imagex"]}),
         "qwen-imagex"),
    ],
)
def test_bad_chain_fails_at_startup_naming_it(chaos: ChaosApp, serve_port: int, tiny_dir: Path, mutate, needle) -> None:
    """A cyclic or unknown fallback reference fails the deploy with a message naming it."""
    main = fast_app_config()
    main["args"]["models_root"] = str(tiny_dir)
    bad = fast_app_config(name="badcfg", route_prefix="/badcfg")
    mutate(bad["args"])
    deploy([main, bad], serve_port)
    try:
        deadline = time.monotonic() + 120
        status, message = _app_status("badcfg")
        while time.monotonic() < deadline and status != "DEPLOY_FAILED":
            time.sleep(0.5)
            status, message = _app_status("badcfg")
        assert status == "DEPLOY_FAILED"
        assert needle in message
    finally:
        deploy([main], serve_port)


def test_open_breaker_survives_supervisor_restart_and_new_router(chaos: ChaosApp) -> None:
    """An OPEN breaker stays OPEN across a supervisor restart, and a router
    replica started afterwards sees it OPEN."""
    import ray

    from serve_app.supervisor_link import supervisor_name

    chaos.http.post("/admin/faults", json={"model": "wan-t2v", "mode": "error"}, headers=chaos.auth)
    time.sleep(0.6)
    for _ in range(3):
        chaos.video(model="wan-t2v", fallback="strict")
    chaos.wait_breaker("wan-t2v", "open", timeout=5)
    # Keep it open past the test's duration, whatever wait_in_open_s is.
    sup = ray.get_actor(supervisor_name("genguard"), namespace="genguard")
    ray.kill(sup, no_restart=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get(ray.get_actor(supervisor_name("genguard"), namespace="genguard").ping.remote(), timeout=5)
            break
        except Exception:
            time.sleep(0.3)
    snap = ray.get(ray.get_actor(supervisor_name("genguard"), namespace="genguard").snapshot.remote(-1, 0.0))
    assert snap["breakers"]["wan-t2v"]["state"] in ("open", "half_open")
    # A new router replica: kill the current one; Serve starts a fresh one.
    old = chaos.replica_actor_names("router")
    chaos.kill_replica("router")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        names = chaos.replica_actor_names("router")
        if names and names != old:
            try:
                st = httpx.get(chaos.url + "/v1/status", timeout=5).json()
                if st["supervisor"]["reachable"]:
                    break
            except (httpx.HTTPError, ValueError):
                pass
        time.sleep(0.5)
    st = httpx.get(chaos.url + "/v1/status", timeout=5).json()
    assert st["supervisor"]["reachable"] is True
    assert st["models"]["wan-t2v"]["breaker"]["state"] in ("open", "half_open")
    r = chaos.video(model="wan-t2v", fallback="strict")
    assert r.status_code == 503  # still failing: never a 200 past an open breaker


def test_sick_replica_is_replaced_by_health_check(chaos: ChaosApp, serve_port: int, tiny_dir: Path) -> None:
    """A replica past its consecutive-failure threshold fails check_health and
    Serve replaces it (a new replica process), after which it serves again."""
    main = fast_app_config()
    main["args"]["models_root"] = str(tiny_dir)
    sick = copy.deepcopy(main)
    sick["args"]["models"]["wan-ati"]["unhealthy_after_failures"] = 2
    deploy([sick], serve_port)
    try:
        time.sleep(2.0)
        wait_app_running()
        wait_ready(chaos.url, timeout=180)
        chaos.wait_all_healthy()
        before = chaos.replica_actor_names("wan-ati")
        chaos.fault("wan-ati", "error")
        img = {"image": __import__("tests.integration.test_resilience_e2e", fromlist=["png_b64"]).png_b64()}
        for _ in range(2):
            chaos.video(model="wan-ati", fallback="strict", num_frames=5, **img)
        chaos.clear_faults()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            now = chaos.replica_actor_names("wan-ati")
            if now and now != before:
                break
            time.sleep(0.5)
        assert now and now != before, "Serve did not replace the sick replica"
        chaos.wait_all_healthy()
        chaos.reset()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = chaos.video(model="wan-ati", num_frames=5, deadline_s=60, **img)
            if r.status_code == 200 and r.headers["x-model"] == "wan-ati":
                break
            time.sleep(1.0)
        assert r.status_code == 200 and r.headers["x-model"] == "wan-ati", (r.status_code, dict(r.headers))
    finally:
        deploy([main], serve_port)
        time.sleep(2.0)  # let the controller start the rollout before polling
        wait_app_running()
        wait_ready(chaos.url, timeout=180)


def test_supervisor_killed_for_good_is_recreated_by_routers(chaos: ChaosApp) -> None:
    """With the supervisor killed for good, routers keep serving and recreate it;
    the new one restores the OPEN breaker from the store."""
    import ray

    from serve_app.supervisor_link import supervisor_name

    chaos.fault("hunyuan-video", "error")
    for _ in range(3):
        chaos.video(model="hunyuan-video", fallback="strict")
    chaos.wait_breaker("hunyuan-video", "open", timeout=5)
    old = ray.get_actor(supervisor_name("genguard"), namespace="genguard")
    old_id = old._actor_id.hex()
    ray.kill(old, no_restart=True)
    deadline = time.monotonic() + 30
    new_id = old_id
    while time.monotonic() < deadline:
        r = chaos.video(seed=1)
        assert r.status_code == 200, r.text  # served by wan-t2v throughout
        try:
            new_id = ray.get_actor(supervisor_name("genguard"), namespace="genguard")._actor_id.hex()
        except ValueError:
            new_id = old_id
        if new_id != old_id and chaos.status()["supervisor"]["reachable"]:
            break
        time.sleep(0.3)
    assert new_id != old_id, "no router recreated the supervisor"
    st = chaos.status()
    assert st["models"]["hunyuan-video"]["breaker"]["state"] in ("open", "half_open")
