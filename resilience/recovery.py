"""Recovery procedures: events mapped to async callables, with cooldowns and run records.

The Ray layers register the procedures (free a device cache, lower a model's
caps, restart a deployment); this module only decides when they run and
records each run::

    recovery = RecoveryRegistry(clock=time.time)
    recovery.register(RecoveryEvent.OUT_OF_MEMORY, "free_cache", free_cache, cooldown_s=60)
    recovery.add_listener(analytics.record_recovery_run)   # runs count toward incidents
    runs = await recovery.dispatch(RecoveryEvent.OUT_OF_MEMORY, model="wan-t2v")

A procedure is ``async def proc(ctx: RecoveryContext) -> object``. Its
cooldown is kept per (procedure, model): while cooling down, a dispatch
skips it (counted in :meth:`RecoveryRegistry.stats`). Procedures of one event
run one after another in registration order; one failing (or exceeding
``timeout_s``) does not stop the next. Cancellation propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._util import Clock
from .errors import ConfigError

__all__ = [
    "Procedure",
    "RecoveryContext",
    "RecoveryEvent",
    "RecoveryRegistry",
    "RecoveryRun",
    "RunListener",
]

log = logging.getLogger(__name__)


class RecoveryEvent(StrEnum):
    """Events that trigger recovery procedures."""

    BREAKER_OPENED = "breaker_opened"
    OUT_OF_MEMORY = "out_of_memory"
    MODEL_UNHEALTHY = "model_unhealthy"
    BACKPRESSURE_SUSTAINED = "backpressure_sustained"


@dataclass(frozen=True, slots=True)
class RecoveryContext:
    """What a procedure is told about the event."""

    event: RecoveryEvent
    model: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)
    at_s: float = 0.0


Procedure = Callable[[RecoveryContext], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class RecoveryRun:
    """One run of a procedure: ``outcome`` is ``succeeded``, ``failed`` or ``timed_out``."""

    procedure: str
    event: str
    model: str | None
    started_at: float
    ended_at: float
    outcome: str
    error: str | None = None

    @property
    def duration_s(self) -> float:
        """How long it ran."""
        return self.ended_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (an event inside an incident)."""
        return {
            "procedure": self.procedure,
            "event": self.event,
            "model": self.model,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_s": round(self.duration_s, 6),
            "outcome": self.outcome,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecoveryRun:
        """Inverse of :meth:`to_dict`."""
        return cls(
            procedure=str(data["procedure"]),
            event=str(data["event"]),
            model=data.get("model"),
            started_at=float(data["started_at"]),
            ended_at=float(data["ended_at"]),
            outcome=str(data["outcome"]),
            error=data.get("error"),
        )


RunListener = Callable[[RecoveryRun], None]


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    proc: Procedure
    cooldown_s: float
    timeout_s: float | None


class RecoveryRegistry:
    """Event -> procedures, with per-(procedure, model) cooldowns and run records."""

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        max_runs: int = 500,
        listeners: Iterable[RunListener] = (),
    ) -> None:
        self._clock = clock
        self._entries: dict[RecoveryEvent, list[_Entry]] = {}
        self._last_start: dict[tuple[str, str | None], float] = {}
        self._runs: deque[RecoveryRun] = deque(maxlen=max_runs)
        self._listeners: list[RunListener] = list(listeners)
        self._skipped = 0

    def register(
        self,
        event: RecoveryEvent | str,
        name: str,
        procedure: Procedure,
        *,
        cooldown_s: float = 60.0,
        timeout_s: float | None = None,
    ) -> None:
        """Run ``procedure`` on ``event`` at most once per ``cooldown_s`` per model."""
        ev = self._event(event)
        if cooldown_s < 0:
            raise ConfigError(f"recovery.{name}.cooldown_s must be >= 0", key=f"recovery.{name}")
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError(f"recovery.{name}.timeout_s must be > 0", key=f"recovery.{name}")
        entries = self._entries.setdefault(ev, [])
        if any(e.name == name for e in entries):
            raise ConfigError(
                f"recovery.{name}: already registered for {ev.value}", key=f"recovery.{name}"
            )
        entries.append(_Entry(name, procedure, cooldown_s, timeout_s))

    def procedures(self, event: RecoveryEvent | str) -> list[str]:
        """Names registered for ``event``, in run order."""
        return [e.name for e in self._entries.get(self._event(event), [])]

    def add_listener(self, listener: RunListener) -> None:
        """Call ``listener(RecoveryRun)`` after every run (e.g. analytics)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: RunListener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def cooling_down(self, name: str, model: str | None = None) -> float:
        """Seconds until ``name`` may run again for ``model`` (0 = now)."""
        last = self._last_start.get((name, model))
        if last is None:
            return 0.0
        cooldown = max(
            (e.cooldown_s for es in self._entries.values() for e in es if e.name == name),
            default=0.0,
        )
        return max(0.0, last + cooldown - self._clock())

    async def dispatch(
        self,
        event: RecoveryEvent | str,
        model: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> list[RecoveryRun]:
        """Run the procedures of ``event`` that are not cooling down; their runs."""
        ev = self._event(event)
        ctx = RecoveryContext(ev, model, dict(detail or {}), self._clock())
        runs: list[RecoveryRun] = []
        for entry in list(self._entries.get(ev, [])):
            key = (entry.name, model)
            last = self._last_start.get(key)
            now = self._clock()
            if last is not None and now - last < entry.cooldown_s:
                self._skipped += 1
                continue
            self._last_start[key] = now
            runs.append(await self._run(entry, ev, model, ctx))
        return runs

    async def _run(
        self, entry: _Entry, ev: RecoveryEvent, model: str | None, ctx: RecoveryContext
    ) -> RecoveryRun:
        start = self._clock()
        outcome, error = "succeeded", None
        try:
            if entry.timeout_s is None:
                await entry.proc(ctx)
            else:
                async with asyncio.timeout(entry.timeout_s):
                    await entry.proc(ctx)
        except TimeoutError as exc:
            outcome, error = "timed_out", str(exc) or f"exceeded {entry.timeout_s:g}s"
        except Exception as exc:
            log.exception("recovery procedure %s failed", entry.name)
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
        run = RecoveryRun(entry.name, ev.value, model, start, self._clock(), outcome, error)
        self._runs.append(run)
        for listener in list(self._listeners):
            try:
                listener(run)
            except Exception:
                log.exception("recovery run listener failed")
        return run

    def runs(self, limit: int | None = None) -> list[RecoveryRun]:
        """Recorded runs, oldest first (the last ``limit`` if given)."""
        items = list(self._runs)
        return items if limit is None else items[-limit:]

    def stats(self) -> dict[str, int]:
        """``{"runs", "succeeded", "failed", "timed_out", "skipped_cooldown"}``."""
        out = {"runs": len(self._runs), "succeeded": 0, "failed": 0, "timed_out": 0}
        for run in self._runs:
            out[run.outcome] = out.get(run.outcome, 0) + 1
        out["skipped_cooldown"] = self._skipped
        return out

    @staticmethod
    def _event(event: RecoveryEvent | str) -> RecoveryEvent:
        try:
            return RecoveryEvent(event)
        except ValueError as exc:
            known = ", ".join(e.value for e in RecoveryEvent)
            raise ConfigError(f"unknown recovery event {event!r}; known: {known}") from exc
