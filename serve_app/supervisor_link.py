"""A router replica's link to the cluster-wide supervisor actor.

The hot path never waits on the supervisor:

* **State in**: a background long-poll (``snapshot(since_version)``) keeps a
  versioned copy of the breaker states, the degradation level and model
  health; a change on the supervisor reaches every router in one round trip.
* **Outcomes out**: attempt outcomes (with their breaker permits) and
  request outcomes are queued and sent in batches every
  ``report_interval_s``; a breaker failure flushes the batch at once (after
  ``flush_failure_s``), so a failing model trips its breaker fast.
* **Probes**: only when a breaker is HALF_OPEN does a request ask the
  supervisor for a probe permit, so the permitted number holds cluster-wide.

If the supervisor is unreachable (its snapshot older than ``stale_after_s``),
the router keeps serving: admission falls back to local breakers (fed with
every outcome all along) and health to its own ``serve.status()`` polling,
and ``/v1/status`` says so.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

from resilience import (
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    GenGuardError,
    Outcome,
    Permit,
    SnapshotGate,
    counts_as_failure,
)
from serve_app.config import AppConfig

log = logging.getLogger("genguard.supervisor_link")

# The workflow of the request being executed (set by the engine), so attempt
# outcomes reach analytics with their workflow.
CURRENT_WORKFLOW: contextvars.ContextVar[str | None] = contextvars.ContextVar("genguard_workflow", default=None)


def supervisor_settings(cfg: AppConfig, app_name: str) -> dict[str, Any]:
    r = cfg.resilience
    return {
        "models": list(cfg.models),
        "breaker": dict(r.breaker),
        "breaker_overrides": {k: dict(v) for k, v in r.breaker_overrides.items()},
        "degradation": {"levels": [dict(x) for x in r.degradation.levels], "policy": dict(r.degradation.policy)},
        "store_key": f"genguard/supervisor/{app_name}",
        "app_name": app_name,
        "health_poll_s": r.supervisor.health_poll_s,
        "tick_s": r.supervisor.tick_s,
    }


def supervisor_name(app_name: str) -> str:
    from actors.supervisor import SUPERVISOR_NAME

    return f"{SUPERVISOR_NAME}-{app_name}"


class SupervisorLink:
    """Breaker gate, degradation level and health view of one router replica."""

    def __init__(self, cfg: AppConfig, app_name: str):
        self.cfg = cfg
        self.app_name = app_name
        self.sc = cfg.resilience.supervisor
        self.settings = supervisor_settings(cfg, app_name)
        self.name = supervisor_name(app_name)
        base = dict(cfg.resilience.breaker)
        self.local = BreakerRegistry(
            BreakerConfig.from_mapping(base),
            overrides={
                k: BreakerConfig.from_mapping({**base, **v})
                for k, v in cfg.resilience.breaker_overrides.items()
            },
            keys=list(cfg.models),
        )
        self.gate = SnapshotGate(probe=self._probe)
        self.snapshot: dict[str, Any] | None = None
        self.version = -1
        self.snapshot_at: float | None = None
        self.last_error: str | None = None
        self._actor: Any = None
        self._requests: list[dict[str, Any]] = []
        self._outcomes: list[dict[str, Any]] = []
        self._failure = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.calls = {"snapshot": 0, "report": 0, "probe": 0, "admin": 0}
        self.requests_seen = 0

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._refresh_loop()), loop.create_task(self._report_loop())]

    async def actor(self) -> Any:
        if self._actor is None:
            from actors.supervisor import get_or_create_supervisor

            self._actor = await asyncio.to_thread(get_or_create_supervisor, self.settings, self.name)
        return self._actor

    def _forget_actor(self, exc: BaseException) -> None:
        """After the supervisor died for good, look it up (or create it) anew:
        get_if_exists makes racing routers agree, and it restores its state
        from the store."""
        from ray.exceptions import ActorDiedError

        if isinstance(exc, ActorDiedError):
            self._actor = None

    def fresh(self) -> bool:
        return self.snapshot_at is not None and time.monotonic() - self.snapshot_at < self.sc.stale_after_s

    def snapshot_age_s(self) -> float | None:
        return None if self.snapshot_at is None else time.monotonic() - self.snapshot_at

    def apply(self, snap: dict[str, Any]) -> None:
        self.snapshot = snap
        self.version = int(snap.get("version", self.version))
        self.snapshot_at = time.monotonic()
        self.gate.update(snap)
        self.last_error = None

    async def refresh_once(self, timeout_s: float = 3.0) -> None:
        """One immediate snapshot (a fresh router's first view)."""
        actor = await self.actor()
        self.calls["snapshot"] += 1
        self.apply(await asyncio.wait_for(actor.snapshot.remote(-1, 0.0), timeout=timeout_s))

    async def _refresh_loop(self) -> None:
        while True:
            try:
                actor = await self.actor()
                ref = actor.snapshot.remote(self.version, self.sc.refresh_timeout_s)
                self.calls["snapshot"] += 1
                snap = await asyncio.wait_for(ref, timeout=self.sc.refresh_timeout_s + 5.0)
                self.apply(snap)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable or restarting: serve on local state
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("supervisor refresh failed: %s", self.last_error)
                self._forget_actor(exc)
                await asyncio.sleep(0.5)

    async def _report_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._failure.wait(), timeout=self.sc.report_interval_s)
                await asyncio.sleep(self.sc.flush_failure_s)
            except TimeoutError:
                pass
            self._failure.clear()
            await self.flush()

    async def flush(self) -> None:
        outcomes, self._outcomes = self._outcomes, []
        requests, self._requests = self._requests, []
        if not outcomes and not requests:
            return
        try:
            actor = await self.actor()
            self.calls["report"] += 1
            await asyncio.wait_for(actor.report.remote(outcomes, requests), timeout=10.0)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # dropped: the local breakers still saw them
            self.last_error = f"report failed: {type(exc).__name__}: {exc}"[:300]
            log.warning("%s", self.last_error)

    # -- BreakerGate for the fallback executor ---------------------------------
    def state(self, key: str) -> BreakerState:
        return self.gate.state(key) if self.fresh() else self.local.state(key)

    def allows(self, key: str) -> bool:
        return self.gate.allows(key) if self.fresh() else self.local.allows(key)

    def retry_after_s(self, key: str) -> float | None:
        return self.gate.retry_after_s(key) if self.fresh() else self.local.retry_after_s(key)

    async def acquire(self, key: str) -> Permit | None:
        if self.fresh():
            return await self.gate.acquire(key)
        return self.local.try_acquire(key)

    def complete(self, permit: Permit, error: BaseException | None, duration_s: float) -> None:
        # The local breakers see every outcome, so they are warm if the
        # supervisor goes away.
        if self.fresh():
            if len(self._outcomes) < 10_000:
                out = Outcome.of(permit.key, error, duration_s, permit=permit, at_s=time.time()).to_dict()
                out["workflow"] = CURRENT_WORKFLOW.get()
                self._outcomes.append(out)
            self.local.record(permit.key, error, duration_s)
        else:
            self.local.complete(permit, error, duration_s)
        if error is not None and counts_as_failure(error):
            self._failure.set()

    async def _probe(self, key: str) -> Permit | None:
        try:
            actor = await self.actor()
            self.calls["probe"] += 1
            got = await asyncio.wait_for(actor.try_acquire.remote(key), timeout=2.0)
        except Exception as exc:  # no probe permit without the supervisor
            self.last_error = f"probe failed: {type(exc).__name__}: {exc}"[:300]
            return None
        return None if got is None else Permit.from_dict(got)

    # -- request outcomes -------------------------------------------------------
    def record_request(
        self, workflow: str, error: GenGuardError | None, model: str | None, errors: int,
        latency_s: float, shape: dict[str, Any] | None,
    ) -> None:
        self.requests_seen += 1
        if len(self._requests) < 10_000:
            self._requests.append(
                {
                    "workflow": workflow,
                    "final_kind": None if error is None else error.kind,
                    "model": model,
                    "errors": errors,
                    "latency_s": latency_s,
                    "shape": shape,
                }
            )

    # -- views ------------------------------------------------------------------
    def degradation(self) -> dict[str, Any]:
        if self.snapshot is None:
            return {"level": 0, "mode": "auto"}
        d = self.snapshot.get("degradation") or {}
        return {"level": int(d.get("level", 0)), "mode": d.get("mode", "auto")}

    def health(self) -> dict[str, dict[str, Any]] | None:
        if not self.fresh() or self.snapshot is None:
            return None
        h = self.snapshot.get("health")
        return dict(h) if h else None

    def calls_per_request(self) -> float | None:
        if not self.requests_seen:
            return None
        return sum(self.calls.values()) / self.requests_seen

    def status(self) -> dict[str, Any]:
        return {
            "reachable": self.fresh(),
            "snapshot_age_s": self.snapshot_age_s(),
            "version": self.version,
            "last_error": self.last_error,
            "calls": dict(self.calls),
            "requests": self.requests_seen,
            "calls_per_request": self.calls_per_request(),
        }
