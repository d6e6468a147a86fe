"""Engine: runs one prepared request against the model deployments.

This is the base engine of the main job: it calls the first step of the
chain, bounded by the request deadline (a handle call to a deployment with
no running replica would otherwise wait forever in Serve's queue).
Retries, breakers, fallbacks and degradation wrap this in the resilient
engine.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import AppConfig, ChainStep
from serve_app.deployment_manager import HealthMonitor


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


class EngineError(Exception):
    def __init__(
        self,
        status: int,
        kind: str,
        message: str,
        attempts: list[dict[str, Any]] | None = None,
        retry_after_s: int | None = None,
    ):
        super().__init__(message)
        self.status, self.kind = status, kind
        self.attempts = attempts or []
        self.retry_after_s = retry_after_s


class Engine:
    def __init__(self, kind: str, cfg: AppConfig, handles: dict[str, Any], health: HealthMonitor):
        self.kind, self.cfg, self.handles, self.health = kind, cfg, handles, health

    async def run(self, req: PreparedRequest) -> EngineResult:
        step = req.chain[0]
        model = step.model
        t0 = time.monotonic()
        remaining = req.deadline_at - t0
        if not self.health.is_up(model):
            raise EngineError(
                503,
                "model_unavailable",
                f"{model} has no running replica",
                [{"model": model, "kind": "model_unavailable", "message": "no running replica", "elapsed_s": 0.0}],
                retry_after_s=5,
            )
        response = self.handles[model].generate.remote(req.payload)
        try:
            out = await asyncio.wait_for(response, timeout=max(0.0, remaining))
        except TimeoutError:
            response.cancel()
            raise EngineError(
                504,
                "deadline_exceeded",
                f"deadline passed after {time.monotonic() - t0:.1f}s",
                [{"model": model, "kind": "timeout", "message": "deadline", "elapsed_s": time.monotonic() - t0}],
            ) from None
        return EngineResult(data=out["data"], media_type=out["media_type"], model=model)
