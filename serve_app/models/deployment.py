"""The model deployment: one Serve deployment per model key.

One class serves every family; the family-specific part (how to load the
pipeline and call it) is the runner from ``serve_app.models.runners``. The
deployment is bound once per key with ``.options(name=key)``, so the Serve
deployment name is the model key.

What the deployment owns:

* loading the pipeline with ``from_pretrained(source)`` on CUDA when present,
  CPU otherwise, in the configured dtype;
* the constraint guard (the same ``check_params`` the router uses) before the
  model runs;
* running the pipeline in a worker thread, one call at a time per pipeline
  (a diffusers pipeline keeps per-run scheduler state, so overlapping calls on
  one pipeline corrupt each other), so the replica's event loop stays free
  for health checks and other requests;
* encoding PNG/MP4 and refusing non-finite output;
* a real ``check_health``: the pipeline is loaded, the device answers, and
  this replica has not failed ``unhealthy_after_failures`` generations in a
  row (so Serve replaces a sick replica while its siblings keep serving).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from ray import serve

from serve_app.config import MODEL_OUTPUT, ModelConfig
from serve_app.faults import FaultInjector
from serve_app.media import encode_mp4, encode_png
from serve_app.params import GenerationParams
from serve_app.validation import Violation, check_params, decode_image

log = logging.getLogger("genguard.model")


class ConstraintError(ValueError):
    """The deployment-side guard refused a request (the router should have)."""

    def __init__(self, model: str, violations: list[dict[str, Any]]):
        self.model = model
        self.violations = violations
        super().__init__(f"{model}: " + "; ".join(v["msg"] for v in violations))

    def __reduce__(self) -> tuple[Any, ...]:
        return (ConstraintError, (self.model, self.violations))


class NonFiniteOutputError(RuntimeError):
    """The model produced NaN or inf values."""

    def __init__(self, model: str, detail: str):
        self.model = model
        self.detail = detail
        super().__init__(f"{model} produced non-finite output: {detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (NonFiniteOutputError, (self.model, self.detail))


class GenerationCancelled(RuntimeError):
    """Raised from the step callback when the request was cancelled."""

    def __init__(self, model: str):
        self.model = model
        super().__init__(f"{model}: generation cancelled")

    def __reduce__(self) -> tuple[Any, ...]:
        return (GenerationCancelled, (self.model,))


def pick_device(preference: str) -> str:
    import torch

    if preference == "cpu":
        return "cpu"
    if preference == "cuda" or torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class ModelServer:
    """Plain-Python core of the deployment (testable without Serve)."""

    def __init__(self, key: str, cfg: dict[str, Any], source: str,
                 faults: FaultInjector | None = None):
        from serve_app.models.runners import get_runner

        self.faults = faults
        if faults is not None:
            faults.on_init()
        self.key = key
        self.cfg = ModelConfig.model_validate(cfg)
        self.source = source
        self.video = MODEL_OUTPUT[key] == "video"
        self.device = pick_device(self.cfg.device)
        self.dtype = pick_dtype(self.cfg.dtype, self.device)
        self.runner = get_runner(key)
        t0 = time.monotonic()
        self.pipe = self.runner.load(source, self.device, self.dtype)
        self.load_s = time.monotonic() - t0
        self._lock = threading.Lock()
        self.consecutive_failures = 0
        self.calls = 0
        log.info("%s loaded from %s on %s/%s in %.2fs", key, source, self.device, self.dtype, self.load_s)

    # -- request path -------------------------------------------------------
    def to_params(self, payload: dict[str, Any]) -> GenerationParams:
        violations: list[Violation] = check_params(payload, self.cfg.constraints, video=self.video)
        image = None
        if payload.get("image") is not None:
            try:
                c = self.cfg.constraints
                image = decode_image(payload["image"], max_pixels=c.max_image_pixels, max_aspect=c.max_image_aspect)
            except ValueError as exc:
                violations.append(Violation(("body", "image"), str(exc), "value_error.image"))
        if violations:
            raise ConstraintError(self.key, [v.as_detail() for v in violations])
        return GenerationParams(
            prompt=payload["prompt"],
            negative_prompt=payload.get("negative_prompt"),
            width=payload["width"],
            height=payload["height"],
            num_inference_steps=payload["num_inference_steps"],
            guidance_scale=payload.get("guidance_scale"),
            seed=payload["seed"],
            num_frames=payload.get("num_frames") if self.video else None,
            fps=payload.get("fps"),
            image=image,
            trajectories=payload.get("trajectories") or None,
        )

    def generate_sync(self, params: GenerationParams, cancel: threading.Event) -> dict[str, Any]:
        import numpy as np
        import torch

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if cancel.is_set():
                # Lumina2 has no interrupt flag; raising from the callback
                # stops every family the same way.
                raise GenerationCancelled(self.key)
            return kwargs

        with self._lock:
            self.calls += 1
            poison = self.faults.before_generate(cancel) if self.faults is not None else False
            t0 = time.monotonic()
            generator = torch.Generator(device="cpu").manual_seed(params.seed)
            try:
                frames = self.runner.run(self.pipe, params, generator=generator, callback_on_step_end=on_step)
            except (ValueError, TypeError) as exc:
                # diffusers and the tokenizers raise these for inputs they
                # refuse (after our own checks passed): the caller's request,
                # not a sick model, so no retry and no breaker failure.
                raise ConstraintError(
                    self.key, [{"loc": ["body"], "msg": f"{self.key} refused the input: {exc}",
                                "type": "value_error.model_input"}]
                ) from exc
            gen_s = time.monotonic() - t0
        frames = np.asarray(frames, dtype=np.float32)
        if poison:
            frames = np.full_like(frames, np.nan)
        if not np.isfinite(frames).all():
            bad = int((~np.isfinite(frames)).sum())
            raise NonFiniteOutputError(self.key, f"{bad} of {frames.size} values are NaN/inf")
        if self.video:
            data = encode_mp4(frames, params.fps or self.cfg.defaults.fps)
            media = "video/mp4"
        else:
            data = encode_png(frames[0])
            media = "image/png"
        return {
            "data": data,
            "media_type": media,
            "model": self.key,
            "generation_s": gen_s,
            "frames": int(frames.shape[0]),
            "flat_output": bool(float(frames.std()) < 1e-3),
        }

    def health_problem(self) -> str | None:
        import torch

        if self.pipe is None:
            return "pipeline not loaded"
        if self.consecutive_failures >= self.cfg.unhealthy_after_failures:
            return f"{self.consecutive_failures} consecutive failed generations"
        if self.device == "cuda":
            try:
                torch.zeros(1, device="cuda").add_(1).item()
            except RuntimeError as exc:  # e.g. an illegal memory access poisons the context
                return f"CUDA device unusable: {exc}"
        return None


@serve.deployment(
    max_ongoing_requests=4,
    health_check_period_s=5,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=5,
)
class ModelDeployment:
    """Serve wrapper around ``ModelServer``; named after the model key."""

    def __init__(self, key: str, cfg: dict[str, Any], source: str, fault_injection: dict[str, Any] | None = None):
        fi = fault_injection or {}
        faults = None
        if fi.get("enabled"):
            faults = FaultInjector(key, _app_name(), enabled=True, poll_s=float(fi.get("poll_s", 0.5)))
        self.server = ModelServer(key, cfg, source, faults)
        if faults is not None:
            faults.start()

    async def generate(self, payload: dict[str, Any]) -> dict[str, Any]:
        from serve_app.errors import from_replica_exception

        try:
            params = self.server.to_params(payload)
        except ConstraintError as exc:
            raise from_replica_exception(exc, self.server.key) from exc
        cancel = threading.Event()
        try:
            result = await asyncio.to_thread(self.server.generate_sync, params, cancel)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread stops at its next step callback
            raise
        except Exception as exc:
            err = from_replica_exception(exc, self.server.key)
            if err.counts_as_failure:
                self.server.consecutive_failures += 1
            raise err from exc
        self.server.consecutive_failures = 0
        return result

    async def info(self) -> dict[str, Any]:
        s = self.server
        return {
            "model": s.key,
            "device": s.device,
            "dtype": str(s.dtype).removeprefix("torch."),
            "source": s.source,
            "load_s": s.load_s,
            "calls": s.calls,
            "consecutive_failures": s.consecutive_failures,
            "injected": dict(s.faults.injected) if s.faults is not None else {},
            "pid": __import__("os").getpid(),
        }

    async def check_health(self) -> None:
        problem = self.server.health_problem()
        if problem:
            raise RuntimeError(f"{self.server.key} unhealthy: {problem}")


def _app_name() -> str:
    try:
        return str(serve.get_replica_context().app_name)
    except Exception:  # constructed outside Serve (tests)
        return "genguard"
