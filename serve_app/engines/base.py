"""The resilient engine behind the Enhanced Image and Video Engines.

One request, one ``FallbackExecutor.execute`` over the workflow's chain:

* the breaker gate (the router's ``SupervisorLink``) skips OPEN steps and
  asks for cluster-wide probe permits in HALF_OPEN;
* a step with no running replica is skipped (``ModelUnavailable``): a handle
  call to it would wait in Serve's queue forever;
* every handle call is bounded by the request deadline and cancelled when
  the executor gives up on it (the replica stops at its next step callback);
* retriable failures (replica died, model error, NaN output, timeout) are
  retried with the step's ``RetryPolicy``; backpressure and OPEN breakers
  move on to the next step at once, free of the retry budget;
* the optimizer applies the degradation level and each fallback model's
  constraints, and gives one smaller retry after an OOM.

No retry stacking: the executor bounds model calls per request by
``max_total_attempts``, and Serve's handle does not re-run a request whose
replica died (it raises ``ActorDiedError`` to the caller; measured, see
docs/resilience.md), so the only retries are these.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from resilience import (
    FallbackExecutor,
    GenGuardError,
    ModelTimeout,
    ModelUnavailable,
    RetryBudget,
    RetryPolicy,
)
from serve_app.config import AppConfig, ChainStep
from serve_app.errors import from_handle_exception
from serve_app.optimizer import Optimizer
from serve_app.supervisor_link import CURRENT_WORKFLOW

log = logging.getLogger("genguard.engine")


@dataclass
class PreparedRequest:
    request_id: str
    workflow: str
    chain: list[ChainStep]
    payload: dict[str, Any]
    deadline_at: float  # time.monotonic() deadline
    fallback: str = "allow"
    degradation: str = "allow"


@dataclass
class EngineResult:
    data: bytes
    media_type: str
    model: str
    attempts: int = 1
    fallback_depth: int = 0
    degradation_level: int = 0
    adjustments: list[dict[str, Any]] = field(default_factory=list)
    dropped_inputs: list[str] = field(default_factory=list)
    flat_output: bool = False


class EngineError(Exception):
    """A final failure, already shaped for the HTTP error body."""

    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        attempts: list[dict[str, Any]] | None = None,
        retry_after_s: int | None = None,
        detail: Any = None,
    ):
        super().__init__(message)
        self.status, self.kind = status, kind
        self.attempts = attempts or []
        self.retry_after_s = retry_after_s
        self.detail = detail


class HealthAwareGate:
    """The breaker gate plus the deployment manager's view: a model that is
    down is skipped before any call (free of the retry budget), and the
    attempt record says ``model_unavailable``, not ``circuit_open``."""

    def __init__(self, link: Any, is_up: Any):
        self.link, self.is_up = link, is_up

    def allows(self, key: str) -> bool:
        return bool(self.is_up(key)) and bool(self.link.allows(key))

    def skip_error(self, key: str) -> GenGuardError | None:
        if not self.is_up(key):
            return ModelUnavailable(f"{key} has no running replica", model=key, retry_after_s=5.0)
        return None

    def retry_after_s(self, key: str) -> float | None:
        value = self.link.retry_after_s(key)
        return None if value is None else float(value)

    async def acquire(self, key: str) -> Any:
        return await self.link.acquire(key)

    def complete(self, permit: Any, error: BaseException | None, duration_s: float) -> None:
        self.link.complete(permit, error, duration_s)


class Engine:
    """Runs prepared requests of one media kind (image or video)."""

    def __init__(
        self,
        kind: str,
        cfg: AppConfig,
        handles: dict[str, Any],
        link: Any,
        is_up: Any,
        budget: RetryBudget,
        optimizer: Optimizer,
    ):
        self.kind, self.cfg, self.handles = kind, cfg, handles
        self.link, self.is_up, self.optimizer = link, is_up, optimizer
        r = cfg.resilience
        self.executor = FallbackExecutor(
            retry=RetryPolicy.from_mapping(r.retry),
            max_total_attempts=r.max_total_attempts,
            gate=HealthAwareGate(link, is_up),
            budget=budget,
            on_budget_exhausted=r.on_budget_exhausted,
        )
        self.flat_outputs = 0

    async def run(self, req: PreparedRequest) -> EngineResult:
        level = int(self.link.degradation()["level"])
        steps = {s.model: s for s in req.chain}
        primary = req.chain[0].model
        plans: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        oom_changes: dict[str, list[dict[str, Any]]] = {}

        if level > 0 and req.degradation == "strict":
            _, changes = self.optimizer.plan(primary, req.payload, level)
            if any(c["reason"].startswith("degradation") for c in changes):
                raise EngineError(
                    503,
                    "degradation_refused",
                    f"the service is at degradation level {level} and the request is strict: "
                    + ", ".join(f"{c['param']} {c['from']}->{c['to']}" for c in changes),
                    retry_after_s=10,
                )

        def adapt(step: str, params: dict[str, Any]) -> dict[str, Any]:
            planned, changes = self.optimizer.plan(step, params, level)
            for dropped in steps[step].drops:
                planned.pop(dropped, None)
            plans[step] = (planned, changes)
            return planned

        def on_oom(step: str, params: dict[str, Any], err: GenGuardError) -> dict[str, Any] | None:
            smaller = self.optimizer.after_oom(step, params, level)
            if smaller is None:
                return None
            oom_changes[step] = smaller[1]
            return smaller[0]

        order = [s.model for s in req.chain]
        reserve = self.cfg.resilience.fallback_reserve_ratio

        async def call(step: str, attempt_no: int, params: dict[str, Any]) -> dict[str, Any]:
            response = self.handles[step].generate.remote(params)
            cap = None
            if reserve > 0 and order.index(step) < len(order) - 1:
                cap = max(0.0, (req.deadline_at - time.monotonic()) * (1.0 - reserve))
            try:
                return dict(await asyncio.wait_for(response, timeout=cap))
            except TimeoutError:
                response.cancel()
                raise ModelTimeout(
                    f"{step}: no answer within {cap:.1f}s (time kept for the fallback)", model=step
                ) from None
            except asyncio.CancelledError:
                response.cancel()
                raise
            except Exception as exc:
                raise from_handle_exception(exc, step) from exc

        t0 = time.monotonic()
        CURRENT_WORKFLOW.set(req.workflow)
        try:
            result = await self.executor.execute(
                [s.model for s in req.chain],
                call,
                req.payload,
                deadline_at_s=req.deadline_at,
                adapt=adapt,
                on_oom=on_oom,
            )
        except GenGuardError as err:
            attempts = [a.to_dict() for a in err.attempts]
            failed = sum(1 for a in err.attempts if a.called and a.kind)
            self.link.record_request(req.workflow, err, None, failed, time.monotonic() - t0, None)
            if err.kind == "invalid_request":
                raise EngineError(422, err.kind, err.message, attempts, detail=err.detail.get("violations")) from err
            retry_after = None
            if err.http_status == 503:
                retry_after = max(1, int(round(err.retry_after_s or 1.0)))
            raise EngineError(err.http_status, err.kind, err.message, attempts, retry_after) from err

        out = result.value
        model = result.model
        _, changes = plans.get(model, ({}, []))
        adjustments = list(changes) + oom_changes.get(model, [])
        if model != primary:
            # Report changes made to fit the fallback's constraints relative to
            # what the caller asked for.
            for c in adjustments:
                if c["reason"].startswith("model constraint"):
                    c["reason"] = f"fallback to {model}: {c['reason']}"
        failed = sum(1 for a in result.attempts if a.called and a.kind)
        shape = {k: req.payload.get(k) for k in ("width", "height", "num_frames", "num_inference_steps")}
        self.link.record_request(req.workflow, None, model, failed, time.monotonic() - t0, shape)
        if out.get("flat_output"):
            self.flat_outputs += 1
        return EngineResult(
            data=out["data"],
            media_type=out["media_type"],
            model=model,
            attempts=result.calls,
            fallback_depth=result.fallback_depth,
            degradation_level=level,
            adjustments=adjustments,
            dropped_inputs=list(steps[model].drops),
            flat_output=bool(out.get("flat_output")),
        )
