"""The HTTP ingress (deployment ``router``): FastAPI via ``serve.ingress``.

Validates requests (422 naming the field and the rule), picks the workflow
and its chain, and hands the request to the image or video engine, which
calls the model deployments. Response bodies are raw PNG / MP4 bytes; every
response carries ``X-Request-Id``; errors are JSON (see API.md).
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from resilience import RetryBudget, RetryBudgetPolicy
from serve_app.config import (
    MODEL_OUTPUT,
    PIPELINE_CLASSES,
    AppConfig,
    load_app_config,
)
from serve_app.deployment_manager import HealthMonitor
from serve_app.engines.base import EngineError, PreparedRequest
from serve_app.engines.image import ImageEngine
from serve_app.engines.video import VideoEngine
from serve_app.faults import FaultSpec, FaultStore
from serve_app.optimizer import Optimizer
from serve_app.schemas import EditRequest, GenerationRequest, ImageRequest, VideoRequest
from serve_app.supervisor_link import SupervisorLink
from serve_app.validation import Violation, check_params, decode_image

log = logging.getLogger("genguard.router")


class _BodyLimit:
    """413 for bodies over the configured limit (Content-Length or streamed)."""

    # Set from config by the Router's constructor (one router per process);
    # the middleware itself is installed at import time, before the app starts.
    limit = 32 * 1024 * 1024

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, send)
            return
        # Buffer the body (at most `limit` bytes), so a chunked upload over the
        # limit is a 413 too, before the app parses anything.
        chunks: list[bytes] = []
        seen = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            seen += len(body)
            if seen > self.limit:
                await self._reject(scope, send)
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        resp = _error_response(
            413,
            "payload_too_large",
            f"request body exceeds the limit of {self.limit} bytes",
            _request_id_of(scope),
        )
        await resp(scope, _null_receive, send)


async def _null_receive() -> Message:
    return {"type": "http.disconnect"}


def _request_id_of(scope: Scope) -> str:
    """The request id: Serve's (it honours an incoming X-Request-Id and echoes
    it on the response), else the client's header, else a new uuid."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        ctx = serve.context._get_serve_request_context()
        rid = getattr(ctx, "request_id", "") or ""
        if not rid:
            given = dict(scope.get("headers") or []).get(b"x-request-id")
            rid = given.decode("latin-1")[:128] if given else uuid.uuid4().hex
        state["request_id"] = rid
    return str(rid)


