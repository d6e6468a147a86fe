"""End to end: `serve run configs/local.yaml` as a subprocess, real HTTP.

The config is the shipped one with only the HTTP port changed (so a running
`make serve` on :8000 does not collide with the suite).
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import imageio.v3 as iio
import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, load_serve_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

IMAGE_MODELS = ["qwen-image", "newbie-image"]
VIDEO_MODELS = ["hunyuan-video", "wan-t2v"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def png_b64(w: int = 64, h: int = 64, color: tuple[int, int, int] = (200, 40, 40)) -> str:
    img = Image.new("RGB", (w, h), color)
    for x in range(w // 2):
        img.putpixel((x, x % h), (10, 200, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def decode_mp4(data: bytes) -> np.ndarray:
    return iio.imread(data, extension=".mp4", plugin="FFMPEG")


@pytest.fixture(scope="module")
def server(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`serve run` on the local config (port changed), stopped after the module."""
    doc = load_serve_config("local")
    port = _free_port()
    doc["http_options"]["port"] = port
    cfg_path = tmp_path_factory.mktemp("e2e") / "local.yaml"
    cfg_path.write_text(yaml.safe_dump(doc))
    env = dict(os.environ, GENGUARD_MODELS_ROOT=str(tiny_dir), RAY_USAGE_STATS_ENABLED="0")
    log_path = cfg_path.with_suffix(".log")
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    serve_bin = Path(sys.executable).with_name("serve")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [str(serve_bin), "run", str(cfg_path)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"serve run exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                r = httpx.get(url + "/readyz", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"not ready in time:\n{log_path.read_text()[-4000:]}")
        print(f"\n[e2e] serve run -> ready in {time.monotonic() - t0:.1f}s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()


def post(url: str, path: str, body: dict | bytes, timeout: float = 120) -> httpx.Response:
    if isinstance(body, bytes):  # raw JSON, e.g. escapes httpx's encoder refuses
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=timeout)
    return httpx.post(url + path, json=body, timeout=timeout)


def test_readyz_lists_every_workflow_servable(server: str) -> None:
    """/readyz is 200 and every workflow has healthy models."""
    r = httpx.get(server + "/readyz")
    body = r.json()
    assert r.status_code == 200 and body["ready"] is True
    assert set(body["workflows"]) == {
        "text-to-image", "image-edit", "text-to-video", "image-to-video", "trajectory-to-video"
    }
    assert all(w["servable"] for w in body["workflows"].values())


def test_healthz_and_models_catalog(server: str) -> None:
    """/healthz answers; /v1/models lists all seven models OpenAI-style and with constraints."""
    assert httpx.get(server + "/healthz").status_code == 200
    doc = httpx.get(server + "/v1/models").json()
    ids = {m["id"] for m in doc["data"]}
    assert ids == {"hunyuan-video", "wan-t2v", "wan-i2v", "wan-ati", "newbie-image", "qwen-image", "qwen-image-edit"}
    assert doc["models"]["qwen-image"]["pipeline"] == "QwenImagePipeline"
    assert doc["models"]["wan-t2v"]["constraints"]["frames"]["form"] == "4k+1"
    assert doc["workflows"]["text-to-image"]["chain"] == ["qwen-image", "newbie-image"]


def test_docs_work_offline(server: str) -> None:
    """/docs references only local Swagger assets, and they are served."""
    html = httpx.get(server + "/docs").text
    assert "cdn.jsdelivr" not in html and "/static/swagger/swagger-ui-bundle.js" in html
    js = httpx.get(server + "/static/swagger/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    assert httpx.get(server + "/openapi.json").json()["paths"]["/v1/videos"]


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_text_to_image_each_model(server: str, model: str) -> None:
    """Each image model returns a PNG of the requested size, deterministic per seed,
    and a different prompt changes its output."""
    body = {"prompt": "a red fox in the snow", "width": 48, "height": 80, "seed": 7, "model": model}
    r1 = post(server, "/v1/images", body)
    assert r1.status_code == 200, r1.text
    assert r1.headers["content-type"] == "image/png"
    assert r1.headers["x-model"] == model and r1.headers["x-seed"] == "7"
    assert r1.headers["x-request-id"]
    assert decode_png(r1.content).size == (48, 80)
    r2 = post(server, "/v1/images", body)
    assert r2.content == r1.content
    r3 = post(server, "/v1/images", {**body, "prompt": "a blue whale at night"})
    assert r3.status_code == 200 and r3.content != r1.content


def test_image_edit(server: str) -> None:
    """qwen-image-edit returns a PNG of the requested size; prompt and seed behave."""
    body = {"prompt": "make it blue", "image": png_b64(), "width": 64, "height": 64, "seed": 3}
    r1 = post(server, "/v1/images/edits", body, timeout=300)
    assert r1.status_code == 200, r1.text
    assert r1.headers["x-model"] == "qwen-image-edit"
    assert decode_png(r1.content).size == (64, 64)
    assert post(server, "/v1/images/edits", body, timeout=300).content == r1.content
    r3 = post(server, "/v1/images/edits", {**body, "prompt": "turn the fox into a cat"}, timeout=300)
    assert r3.content != r1.content


@pytest.mark.parametrize("model", VIDEO_MODELS)
def test_text_to_video_each_model(server: str, model: str) -> None:
    """Each text-to-video model returns an MP4 with the requested frames and size."""
    body = {"prompt": "a red fox running", "width": 64, "height": 48, "num_frames": 13, "seed": 11, "model": model}
    r1 = post(server, "/v1/videos", body)
    assert r1.status_code == 200, r1.text
    assert r1.headers["content-type"] == "video/mp4" and r1.headers["x-model"] == model
    frames = decode_mp4(r1.content)
    assert frames.shape == (13, 48, 64, 3)
    assert post(server, "/v1/videos", body).content == r1.content
    assert post(server, "/v1/videos", {**body, "prompt": "waves on a beach"}).content != r1.content


@pytest.mark.parametrize("model", ["wan-i2v", "wan-ati"])
def test_image_to_video(server: str, model: str) -> None:
    """Image-to-video (wan-i2v, and wan-ati with no tracks) returns the requested MP4."""
    body = {"prompt": "the fox turns its head", "image": png_b64(), "num_frames": 9, "seed": 5, "model": model}
    r1 = post(server, "/v1/videos", body)
    assert r1.status_code == 200, r1.text
    assert r1.headers["x-model"] == model
    assert decode_mp4(r1.content).shape == (9, 64, 64, 3)
    assert post(server, "/v1/videos", body).content == r1.content
    assert post(server, "/v1/videos", {**body, "prompt": "a storm rolls in"}).content != r1.content


def test_trajectory_video(server: str) -> None:
    """image + trajectories runs wan-ati; a different track changes the video."""
    body = {
        "prompt": "the ball rolls right",
        "image": png_b64(),
        "num_frames": 9,
        "seed": 5,
        "trajectories": [[[0.2, 0.5], [0.8, 0.5]]],
    }
    r1 = post(server, "/v1/videos", body)
    assert r1.status_code == 200, r1.text
    assert r1.headers["x-model"] == "wan-ati"
    assert decode_mp4(r1.content).shape == (9, 64, 64, 3)
    assert post(server, "/v1/videos", body).content == r1.content
    r3 = post(server, "/v1/videos", {**body, "trajectories": [[[0.8, 0.2], [0.2, 0.9]]]})
    assert r3.status_code == 200 and r3.content != r1.content


def test_seed_is_drawn_and_echoed(server: str) -> None:
    """Without a seed, one is drawn and reported; replaying it reproduces the bytes."""
    r1 = post(server, "/v1/images", {"prompt": "a lighthouse"})
    seed = int(r1.headers["x-seed"])
    r2 = post(server, "/v1/images", {"prompt": "a lighthouse", "seed": seed})
    assert r2.content == r1.content


@pytest.mark.parametrize(
    "path,body,loc,fragment",
    [
        ("/v1/images", {"prompt": "x", "height": 65}, ["body", "height"], "multiple of 16: 64 or 80"),
        ("/v1/images", {"prompt": "x", "num_inference_steps": 0}, ["body", "num_inference_steps"], "between 2 and 50"),
        ("/v1/images", {"prompt": "x", "num_inference_steps": -2}, ["body", "num_inference_steps"], "between 2 and 50"),
        ("/v1/images", {"prompt": "x", "num_inference_steps": 1}, ["body", "num_inference_steps"], "between 2 and 50"),
        ("/v1/images", {"prompt": "x", "guidance_scale": 1e39}, ["body", "guidance_scale"], "between 0 and 50"),
        ("/v1/images", b'{"prompt": "\\ud800 cat"}', ["body", "prompt"], "lone surrogate"),
        ("/v1/images/edits", {"prompt": "x", "image": png_b64(4000, 1)}, ["body", "image"], "aspect ratio"),
        ("/v1/images/edits", {"prompt": "x", "image": png_b64(), "model": "qwen-image", "fallback": "strict"},
         ["body", "model"], "would drop image"),
        ("/v1/images", {"prompt": "x", "num_inference_steps": "ten"}, ["body", "num_inference_steps"], "integer"),
        ("/v1/images", {"width": 64}, ["body", "prompt"], "prompt is required"),
        ("/v1/images", {"prompt": "x", "model": "dall-e"}, ["body", "model"], "cannot serve text-to-image"),
        ("/v1/images", {"prompt": "x", "model": "wan-t2v"}, ["body", "model"], "qwen-image, newbie-image"),
        ("/v1/images", {"prompt": "x", "stepz": 3}, ["body", "stepz"], "unknown field"),
        ("/v1/videos", {"prompt": "x", "num_frames": 8}, ["body", "num_frames"], "4k+1 (1, 5, 9, 13, ...): 5 or 9"),
        ("/v1/videos", {"prompt": "x", "image": "!!notbase64"}, ["body", "image"], "base64"),
        ("/v1/videos", {"prompt": "x", "image": base64.b64encode(b"garbage").decode()}, ["body", "image"], "could not be decoded"),
        ("/v1/videos", {"prompt": "x", "trajectories": [[[0.1, 0.1]]]}, ["body", "image"], "required when trajectories"),
        ("/v1/images/edits", {"prompt": "x"}, ["body", "image"], "image is required"),
        ("/v1/videos", {"prompt": "x", "image": png_b64(), "trajectories": []}, ["body", "trajectories"], "at least one track"),
        ("/v1/images", {"prompt": "x", "seed": -1}, ["body", "seed"], "seed should be greater than or equal to 0"),
        ("/v1/images", {"prompt": "x", "fallback": "maybe"}, ["body", "fallback"], "fallback should be 'allow' or 'strict'"),
        ("/v1/images", {"prompt": "x", "deadline_s": 10_000}, ["body", "deadline_s"], "at most 300"),
    ],
)
def test_invalid_requests_are_422_naming_field(server: str, path: str, body: dict, loc: list, fragment: str) -> None:
    """A bad request is a 422 whose detail names the field and the rule."""
    r = post(server, path, body)
    assert r.status_code == 422, r.text
    assert r.headers["x-request-id"]
    detail = r.json()["detail"]
    assert any(d["loc"] == loc and fragment in d["msg"] for d in detail), detail


def test_trajectory_out_of_range_is_422(server: str) -> None:
    """A trajectory point outside 0..1 is a 422 at its location."""
    body = {"prompt": "x", "image": png_b64(), "trajectories": [[[0.1, 0.1], [1.5, 0.2]]]}
    r = post(server, "/v1/videos", body)
    assert r.status_code == 422
    assert any(d["loc"][:2] == ["body", "trajectories"] for d in r.json()["detail"])


def test_unknown_route_is_json_404(server: str) -> None:
    """Unknown routes answer JSON in the error shape, with a request id."""
    r = httpx.get(server + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_request_id_is_echoed(server: str) -> None:
    """A client-supplied X-Request-Id is echoed."""
    r = httpx.post(server + "/v1/images", json={"prompt": "x", "height": 3}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


def test_body_too_large_is_413(server: str) -> None:
    """A body over max_body_bytes is refused with 413 in the JSON error shape."""
    big = "A" * (17 * 1024 * 1024)
    r = httpx.post(server + "/v1/videos", json={"prompt": "x", "image": big}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["kind"] == "payload_too_large"


def test_admin_routes_absent_without_token(server: str) -> None:
    """Without GENGUARD_ADMIN_TOKEN every /admin route is 404 (JSON)."""
    for method, path in [("GET", "/admin/faults"), ("POST", "/admin/reset"), ("PUT", "/admin/degradation")]:
        r = httpx.request(method, server + path, json={"level": 1})
        assert r.status_code == 404 and r.json()["error"]["kind"] == "not_found"


def test_chunked_body_over_limit_is_413(server: str) -> None:
    """A chunked upload over max_body_bytes is a 413 too, not a parse error."""
    def chunks():
        yield b'{"prompt": "x", "image": "'
        for _ in range(17):
            yield b"A" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(server + "/v1/videos", content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["kind"] == "payload_too_large"


def test_cli_client_writes_file(server: str, tmp_path: Path) -> None:
    """The CLI writes the PNG and prints the serving model."""
    out = tmp_path / "fox.png"
    res = subprocess.run(
        [sys.executable, "-m", "serve_app.client", "image", "a red fox", "--out", str(out), "--url", server, "--seed", "1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr
    assert f"wrote {out}" in res.stdout and "x-model: qwen-image" in res.stdout
    assert decode_png(out.read_bytes()).size == (64, 64)
    bad = subprocess.run(
        [sys.executable, "-m", "serve_app.client", "image", "x", "--out", str(out), "--url", server, "--height", "3"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert bad.returncode == 1 and "422" in bad.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "serve_app.client", "edit", "x", "--image", str(tmp_path / "nope.png"),
         "--out", str(out), "--url", server],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert missing.returncode == 2 and "file not found" in missing.stderr and "Traceback" not in missing.stderr
