"""Production Deployment Manager: health of every model deployment.

It reads Serve's own view (``serve.status()``: deployment status and replica
counts) on a background interval and turns it into genguard's per-model
health: ``healthy`` (at least one running replica, deployment healthy),
``degraded`` (running, but fewer than wanted or the deployment reports
unhealthy replicas), ``down`` (no running replica after the first start
finished: constructor failures, ``DEPLOY_FAILED``). ``settled`` says the
model's first start has finished, healthy or given up — ``/readyz`` waits for
that.

The router never calls a deployment with no running replica: a handle call
to it would sit in Serve's queue forever (measured; see DESIGN).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from actors.supervisor import derive_health

log = logging.getLogger("genguard.health")


@dataclass
class ModelHealth:
    health: str = "down"  # healthy | degraded | down
    settled: bool = False
    status: str = "UNKNOWN"
    running: int = 0
    healthy: int = 0
    target: int = 0
    message: str = ""
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "health": self.health,
            "status": self.status,
            "replicas": {"running": self.running, "healthy": self.healthy, "target": self.target},
            "message": self.message,
            "since": self.since,
        }


class HealthMonitor:
    """Polls ``serve.status()`` for one application's model deployments."""

    def __init__(self, app_name: str, models: list[str], poll_s: float = 1.0, should_poll: Any = None):
        self.should_poll = should_poll or (lambda: True)
        self.app_name = app_name
        self.poll_s = poll_s
        self.models: dict[str, ModelHealth] = {m: ModelHealth() for m in models}
        self.last_poll: float | None = None
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                if self.should_poll():
                    await self.poll_once()
            except Exception as exc:  # keep polling; report the problem in /v1/status
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("health poll failed: %s", self.last_error)
            await asyncio.sleep(self.poll_s)

    async def poll_once(self) -> None:
        from ray import serve

        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(self.app_name)
        if app is None:
            return
        for key, mh in self.models.items():
            dep = app.deployments.get(key)
            if dep is None:
                continue
            states = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
            st = str(getattr(dep.status, "value", dep.status))
            # The supervisor's rule, so both views of Serve agree.
            health, settled, running = derive_health(st, states, was_settled=mh.settled)
            if health == "starting":  # API.md knows healthy/degraded/down only
                health = "down"
            if health != mh.health:
                mh.since = time.time()
            mh.health, mh.status, mh.running = health, st, running
            mh.healthy = running
            mh.target = sum(states.values())
            mh.message = dep.message or ""
            mh.settled = mh.settled or settled
        self.last_poll = time.time()
        self.last_error = None

    def update_from(self, health: dict[str, dict[str, Any]]) -> None:
        """Take the supervisor's view (the singleton health loop)."""
        for key, h in health.items():
            mh = self.models.get(key)
            if mh is None:
                continue
            if h.get("health") != mh.health:
                mh.since = float(h.get("since") or time.time())
            health = str(h.get("health", mh.health))
            # The supervisor reports "starting" before a model's first start
            # settles; API.md knows healthy/degraded/down only.
            mh.health = "down" if health == "starting" else health
            mh.running = int(h.get("running", 0))
            mh.healthy = mh.running
            mh.message = str(h.get("message") or "")
            mh.settled = mh.settled or bool(h.get("settled", mh.health != "down"))
        self.last_poll = time.time()

    def is_up(self, key: str) -> bool:
        mh = self.models.get(key)
        return mh is not None and mh.health in ("healthy", "degraded")

    def all_settled(self) -> bool:
        return all(m.settled for m in self.models.values())