def _error_response(
    status: int,
    kind: str,
    message: str,
    request_id: str,
    attempts: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {
        "error": {"kind": kind, "message": message},
        "request_id": request_id,
        "attempts": attempts or [],
    }
    # X-Request-Id itself is added to every response by Serve's proxy.
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_response(violations: list[Violation], request_id: str) -> JSONResponse:
    return JSONResponse(
        {"detail": [v.as_detail() for v in violations]},
        status_code=422,
    )


def _decode_b64(data: str) -> bytes:
    if data.startswith("data:"):
        _, _, data = data.partition(",")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image must be base64: {exc}") from exc


SWAGGER_DIR = None
try:  # served from the package so /docs works on a closed network
    import swagger_ui_bundle

    SWAGGER_DIR = Path(swagger_ui_bundle.swagger_ui_path)
except ImportError:  # pragma: no cover - it is a declared dependency
    pass

app = FastAPI(
    title="genguard",
    version="0.1.0",
    description="Resilient image and video diffusion serving on Ray Serve.",
    docs_url=None,
    redoc_url=None,
)
if SWAGGER_DIR is not None:
    app.mount("/static/swagger", StaticFiles(directory=str(SWAGGER_DIR)), name="swagger")


@app.middleware("http")
async def _request_id_mw(request: Request, call_next: Any) -> Response:
    _request_id_of(request.scope)  # Serve's proxy echoes it as X-Request-Id
    response: Response = await call_next(request)
    return response


app.add_middleware(_BodyLimit)


async def _json_or_none(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


# NOTE: serve.ingress serializes the Router class by value; every module-level
# name its methods use must be defined above the class.


@app.exception_handler(Exception)
async def _on_unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error (a bug): %s", exc)
    return _error_response(500, "internal", f"internal error: {type(exc).__name__}", _request_id_of(request.scope))


@app.exception_handler(RequestValidationError)
async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    detail = []
    for err in exc.errors():
        item = {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        if item["type"] == "missing":
            item["msg"] = f"{item['loc'][-1]} is required" if item["loc"] else "field required"
        elif item["type"] == "extra_forbidden":
            item["msg"] = f"unknown field {item['loc'][-1]!r}"
        elif str(item["msg"]).startswith("Input should be") and item["loc"]:
            # Name the field in pydantic's generic wording.
            field = ".".join(str(p) for p in item["loc"][1:]) or str(item["loc"][-1])
            item["msg"] = f"{field} should be" + str(item["msg"])[len("Input should be"):]
        detail.append(item)
    _request_id_of(request.scope)
    return JSONResponse({"detail": detail}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(exc.status_code, "http_error")
    return _error_response(
        exc.status_code, kind, str(exc.detail), _request_id_of(request.scope), headers=getattr(exc, "headers", None)
    )


@app.get("/docs", include_in_schema=False)
async def _docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="genguard API",
        swagger_js_url="/static/swagger/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger/swagger-ui.css",
        swagger_favicon_url="/static/swagger/favicon-32x32.png",
    )



@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=5)
@serve.ingress(app)
class Router:
    """Ingress: validation, workflow selection, engines, health and catalog."""

    def __init__(self, config: dict[str, Any], models: dict[str, Any]):
        self.cfg: AppConfig = load_app_config(config)
        self.handles = models
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # not inside Serve (direct construction in tests)
            app_name = "genguard"
        self.app_name = app_name
        self.link = SupervisorLink(self.cfg, app_name)
        # Own serve.status() polling only while the supervisor's view is stale.
        self.health = HealthMonitor(
            app_name,
            list(self.cfg.models),
            self.cfg.resilience.supervisor.health_poll_s,
            should_poll=lambda: not self.link.fresh(),
        )
        self.budget = RetryBudget(RetryBudgetPolicy.from_mapping(self.cfg.resilience.retry_budget))
        self.optimizer = Optimizer(self.cfg)
        common = (self.cfg, self.handles, self.link, self.is_up, self.budget, self.optimizer)
        self.image_engine = ImageEngine(*common)
        self.video_engine = VideoEngine(*common)
        self.started_at = time.time()
        self.admin_token = os.environ.get("GENGUARD_ADMIN_TOKEN") or None
        self.faults = FaultStore(app_name)
        self._first_view = asyncio.Lock()
        _BodyLimit.limit = self.cfg.max_body_bytes

    def is_up(self, key: str) -> bool:
        health = self.link.health()
        if health is not None:
            self.health.update_from(health)
        return self.health.is_up(key)

    async def _ensure_started(self) -> None:
        self.link.start()
        self.health.start()
        if self.link.snapshot is None and self.health.last_poll is None:
            async with self._first_view:
                if self.link.snapshot is None and self.health.last_poll is None:
                    await self._first_view_now()

    async def _first_view_now(self) -> None:
        # A fresh router has no view yet: get one before routing, so it
        # never mistakes "not yet known" for "down".
        try:
            await self.link.refresh_once()
        except Exception as exc:  # supervisor unreachable: read Serve directly
            self.link.last_error = f"first snapshot failed: {type(exc).__name__}: {exc}"[:300]
            try:
                await self.health.poll_once()
            except Exception as exc2:  # reported in /v1/status
                self.health.last_error = str(exc2)

    # -- generation ------------------------------------------------------
    @app.post(
        "/v1/images",
        responses={200: {"content": {"image/png": {}}, "description": "PNG bytes"}},
        response_class=Response,
    )
    async def images(self, body: ImageRequest, request: Request) -> Response:
        return await self._generate("text-to-image", body, request)

    @app.post(
        "/v1/images/edits",
        responses={200: {"content": {"image/png": {}}, "description": "PNG bytes"}},
        response_class=Response,
    )
    async def edits(self, body: EditRequest, request: Request) -> Response:
        return await self._generate("image-edit", body, request)

    @app.post(
        "/v1/videos",
        responses={200: {"content": {"video/mp4": {}}, "description": "MP4 bytes"}},
        response_class=Response,
    )
    async def videos(self, body: VideoRequest, request: Request) -> Response:
        if body.trajectories is not None and not body.trajectories:
            return _validation_response(
                [Violation(("body", "trajectories"),
                           "trajectories must hold at least one track (leave the field out for image-to-video)",
                           "value_error.trajectory")],
                _request_id_of(request.scope),
            )
        if body.trajectories and body.image is None:
            return _validation_response(
                [Violation(("body", "image"), "image is required when trajectories are given", "missing")],
                _request_id_of(request.scope),
            )
        if body.trajectories:
            wf = "trajectory-to-video"
        elif body.image is not None:
            wf = "image-to-video"
        else:
            wf = "text-to-video"
        return await self._generate(wf, body, request)

    async def _generate(self, workflow: str, body: GenerationRequest, request: Request) -> Response:
        await self._ensure_started()
        rid = _request_id_of(request.scope)
        prepared = await self._prepare(workflow, body, rid)
        if isinstance(prepared, JSONResponse):
            return prepared
        engine = self.video_engine if MODEL_OUTPUT[prepared.chain[0].model] == "video" else self.image_engine
        try:
            result = await engine.run(prepared)
        except EngineError as exc:
            if exc.status == 422 and exc.detail:
                return JSONResponse({"detail": exc.detail}, status_code=422)
            headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s else None
            return _error_response(exc.status, exc.kind, str(exc), rid, exc.attempts, headers)
        headers = {
            "X-Model": result.model,
            "X-Attempts": str(result.attempts),
            "X-Fallback-Depth": str(result.fallback_depth),
            "X-Degradation-Level": str(result.degradation_level),
            "X-Seed": str(prepared.payload["seed"]),
        }
        if result.adjustments:
            headers["X-Adjustments"] = json.dumps(result.adjustments, separators=(",", ":"))
        if result.dropped_inputs:
            headers["X-Dropped-Inputs"] = ",".join(result.dropped_inputs)
        return Response(content=result.data, media_type=result.media_type, headers=headers)

    async def _prepare(self, workflow: str, body: GenerationRequest, rid: str) -> PreparedRequest | JSONResponse:
        """Resolve the chain and the parameters of the first step, and check
        them against that step's constraints."""
        cfg = self.cfg
        if workflow not in cfg.workflows:
            return _error_response(404, "workflow_unavailable", f"workflow {workflow} is not configured here", rid)
        chain = list(cfg.workflows[workflow].chain)
        if body.model is not None:
            able = [s.model for s in chain]
            if body.model not in cfg.models or body.model not in able:
                return _validation_response(
                    [
                        Violation(
                            ("body", "model"),
                            f"model {body.model!r} cannot serve {workflow}; use one of: {', '.join(able)}",
                            "value_error.model",
                        )
                    ],
                    rid,
                )
            idx = able.index(body.model)
            chain = [chain[idx]] + [s for i, s in enumerate(chain) if i != idx]
        if body.fallback == "strict" and chain[0].drops:
            keep = [s.model for s in chain if not s.drops]
            return _validation_response(
                [Violation(("body", "model"),
                           f"{chain[0].model} would drop {', '.join(chain[0].drops)} for {workflow}, which "
                           f"fallback=strict refuses; use one of: {', '.join(keep)}", "value_error.model")],
                rid,
            )
        if body.fallback == "strict":
            # Strict: a pinned model alone; otherwise the chain without substitutes.
            chain = [chain[0]] if body.model is not None else [chain[0]] + [s for s in chain[1:] if not s.drops]
        first = chain[0].model
        mcfg = cfg.models[first]
        d = mcfg.defaults
        video = MODEL_OUTPUT[first] == "video"
        payload: dict[str, Any] = {
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "width": body.width if body.width is not None else d.width,
            "height": body.height if body.height is not None else d.height,
            "num_inference_steps": (
                body.num_inference_steps if body.num_inference_steps is not None else d.num_inference_steps
            ),
            "guidance_scale": body.guidance_scale if body.guidance_scale is not None else d.guidance_scale,
            "seed": body.seed if body.seed is not None else secrets.randbelow(2**32),
        }
        violations: list[Violation] = []
        if video:
            nf = getattr(body, "num_frames", None)
            payload["num_frames"] = nf if nf is not None else (d.num_frames or 9)
            fps = getattr(body, "fps", None)
            payload["fps"] = fps if fps is not None else d.fps
            tracks = getattr(body, "trajectories", None)
            payload["trajectories"] = tracks or None
        image_b64 = getattr(body, "image", None)
        if image_b64 is not None:
            try:
                raw = _decode_b64(image_b64)
                c = mcfg.constraints
                # Decoding is CPU work: off the event loop.
                await asyncio.to_thread(
                    decode_image, raw, max_pixels=c.max_image_pixels, max_aspect=c.max_image_aspect
                )
                payload["image"] = raw
            except ValueError as exc:
                violations.append(Violation(("body", "image"), str(exc), "value_error.image"))
        violations += check_params(payload, mcfg.constraints, video=video)
        if body.deadline_s is not None and body.deadline_s > cfg.deadline.max_s:
            violations.append(
                Violation(
                    ("body", "deadline_s"),
                    f"deadline_s must be at most {cfg.deadline.max_s:g}",
                    "value_error.range",
                )
            )
        if violations:
            return _validation_response(violations, rid)
        deadline_s = body.deadline_s if body.deadline_s is not None else cfg.deadline.default_s
        return PreparedRequest(
            request_id=rid,
            workflow=workflow,
            chain=chain,
            payload=payload,
            deadline_at=time.monotonic() + deadline_s,
            fallback=body.fallback,
            degradation=body.degradation,
        )

    # -- health and catalog ------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        await self._ensure_started()
        return {"ok": True}

    def _workflow_health(self) -> dict[str, Any]:
        out = {}
        for wf, w in self.cfg.workflows.items():
            healthy = [m for m in w.models if self.is_up(m)]
            out[wf] = {"servable": bool(healthy), "healthy": healthy}
        return out

    @app.get("/readyz")
    async def readyz(self) -> JSONResponse:
        await self._ensure_started()
        if self.link.health() is None and self.health.last_poll is None:
            try:
                await self.health.poll_once()
            except Exception as exc:  # reported below; readiness stays false
                self.health.last_error = str(exc)
        workflows = self._workflow_health()
        settled = self.health.all_settled()
        ready = settled and all(w["servable"] for w in workflows.values())
        body = {
            "ready": ready,
            "settled": settled,
            "workflows": workflows,
            "models": {k: m.health for k, m in self.health.models.items()},
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        cfg = self.cfg
        models = {}
        for key, m in cfg.models.items():
            c = m.constraints
            models[key] = {
                "pipeline": PIPELINE_CLASSES[key],
                "source": m.source,
                "output": MODEL_OUTPUT[key],
                "workflows": cfg.workflows_of(key),
                "constraints": {
                    "multiple_of": c.multiple_of,
                    "min_side_px": c.min_side_px,
                    "max_side_px": c.max_side_px,
                    "max_steps": c.max_steps,
                    "max_pixel_frames": c.max_pixel_frames,
                    "max_prompt_chars": c.max_prompt_chars,
                    "min_steps": c.min_steps,
                    "max_guidance_scale": c.max_guidance_scale,
                    "max_image_pixels": c.max_image_pixels,
                    "frames": c.frames.model_dump() if c.frames else None,
                    **({"max_tracks": c.max_tracks, "max_track_points": c.max_track_points}
                       if key == "wan-ati" else {}),
                },
                "defaults": m.defaults.model_dump(),
            }
        return {
            "object": "list",
            "data": [{"id": k, "object": "model", "owned_by": "genguard"} for k in cfg.models],
            "models": models,
            "workflows": {
                wf: {
                    "chain": w.models,
                    "substitutes": {s.model: list(s.drops) for s in w.chain if s.drops},
                }
                for wf, w in cfg.workflows.items()
            },
        }

    @app.get("/v1/status")
    async def status(self) -> dict[str, Any]:
        await self._ensure_started()
        snap = self.link.snapshot or {}
        breakers = snap.get("breakers") or {}
        local = self.link.local.status()
        models = {}
        for k, m in self.health.models.items():
            self.is_up(k)
            if self.link.fresh() and k in breakers:
                b = breakers[k]
                breaker = {"state": self.link.state(k).value, "since": b.get("since")}
            else:
                breaker = {"state": self.link.state(k).value, "since": local.get(k, {}).get("since")}
            models[k] = {
                "health": m.health,
                "breaker": breaker,
                "replicas": {"running": m.running, "healthy": m.healthy},
                "last_error": (m.message or None) if m.health != "healthy" else None,
            }
        incidents = snap.get("incidents") or {"open": [], "recent": []}
        return {
            "degradation": self.link.degradation(),
            "supervisor": self.link.status(),
            "router": {
                "retry_budget": self.budget.stats(),
                "flat_outputs": self.image_engine.flat_outputs + self.video_engine.flat_outputs,
                "breakers_from": "supervisor" if self.link.fresh() else "local",
            },
            "models": models,
            "incidents": incidents,
        }

    @app.get("/v1/errors/report")
    async def errors_report(self, request: Request) -> JSONResponse:
        await self._ensure_started()
        try:
            actor = await self.link.actor()
            report = await asyncio.wait_for(actor.errors_report.remote(), timeout=10)
        except Exception as exc:  # the supervisor owns analytics
            return _error_response(
                503, "supervisor_unavailable", f"error analytics unavailable: {exc}", _request_id_of(request.scope),
                headers={"Retry-After": "5"},
            )
        return JSONResponse(report)

    # -- admin (GENGUARD_ADMIN_TOKEN; fault routes also need the config flag) ----
    def _admin(self, request: Request, faults: bool = False) -> JSONResponse | None:
        rid = _request_id_of(request.scope)
        if not self.admin_token or (faults and not self.cfg.fault_injection.enabled):
            return _error_response(404, "not_found", "Not Found", rid)
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return _error_response(401, "unauthorized", "missing or wrong bearer token", rid,
                                   headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _admin_call(self, method: str, *args: Any) -> Any:
        actor = await self.link.actor()
        self.link.calls["admin"] += 1
        result = await asyncio.wait_for(getattr(actor, method).remote(*args), timeout=10)
        if isinstance(result, dict) and "breakers" in result:
            self.link.apply(result)
        return result

    @app.post("/admin/faults", status_code=201)
    async def add_fault(self, request: Request) -> JSONResponse:
        denied = self._admin(request, faults=True)
        if denied:
            return denied
        try:
            spec = FaultSpec.model_validate(await _json_or_none(request))
        except ValidationError as exc:
            errors = exc.errors()
            return JSONResponse(
                {"detail": [{"loc": ["body", *e.get("loc", [])], "msg": e.get("msg"), "type": e.get("type")}
                            for e in errors]},
                status_code=422,
            )
        if spec.model not in self.cfg.models:
            return _validation_response(
                [Violation(("body", "model"), f"unknown model {spec.model!r}; known: {', '.join(self.cfg.models)}",
                           "value_error.model")],
                _request_id_of(request.scope),
            )
        fault = await asyncio.to_thread(self.faults.add, spec)
        return JSONResponse(fault, status_code=201)

    @app.get("/admin/faults")
    async def list_faults(self, request: Request) -> JSONResponse:
        denied = self._admin(request, faults=True)
        if denied:
            return denied
        return JSONResponse(await asyncio.to_thread(self.faults.read))

    @app.delete("/admin/faults")
    async def clear_faults(self, request: Request) -> JSONResponse:
        denied = self._admin(request, faults=True)
        if denied:
            return denied
        return JSONResponse({"cleared": await asyncio.to_thread(self.faults.clear)})

    @app.put("/admin/degradation")
    async def set_degradation(self, request: Request) -> JSONResponse:
        denied = self._admin(request)
        if denied:
            return denied
        try:
            body = await request.json()
            level = body["level"]
        except (ValueError, KeyError, TypeError):
            level = None
            body = None
        if body is None or not (level == "auto" or (isinstance(level, int) and not isinstance(level, bool))):
            return _validation_response(
                [Violation(("body", "level"), 'level must be an integer or "auto"', "value_error.level")],
                _request_id_of(request.scope),
            )
        if level != "auto" and not 0 <= level <= self.optimizer.max_level:
            return _validation_response(
                [Violation(("body", "level"), f"level must be between 0 and {self.optimizer.max_level} or \"auto\"",
                           "value_error.level")],
                _request_id_of(request.scope),
            )
        result = await self._admin_call("set_degradation", None if level == "auto" else level)
        await self._refresh_now()
        return JSONResponse(result)

    @app.post("/admin/breakers/{model}/reset")
    async def reset_breaker(self, model: str, request: Request) -> JSONResponse:
        denied = self._admin(request)
        if denied:
            return denied
        if model not in self.cfg.models:
            return _error_response(404, "not_found", f"unknown model {model!r}", _request_id_of(request.scope))
        self.link.local.reset(model)
        snap = await self._admin_call("reset_breaker", model)
        return JSONResponse({"model": model, "breaker": (snap.get("breakers") or {}).get(model)})

    @app.post("/admin/reset")
    async def reset_all(self, request: Request) -> JSONResponse:
        """Close every breaker, clear analytics, level auto (tests, demos)."""
        denied = self._admin(request)
        if denied:
            return denied
        for k in self.cfg.models:
            self.link.local.reset(k)
        self.budget = RetryBudget(RetryBudgetPolicy.from_mapping(self.cfg.resilience.retry_budget))
        for engine in (self.image_engine, self.video_engine):
            engine.executor.budget = self.budget
        await self._admin_call("reset_all")
        return JSONResponse({"reset": True, "version": self.link.version})

    async def _refresh_now(self) -> None:
        actor = await self.link.actor()
        self.link.apply(await asyncio.wait_for(actor.snapshot.remote(-1, 0.0), timeout=10))
