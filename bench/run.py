"""Benchmarks (`make bench`): per-model latency at the tiny default size, and
the chaos run (primary text-to-image replica killed under 100 sequential
requests). Results go to bench/results/*.json. Numbers are ratios and counts
from one run; this machine is shared and noisy, so no test asserts a time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TOKEN = "bench-token"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(config: str) -> tuple[subprocess.Popen[bytes], str, float]:
    doc = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    port = _port()
    doc["http_options"]["port"] = port
    path = RESULTS / f".{config}-bench.yaml"
    path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, GENGUARD_ADMIN_TOKEN=TOKEN, RAY_USAGE_STATS_ENABLED="0")
    log = open(RESULTS / f".{config}-bench.log", "wb")  # noqa: SIM115
    t0 = time.monotonic()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("serve")), "run", str(path)], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - t0 < 600:
        try:
            if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                return proc, url, time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"serve run exited {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit("not ready in 600 s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def ray_rss_mib() -> float:
    """Resident memory of every Ray process on this machine (the whole app:
    GCS, raylet, controller, proxy, router, supervisor, model replicas)."""
    out = subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout
    kb = 0
    for line in out.splitlines():
        rss, _, args = line.strip().partition(" ")
        if "ray" in args and rss.isdigit():
            kb += int(rss)
    return kb / 1024


def latency(url: str) -> dict[str, object]:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 50, 50)).save(buf, format="PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    cases = {
        "qwen-image": ("/v1/images", {"model": "qwen-image"}),
        "newbie-image": ("/v1/images", {"model": "newbie-image"}),
        "qwen-image-edit": ("/v1/images/edits", {"image": img}),
        "hunyuan-video": ("/v1/videos", {"model": "hunyuan-video"}),
        "wan-t2v": ("/v1/videos", {"model": "wan-t2v"}),
        "wan-i2v": ("/v1/videos", {"image": img, "model": "wan-i2v"}),
        "wan-ati": ("/v1/videos", {"image": img, "trajectories": [[[0.2, 0.5], [0.8, 0.5]]]}),
    }
    out: dict[str, object] = {}
    for model, (path, extra) in cases.items():
        times = []
        for i in range(6):
            t0 = time.monotonic()
            r = httpx.post(url + path, json={"prompt": "a red fox", "seed": i, **extra}, timeout=120)
            times.append(time.monotonic() - t0)
            assert r.status_code == 200 and r.headers["x-model"] == model, (model, r.status_code, r.text[:200])
        out[model] = {"median_s": round(statistics.median(times[1:]), 3), "first_s": round(times[0], 3)}
    return out


def steady_load(url: str, n: int = 200, concurrency: int = 4) -> dict[str, object]:
    """Supervisor calls per request under a steady load with the config's
    default report and refresh intervals (no faults)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        body = {"prompt": "a red fox", "seed": i, "model": "qwen-image" if i % 2 else "hunyuan-video"}
        path = "/v1/images" if i % 2 else "/v1/videos"
        return httpx.post(url + path, json=body, timeout=120).status_code

    s0 = httpx.get(url + "/v1/status", timeout=10).json()["supervisor"]
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, range(n)))
    took = time.monotonic() - t0
    s1 = httpx.get(url + "/v1/status", timeout=10).json()["supervisor"]
    calls = sum(s1["calls"].values()) - sum(s0["calls"].values())
    reqs = s1["requests"] - s0["requests"]
    return {"requests": reqs, "ok": codes.count(200), "seconds": round(took, 1),
            "rps": round(n / took, 1), "supervisor_calls": calls,
            "calls_per_request": round(calls / max(1, reqs), 3)}


def chaos_kill(url: str, n: int = 100) -> dict[str, object]:
    import ray

    ray.init(address="auto", namespace="genguard-bench", log_to_driver=False)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    codes: dict[str, int] = {}
    served: dict[str, int] = {}
    t_kill = t_open = t_recover = None
    kill_at = 20
    for i in range(n):
        if i == kill_at:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::genguard#qwen-image#")]
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=False)
            t_kill = time.monotonic()
        r = httpx.post(url + "/v1/images", json={"prompt": "a red fox", "seed": i}, timeout=120)
        codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
        if r.status_code == 200:
            served[r.headers["x-model"]] = served.get(r.headers["x-model"], 0) + 1
        if t_kill is not None:
            st = httpx.get(url + "/v1/status", timeout=10).json()["models"]["qwen-image"]
            if t_open is None and st["breaker"]["state"] != "closed":
                t_open = time.monotonic()
            if t_recover is None and st["health"] == "healthy" and r.headers.get("x-model") == "qwen-image" \
                    and i > kill_at:
                t_recover = time.monotonic()
    del auth
    ray.shutdown()
    return {
        "requests": n,
        "status_codes": codes,
        "served_by": served,
        "kill_to_breaker_open_s": None if t_open is None or t_kill is None else round(t_open - t_kill, 2),
        "kill_to_primary_serving_again_s": None if t_recover is None or t_kill is None
        else round(t_recover - t_kill, 2),
    }


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    proc, url, ready_s = start("chaos")
    try:
        idle = ray_rss_mib()
        result = {"ready_s": round(ready_s, 1), "latency": latency(url)}
        result["memory_mib"] = {"idle_after_ready": round(idle), "after_latency_run": round(ray_rss_mib())}
        result["steady_load"] = steady_load(url)
        result["chaos_kill_primary_text_to_image"] = chaos_kill(url)
        status = httpx.get(url + "/v1/status", timeout=10).json()
        result["supervisor"] = status["supervisor"]
        report = httpx.get(url + "/v1/errors/report", timeout=10).json()
        result["recovery_rate"] = report["recovery_rate"]
        result["mttr_s"] = report["mttr_s"]
    finally:
        stop(proc)
    path = RESULTS / "bench.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
