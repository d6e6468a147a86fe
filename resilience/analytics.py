"""Error analytics: rolling counts, recovery rate, incidents with MTTR, a report.

:class:`ErrorAnalytics` records every attempt outcome
(:meth:`~ErrorAnalytics.record_attempt`) and every request's final outcome
(:meth:`~ErrorAnalytics.record_request`) into one-minute buckets, keeping
the last 60 (memory is fixed, however long it runs and however many events
arrive: distinct keys per bucket are capped too). It keeps the incident log
of API.md: an incident opens when a model's breaker opens
(:meth:`~ErrorAnalytics.breaker_transition`) or its health turns ``down``
(:meth:`~ErrorAnalytics.model_health`) and closes when the breaker is CLOSED
and the model healthy again; recovery procedure runs
(:meth:`~ErrorAnalytics.record_recovery_run`) are events inside it. MTTR is
the mean open-to-close duration of the incidents closed in a window.

:meth:`~ErrorAnalytics.report` returns the ``GET /v1/errors/report`` body: a
JSON-serializable dict with counts by model, workflow and error kind over
1, 15 and 60 minutes, ``recovery_rate``, ``incidents``, ``mttr_s`` and
``top_errors`` with an actionable hint per kind.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ._util import Clock
from .breaker import BreakerState, BreakerTransition
from .errors import ERROR_KINDS, AttemptRecord
from .recovery import RecoveryRun

__all__ = ["ErrorAnalytics", "Incident", "WINDOWS_MIN", "hint_for", "shape_of"]

WINDOWS_MIN: tuple[int, ...] = (1, 15, 60)
"""Report windows, in minutes."""

_OTHER = "_other"
_OK = "ok"
_HEALTHY = frozenset({"healthy"})


def shape_of(params: Mapping[str, Any] | None) -> str | None:
    """``"WxH"`` or ``"WxHxF"`` from generation parameters (for hints)."""
    if not params:
        return None
    w, h = params.get("width"), params.get("height")
    if w is None or h is None:
        return None
    f = params.get("num_frames")
    return f"{w}x{h}" + (f"x{f}" if f else "")


_HINTS: dict[str, str] = {
    "out_of_memory": (
        "OOM on {model}{at}: lower max_frames / max_side_px at degradation level 1, "
        "or enable VAE tiling / CPU offload for {model}"
    ),
    "timeout": (
        "timeouts on {model}{at}: lower num_inference_steps at level 1 or raise "
        "attempt_timeout_s; check replica load (max_ongoing_requests)"
    ),
    "replica_failure": (
        "replica failures on {model}: check replica logs for crashes; add a replica so "
        "restarts do not drop capacity"
    ),
    "model_error": "pipeline errors on {model}{at}: see replica logs; check its source and parameters",
    "bad_output": (
        "NaN/inf output on {model}{at}: run its VAE in float32/bfloat16 or lower guidance_scale"
    ),
    "backpressure": (
        "queue full on {model}: add replicas (autoscaling max_replicas) or raise "
        "max_queued_requests; degradation level rises with sustained backpressure"
    ),
    "circuit_open": (
        "breaker open on {model}: fallbacks serve its traffic; see the incident cause"
    ),
    "model_unavailable": (
        "{model} has no running replica: check deployment status and constructor errors"
    ),
    "deadline_exceeded": (
        "requests ran past their deadline{on}: raise deadline_s or set latency_slo_s so "
        "degradation starts earlier"
    ),
    "retry_budget_exhausted": (
        "retry budget spent{on}: failures are widespread, not transient; fix the failing "
        "model rather than raising max_retry_ratio"
    ),
    "fallback_exhausted": (
        "every step failed{on}: see the attempts; add a fallback step or capacity"
    ),
    "invalid_request": "invalid requests{on}: callers need the 422 messages",
    "cancelled": "clients disconnect before completion{on}: compare client timeouts with generation time",
    "internal": "internal errors{on} are bugs: see router logs",
}


def hint_for(kind: str, model: str | None = None, shape: str | None = None) -> str:
    """An actionable hint for an error ``kind`` on ``model`` at ``shape``."""
    template = _HINTS.get(kind, "errors of kind {kind}{on}: see logs")
    return template.format(
        kind=kind,
        model=model or "its model",
        at=f" at {shape}" if shape else "",
        on=f" on {model}" if model else "",
    )


class _Bucket:
    """Counts of one minute."""

    __slots__ = ("attempts", "hit_error", "minute", "recovered", "requests", "shapes")

    def __init__(self, minute: int) -> None:
        self.minute = minute
        self.attempts: dict[tuple[str, str, str], int] = {}
        self.requests: dict[tuple[str, str, str], int] = {}
        self.shapes: dict[tuple[str, str, str], int] = {}
        self.hit_error = 0
        self.recovered = 0


class Incident:
    """One incident of one model (see the module docstring)."""

    __slots__ = (
        "breaker_open",
        "cause",
        "closed_at",
        "events",
        "health_down",
        "id",
        "model",
        "opened_at",
        "recovery",
    )

    def __init__(self, id_: int, model: str, opened_at: float, cause: str, max_events: int) -> None:
        self.id = id_
        self.model = model
        self.opened_at = opened_at
        self.closed_at: float | None = None
        self.cause = cause
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.recovery: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.breaker_open = False
        self.health_down = False

    @property
    def open(self) -> bool:
        """Still open?"""
        return self.closed_at is None

    def duration_s(self, now: float) -> float:
        """Open to close (or to ``now`` while open)."""
        end = self.closed_at if self.closed_at is not None else now
        return max(0.0, end - self.opened_at)

    def to_dict(self, now: float) -> dict[str, Any]:
        """The API.md incident shape."""
        return {
            "id": self.id,
            "model": self.model,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "duration_s": None if self.closed_at is None else round(self.duration_s(now), 6),
            "open_for_s": round(self.duration_s(now), 6),
            "cause": self.cause,
            "recovery": list(self.recovery),
            "events": list(self.events),
        }


class ErrorAnalytics:
    """Rolling error counts, recovery rate, incidents and MTTR (bounded memory).

    ``clock`` is wall time by default (incident timestamps are reported).
    """

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        max_keys_per_bucket: int = 512,
        max_shapes_per_bucket: int = 128,
        max_incidents: int = 200,
        max_events_per_incident: int = 50,
        top_n: int = 5,
    ) -> None:
        self._clock = clock
        self._max_keys = max_keys_per_bucket
        self._max_shapes = max_shapes_per_bucket
        self._max_events = max_events_per_incident
        self._top_n = top_n
        self._buckets: dict[int, _Bucket] = {}
        self._cur_minute = -1
        self._cur = _Bucket(-1)
        self._ids = itertools.count(1)
        self._open: dict[str, Incident] = {}
        self._closed: deque[Incident] = deque(maxlen=max_incidents)
        self._breaker: dict[str, BreakerState] = {}
        self._health: dict[str, str] = {}
        self._orphan_runs: deque[dict[str, Any]] = deque(maxlen=50)
        self.total_attempts = 0
        self.total_requests = 0

    # -------------------------------------------------------------- buckets
    def _bucket(self) -> _Bucket:
        minute = int(self._clock() // 60)
        if minute == self._cur_minute:
            return self._cur
        return self._rotate(minute)

    def _rotate(self, minute: int) -> _Bucket:
        if minute < self._cur_minute:
            return self._buckets.get(minute, self._cur)
        b = _Bucket(minute)
        self._buckets[minute] = b
        self._cur, self._cur_minute = b, minute
        low = minute - WINDOWS_MIN[-1]
        for m in [m for m in self._buckets if m <= low]:
            del self._buckets[m]
        return b

    @staticmethod
    def _inc(d: dict[tuple[str, str, str], int], key: tuple[str, str, str], cap: int) -> None:
        if key in d:
            d[key] += 1
        elif len(d) < cap:
            d[key] = 1
        else:
            other = (_OTHER, _OTHER, key[2] if key[2] in ERROR_KINDS or key[2] == _OK else _OTHER)
            d[other] = d.get(other, 0) + 1

    # -------------------------------------------------------------- records
    def record_attempt(
        self,
        model: str,
        kind: str | None = None,
        *,
        workflow: str | None = None,
        elapsed_s: float = 0.0,
        shape: str | None = None,
    ) -> None:
        """One attempt outcome (``kind`` None = success)."""
        minute = int(self._clock() // 60)
        b = self._cur if minute == self._cur_minute else self._rotate(minute)
        key = (model, workflow or _OTHER, kind or _OK)
        counts = b.attempts
        if key in counts:  # hot path, inlined
            counts[key] += 1
        else:
            self._inc(counts, key, self._max_keys)
        if kind is not None and shape is not None:
            self._inc(b.shapes, (model, shape, kind), self._max_shapes)
        self.total_attempts += 1

    def record_attempts(
        self,
        records: Iterable[AttemptRecord],
        *,
        workflow: str | None = None,
        shape: str | None = None,
    ) -> None:
        """Record each *called* :class:`AttemptRecord` of a request."""
        for r in records:
            if r.called:
                self.record_attempt(
                    r.model, r.kind, workflow=workflow, elapsed_s=r.elapsed_s, shape=shape
                )

    def record_request(
        self,
        workflow: str,
        kind: str | None = None,
        *,
        model: str | None = None,
        errors: int = 0,
    ) -> None:
        """One request's final outcome: ``kind`` None = served (by ``model``);
        ``errors`` = failed attempts it hit on the way (for the recovery rate)."""
        b = self._bucket()
        k = kind or _OK
        self._inc(b.requests, (workflow, model or _OTHER, k), self._max_keys)
        if errors > 0 or kind is not None:
            b.hit_error += 1
            if kind is None:
                b.recovered += 1
        self.total_requests += 1

    # ------------------------------------------------------------ incidents
    def breaker_transition(self, event: BreakerTransition) -> None:
        """Breaker listener: OPEN opens an incident; CLOSED may close it."""
        model = event.key
        self._breaker[model] = event.to_state
        inc = self._open.get(model)
        if event.to_state is BreakerState.OPEN:
            if inc is None:
                inc = self._open_incident(model, f"breaker open: {event.reason}", event.at_s)
            inc.breaker_open = True
        if inc is not None:
            inc.events.append(
                {
                    "at": event.at_s,
                    "type": "breaker",
                    "from": event.from_state.value,
                    "to": event.to_state.value,
                    "reason": event.reason,
                }
            )
            if event.to_state is BreakerState.CLOSED:
                inc.breaker_open = False
                self._maybe_close(model, event.at_s)

    def model_health(self, model: str, health: str, *, at_s: float | None = None) -> None:
        """Health of a model: ``healthy``, ``degraded`` or ``down``."""
        now = self._clock() if at_s is None else at_s
        before = self._health.get(model)
        self._health[model] = health
        inc = self._open.get(model)
        if health == "down":
            if inc is None:
                inc = self._open_incident(model, "model down", now)
            inc.health_down = True
        if inc is not None and before != health:
            inc.events.append({"at": now, "type": "health", "from": before, "to": health})
            if health in _HEALTHY:
                inc.health_down = False
                self._maybe_close(model, now)

    def record_recovery_run(self, run: RecoveryRun | Mapping[str, Any]) -> None:
        """A recovery procedure run: an event in its model's open incident."""
        item = run.to_dict() if isinstance(run, RecoveryRun) else dict(run)
        model = item.get("model")
        inc = self._open.get(str(model)) if model is not None else None
        if inc is None and model is None and len(self._open) == 1:
            inc = next(iter(self._open.values()))
        if inc is None:
            self._orphan_runs.append(item)
            return
        inc.recovery.append(item)

    def _open_incident(self, model: str, cause: str, at: float) -> Incident:
        inc = Incident(next(self._ids), model, at, cause, self._max_events)
        self._open[model] = inc
        return inc

    def _maybe_close(self, model: str, at: float) -> None:
        inc = self._open.get(model)
        if inc is None:
            return
        breaker = self._breaker.get(model, BreakerState.CLOSED)
        health = self._health.get(model)
        if breaker is BreakerState.CLOSED and (health is None or health in _HEALTHY):
            inc.closed_at = max(at, inc.opened_at)
            del self._open[model]
            self._closed.append(inc)

    def incidents(self, *, window_min: int | None = None) -> list[dict[str, Any]]:
        """Open incidents, then closed ones (newest first; within ``window_min`` if given)."""
        now = self._clock()
        out = [i.to_dict(now) for i in self._open.values()]
        for inc in reversed(self._closed):
            if window_min is not None and inc.closed_at is not None:
                if inc.closed_at < now - window_min * 60:
                    continue
            out.append(inc.to_dict(now))
        return out

    def incidents_summary(self, recent: int = 10) -> dict[str, list[dict[str, Any]]]:
        """``{"open": [...], "recent": [...]}`` as in API.md ``GET /v1/status``."""
        now = self._clock()
        return {
            "open": [i.to_dict(now) for i in self._open.values()],
            "recent": [i.to_dict(now) for i in list(reversed(self._closed))[:recent]],
        }

    def mttr_s(self, window_min: int = 60) -> float | None:
        """Mean open-to-close duration of incidents closed in the window."""
        now = self._clock()
        low = now - window_min * 60
        durations = [
            i.duration_s(now)
            for i in self._closed
            if i.closed_at is not None and i.closed_at >= low
        ]
        return sum(durations) / len(durations) if durations else None

    # --------------------------------------------------------------- counts
    def _window(self, window_min: int) -> list[_Bucket]:
        now_min = int(self._clock() // 60)
        return [b for m, b in self._buckets.items() if now_min - window_min < m <= now_min]

    def recovery_rate(self, window_min: int = 60) -> float | None:
        """Requests that hit an error and still succeeded / requests that hit an error."""
        buckets = self._window(window_min)
        hit = sum(b.hit_error for b in buckets)
        return sum(b.recovered for b in buckets) / hit if hit else None

    def counts(self, window_min: int = 60) -> dict[str, Any]:
        """Counts over the last ``window_min`` minutes (one report window)."""
        buckets = self._window(window_min)
        att_total = att_errors = 0
        by_kind: dict[str, int] = {}
        by_model: dict[str, dict[str, Any]] = {}
        by_wf: dict[str, dict[str, Any]] = {}
        for b in buckets:
            for (model, wf, kind), n in b.attempts.items():
                att_total += n
                for table, name in ((by_model, model), (by_wf, wf)):
                    row = table.setdefault(name, {"attempts": 0, "errors": 0, "by_kind": {}})
                    row["attempts"] += n
                    if kind != _OK:
                        row["errors"] += n
                        row["by_kind"][kind] = row["by_kind"].get(kind, 0) + n
                if kind != _OK:
                    att_errors += n
                    by_kind[kind] = by_kind.get(kind, 0) + n
        req_total = req_failed = 0
        final_by_kind: dict[str, int] = {}
        req_by_wf: dict[str, dict[str, int]] = {}
        for b in buckets:
            for (wf, _model, kind), n in b.requests.items():
                req_total += n
                row2 = req_by_wf.setdefault(wf, {"total": 0, "failed": 0})
                row2["total"] += n
                if kind != _OK:
                    req_failed += n
                    row2["failed"] += n
                    final_by_kind[kind] = final_by_kind.get(kind, 0) + n
        hit = sum(b.hit_error for b in buckets)
        recovered = sum(b.recovered for b in buckets)
        return {
            "window_s": window_min * 60,
            "attempts": {
                "total": att_total,
                "errors": att_errors,
                "by_kind": by_kind,
                "by_model": by_model,
                "by_workflow": by_wf,
            },
            "requests": {
                "total": req_total,
                "succeeded": req_total - req_failed,
                "failed": req_failed,
                "hit_error": hit,
                "recovered": recovered,
                "by_kind": final_by_kind,
                "by_workflow": req_by_wf,
            },
            "recovery_rate": recovered / hit if hit else None,
            "mttr_s": self.mttr_s(window_min),
        }

    def top_errors(self, window_min: int = 60) -> list[dict[str, Any]]:
        """The most frequent attempt error kinds, each with its models and a hint."""
        buckets = self._window(window_min)
        kinds: dict[str, int] = {}
        models: dict[str, dict[str, int]] = {}
        shapes: dict[tuple[str, str], dict[str, int]] = {}
        for b in buckets:
            for (model, _wf, kind), n in b.attempts.items():
                if kind == _OK:
                    continue
                kinds[kind] = kinds.get(kind, 0) + n
                per = models.setdefault(kind, {})
                per[model] = per.get(model, 0) + n
            for (model, shape, kind), n in b.shapes.items():
                sh = shapes.setdefault((kind, model), {})
                sh[shape] = sh.get(shape, 0) + n
        for b in buckets:
            for (_wf, _model, kind), n in b.requests.items():
                if kind != _OK and kind not in kinds and kind in ERROR_KINDS:
                    kinds[kind] = kinds.get(kind, 0) + n
        total = sum(kinds.values())
        out: list[dict[str, Any]] = []
        for kind, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))[: self._top_n]:
            per_model = models.get(kind, {})
            top_model = max(per_model.items(), key=lambda kv: kv[1])[0] if per_model else None
            sh = shapes.get((kind, top_model or ""), {})
            top_shape = max(sh.items(), key=lambda kv: kv[1])[0] if sh else None
            out.append(
                {
                    "kind": kind,
                    "count": n,
                    "share": round(n / total, 4) if total else 0.0,
                    "models": dict(sorted(per_model.items(), key=lambda kv: -kv[1])),
                    "hint": hint_for(kind, top_model, top_shape),
                }
            )
        return out

    def report(self) -> dict[str, Any]:
        """The ``GET /v1/errors/report`` body (JSON-serializable)."""
        windows = {f"{w}m": self.counts(w) for w in WINDOWS_MIN}
        last = windows[f"{WINDOWS_MIN[-1]}m"]
        return {
            "generated_at": self._clock(),
            "windows": windows,
            "recovery_rate": last["recovery_rate"],
            "mttr_s": last["mttr_s"],
            "incidents": self.incidents(window_min=WINDOWS_MIN[-1]),
            "top_errors": self.top_errors(WINDOWS_MIN[-1]),
            "recovery_runs_outside_incidents": list(self._orphan_runs),
            "totals": {"attempts": self.total_attempts, "requests": self.total_requests},
        }

    def memory_footprint(self) -> dict[str, int]:
        """Sizes of the bounded structures (tests assert on these)."""
        return {
            "buckets": len(self._buckets),
            "max_keys_in_a_bucket": max(
                (len(b.attempts) + len(b.requests) for b in self._buckets.values()), default=0
            ),
            "closed_incidents": len(self._closed),
            "open_incidents": len(self._open),
        }
