"""The supervisor: one named, detached actor holding genguard's cluster-wide state.

It owns, all from :mod:`resilience`: one :class:`~resilience.CircuitBreaker`
per model (a :class:`~resilience.BreakerRegistry`), the
:class:`~resilience.DegradationController`, :class:`~resilience.ErrorAnalytics`
(counts, incidents, MTTR) and a :class:`~resilience.RecoveryRegistry`.

Routers never wait on it per request. Each router replica

- reports attempt outcomes (:meth:`Supervisor.report`, ``Outcome.to_dict()``
  items) and request results in batches;
- keeps a cached, versioned copy of :meth:`Supervisor.snapshot`, refreshed by
  a long-poll (``snapshot(since_version=v)`` returns as soon as the version
  moves, or after ``timeout_s`` with the same one);
- asks for a probe permit (:meth:`Supervisor.try_acquire`) only when a
  breaker is HALF_OPEN, so the permitted number of probes holds cluster-wide.

The version moves on every breaker transition, degradation level change,
health change (health, running count or settled flag), reset and override.

It is an async actor: every method runs on one event loop, so the
resilience objects are never touched from two threads, and a long-poll
waiting costs nothing. One background task ticks every ``tick_s``
(OPEN -> HALF_OPEN after the wait, degradation evaluation, persistence); a
second one (only if ``health_poll_s`` is set) polls ``serve.status()`` for
the application and turns it into per-model health (:func:`derive_health`).

State survives the actor: on every change (never per report) it is written
to Ray's GCS key-value store (namespace :data:`KV_NAMESPACE`, key
``settings["store_key"]``) and restored by the constructor, so an OPEN
breaker stays OPEN, with its original ``open_until``, across
``ray.kill(supervisor, no_restart=False)``. See :meth:`Supervisor._document`
for what is (and is not) persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, cast

import ray
from ray.experimental import internal_kv

from resilience import (
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    DegradationController,
    DegradationLadder,
    DegradationPolicy,
    ErrorAnalytics,
    Incident,
    LevelChange,
    Outcome,
    RecoveryContext,
    RecoveryEvent,
    RecoveryRegistry,
    RecoveryRun,
    shape_of,
)

__all__ = [
    "KV_NAMESPACE",
    "MAX_CONCURRENCY",
    "SUPERVISOR_NAME",
    "SUPERVISOR_NAMESPACE",
    "STORE_FORMAT",
    "Supervisor",
    "clear_store",
    "derive_health",
    "get_or_create_supervisor",
    "supervisor_options",
]

log = logging.getLogger("genguard.supervisor")

SUPERVISOR_NAME = "genguard-supervisor"
SUPERVISOR_NAMESPACE = "genguard"
KV_NAMESPACE = "genguard"
"""Namespace of the GCS key-value store entries."""
STORE_FORMAT = 1
"""Version of the persisted document; another version is ignored on restore."""
MAX_CONCURRENCY = 1000
"""Concurrent calls the actor accepts (long-polls from every router replica park here)."""

HEALTH_VALUES = ("healthy", "degraded", "down", "starting")
_ANALYTICS_HEALTH = frozenset({"healthy", "degraded", "down"})
_MAX_LONG_POLL_S = 60.0
_MAX_RECENT = 50
_MAX_MESSAGE = 500
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


# ------------------------------------------------------------------ creation
def supervisor_options(name: str = SUPERVISOR_NAME) -> dict[str, Any]:
    """``Supervisor.options(...)`` keyword arguments: named, detached, restarted forever.

    ``max_task_retries=-1``: a call in flight when the actor dies is re-run on
    the restarted actor instead of failing (callers bound every call with a
    timeout anyway). ``num_cpus=0``: it never competes with model replicas.
    """
    return {
        "name": name,
        "namespace": SUPERVISOR_NAMESPACE,
        "lifetime": "detached",
        "max_restarts": -1,
        "max_task_retries": -1,
        "num_cpus": 0,
        "get_if_exists": True,
        "max_concurrency": MAX_CONCURRENCY,
    }


def get_or_create_supervisor(
    settings: Mapping[str, Any], name: str = SUPERVISOR_NAME
) -> ray.actor.ActorHandle[Any]:
    """The supervisor named ``name``, created with ``settings`` if it does not exist.

    Safe to race: Ray's ``get_if_exists`` makes every caller get the same
    actor. ``settings`` only take effect for the caller that creates it (an
    existing supervisor keeps the settings it was created with).
    """
    # mypy keeps a decorated class's own type; the decorator made it an ActorClass.
    actor_class = cast("ray.actor.ActorClass[Supervisor]", Supervisor)
    handle = actor_class.options(**supervisor_options(name)).remote(dict(settings))
    return cast("ray.actor.ActorHandle[Any]", handle)


def clear_store(store_key: str) -> None:
    """Delete a supervisor's persisted state (tests; needs a connected Ray)."""
    internal_kv._internal_kv_del(store_key, namespace=KV_NAMESPACE)


# -------------------------------------------------------------------- health
def derive_health(
    status: str, replica_states: Mapping[str, int], *, was_settled: bool = False
) -> tuple[str, bool, int]:
    """``(health, settled, running)`` of one Serve deployment.

    ``status`` is a ``DeploymentStatus`` value, ``replica_states`` maps
    ``ReplicaState`` values to counts. With running replicas: ``UNHEALTHY``
    or ``DEPLOY_FAILED`` is ``degraded``, anything else ``healthy``. With none:
    ``UNHEALTHY`` / ``DEPLOY_FAILED`` is ``down``; ``UPDATING`` / ``UPSCALING``
    is ``starting`` (replicas are coming up: not ``down``); ``HEALTHY`` /
    ``DOWNSCALING`` is ``healthy`` (scaled to zero on purpose). ``settled``
    says the first start has finished (healthy or given up); once True it
    stays True (``was_settled``).
    """
    running = int(replica_states.get("RUNNING", 0))
    failed = status in ("UNHEALTHY", "DEPLOY_FAILED")
    if running > 0:
        return ("degraded" if failed else "healthy"), True, running
    if failed:
        return "down", True, 0
    if status in ("UPDATING", "UPSCALING"):
        return "starting", was_settled, 0
    return "healthy", True, 0


# --------------------------------------------------------------- persistence
class _Store:
    """One JSON document in Ray's GCS key-value store (disabled without a key)."""

    def __init__(self, key: str | None) -> None:
        self.key = key or None
        self.writes = 0
        self.errors = 0
        self.last_error: str | None = None

    def load(self) -> dict[str, Any] | None:
        if self.key is None:
            return None
        try:
            raw = internal_kv._internal_kv_get(self.key, namespace=KV_NAMESPACE)
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("supervisor: reading %s failed", self.key)
            return None
        if not raw:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            log.exception("supervisor: %s holds no JSON; ignoring it", self.key)
            return None
        return doc if isinstance(doc, dict) else None

    def save(self, doc: Mapping[str, Any]) -> bool:
        if self.key is None:
            return True
        try:
            internal_kv._internal_kv_put(
                self.key,
                json.dumps(doc, separators=(",", ":")),
                overwrite=True,
                namespace=KV_NAMESPACE,
            )
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("supervisor: writing %s failed", self.key)
            return False
        self.writes += 1
        return True


# ErrorAnalytics has no snapshot/restore of its own: these two functions
# export and rebuild its incident log (open and closed incidents, the
# breaker/health views that decide when an incident closes, the id counter)
# from its internals. If ErrorAnalytics grows snapshot()/restore(), those
# are used instead. Rolling minute counts are not persisted.
def _export_analytics(analytics: ErrorAnalytics) -> dict[str, Any]:
    own = getattr(analytics, "snapshot", None)
    if callable(own):
        return {"native": own()}
    now = time.time()
    a: Any = analytics
    open_items = [
        {**inc.to_dict(now), "breaker_open": inc.breaker_open, "health_down": inc.health_down}
        for inc in a._open.values()
    ]
    closed_items = [inc.to_dict(now) for inc in a._closed]
    ids = [int(i["id"]) for i in open_items + closed_items]
    return {
        "open": open_items,
        "closed": closed_items,
        "breaker": {k: BreakerState(v).value for k, v in a._breaker.items()},
        "health": dict(a._health),
        "orphan_runs": list(a._orphan_runs),
        "next_id": max(ids, default=0) + 1,
    }


def _incident_from_dict(data: Mapping[str, Any], max_events: int) -> Incident:
    inc = Incident(
        int(data["id"]),
        str(data["model"]),
        float(data["opened_at"]),
        str(data.get("cause", "")),
        max_events,
    )
    closed = data.get("closed_at")
    inc.closed_at = None if closed is None else float(closed)
    inc.events.extend(dict(e) for e in data.get("events") or [])
    inc.recovery.extend(dict(r) for r in data.get("recovery") or [])
    inc.breaker_open = bool(data.get("breaker_open", False))
    inc.health_down = bool(data.get("health_down", False))
    return inc


def _restore_analytics(analytics: ErrorAnalytics, data: Mapping[str, Any]) -> None:
    if "native" in data:
        own = getattr(analytics, "restore", None)
        if callable(own):
            own(data["native"])
        return
    a: Any = analytics
    max_events = int(a._max_events)
    for item in data.get("closed") or []:
        a._closed.append(_incident_from_dict(item, max_events))
    for item in data.get("open") or []:
        inc = _incident_from_dict(item, max_events)
        inc.closed_at = None
        a._open[inc.model] = inc
    a._breaker.update({str(k): BreakerState(v) for k, v in (data.get("breaker") or {}).items()})
    a._health.update({str(k): str(v) for k, v in (data.get("health") or {}).items()})
    a._orphan_runs.extend(dict(r) for r in data.get("orphan_runs") or [])
    a._ids = itertools.count(max(1, int(data.get("next_id", 1))))


# ---------------------------------------------------------------- settings
def _section(settings: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = settings.get(name)
    return value if isinstance(value, Mapping) else {}


def _clean_message(message: str) -> str:
    """A health message as published: no terminal colours, at most 500 characters
    (Serve puts whole constructor tracebacks in it; the tail says what failed)."""
    text = _ANSI.sub("", str(message)).strip()
    if len(text) <= _MAX_MESSAGE:
        return text
    return text[: _MAX_MESSAGE // 2 - 3] + " … " + text[-(_MAX_MESSAGE // 2 - 2) :]


def _shape(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return shape_of(value)
    return None


async def _record_only(ctx: RecoveryContext) -> None:
    """Default recovery procedure: the run itself is the record (in the incident)."""
    log.info("recovery event %s for %s: %s", ctx.event.value, ctx.model, dict(ctx.detail))


# --------------------------------------------------------------------- actor
@ray.remote
class Supervisor:
    """Cluster-wide breakers, degradation, analytics, incidents (see the module docstring).

    ``settings`` (JSON-able; missing sections take resilience's defaults):
    ``models`` (keys; their breakers exist from the start and their health
    is polled), ``breaker`` (:class:`~resilience.BreakerConfig` fields),
    ``breaker_overrides`` (``{model: {...}}``, merged over ``breaker``), ``degradation``
    (``{"levels": [rungs 1..N], "policy": {DegradationPolicy fields}}``),
    ``store_key`` (GCS KV key; empty/None disables persistence; default
    ``genguard/supervisor/<app_name>``), ``app_name``, ``health_poll_s``
    (None: no polling; health only through :meth:`set_health`), ``tick_s``.
    """

    def __init__(self, settings: Mapping[str, Any]) -> None:
        self._settings = dict(settings)
        self._models: list[str] = [str(m) for m in settings.get("models") or []]
        self._app_name = str(settings.get("app_name") or "genguard")
        store_key = settings.get("store_key", f"genguard/supervisor/{self._app_name}")
        self._store = _Store(None if not store_key else str(store_key))
        self._tick_s = max(0.01, float(settings.get("tick_s") or 0.2))
        poll = settings.get("health_poll_s")
        self._health_poll_s: float | None = None if poll is None else max(0.05, float(poll))

        # Validated configs (a bad key raises ConfigError naming it).
        # A per-model override is merged over the base section (as the config does).
        base = dict(_section(settings, "breaker"))
        self._breaker_cfg = BreakerConfig.from_mapping(base, "breaker")
        self._breaker_overrides = {
            str(k): BreakerConfig.from_mapping({**base, **dict(v)}, f"breaker_overrides.{k}")
            for k, v in _section(settings, "breaker_overrides").items()
        }
        deg = _section(settings, "degradation")
        self._ladder = DegradationLadder.from_config(list(deg.get("levels") or []))
        self._policy = DegradationPolicy.from_mapping(deg.get("policy"), "degradation.policy")

        self._version = 0
        self._changed = asyncio.Event()
        self._dirty = False
        self._started_at = time.time()
        self._restored = False
        self._restore_error: str | None = None
        self._health: dict[str, dict[str, Any]] = {}
        self._transitions: deque[dict[str, Any]] = deque(maxlen=_MAX_RECENT)
        self._level_changes: deque[dict[str, Any]] = deque(maxlen=_MAX_RECENT)
        self._pending: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._counters: dict[str, int] = dict.fromkeys(
            (
                "report_calls",
                "snapshot_calls",
                "long_polls_woken",
                "long_polls_timed_out",
                "outcomes_received",
                "outcomes_rejected",
                "requests_received",
                "requests_rejected",
                "try_acquire_calls",
                "probe_permits_granted",
                "health_polls",
                "health_poll_errors",
                "ticks",
                "tick_errors",
            ),
            0,
        )
        self._last_health_poll: float | None = None
        self._last_health_error: str | None = None
        self._waiting = 0

        self._build_state()
        doc = self._store.load()
        if doc is not None:
            try:
                self._restore(doc)
                self._restored = True
            except Exception as exc:
                log.exception("supervisor: unusable persisted state; starting fresh")
                self._restore_error = f"{type(exc).__name__}: {exc}"
                self._build_state()
                self._health = {}
        self._bump()  # a new incarnation is a new version (and persists it)
        with contextlib.suppress(RuntimeError):  # no loop: started on the first call
            self._start_loops()

    # ------------------------------------------------------------ building
    def _build_state(self) -> None:
        self._breakers = BreakerRegistry(
            self._breaker_cfg,
            overrides=self._breaker_overrides,
            keys=self._models,
            listeners=[self._on_breaker],
        )
        self._analytics = ErrorAnalytics()
        self._degradation = self._new_controller()
        self._recovery = self._new_recovery()

    def _new_controller(self) -> DegradationController:
        return DegradationController(self._ladder, self._policy, listeners=[self._on_level])

    def _new_recovery(self) -> RecoveryRegistry:
        recovery = RecoveryRegistry(listeners=[self._on_recovery_run])
        recovery.register(RecoveryEvent.BREAKER_OPENED, "record", _record_only, cooldown_s=0)
        recovery.register(RecoveryEvent.MODEL_UNHEALTHY, "record", _record_only, cooldown_s=0)
        return recovery

    def _restore(self, doc: Mapping[str, Any]) -> None:
        if int(doc.get("format", -1)) != STORE_FORMAT:
            raise ValueError(f"persisted format {doc.get('format')!r} != {STORE_FORMAT}")
        self._breakers.restore(doc.get("breakers") or {})
        self._degradation.restore(doc.get("degradation") or {})
        _restore_analytics(self._analytics, doc.get("analytics") or {})
        for model, entry in (doc.get("health") or {}).items():
            if isinstance(entry, Mapping) and entry.get("health") in HEALTH_VALUES:
                self._health[str(model)] = {
                    "health": str(entry["health"]),
                    "running": int(entry.get("running", 0)),
                    "since": float(entry.get("since", time.time())),
                    "message": str(entry.get("message", "")),
                    "settled": bool(entry.get("settled", False)),
                }
        self._version = max(self._version, int(doc.get("version", 0)))

    def _document(self) -> dict[str, Any]:
        """What is persisted: breaker snapshots (state, since, generation,
        opened_at, open_until, counters, window as of the last change, probe
        permits), the degradation controller (override, automatic level,
        timers, open breakers, its windows as of the last change), the
        incident log (open and closed incidents with their events and
        recovery runs), the last known health, and the version. Not
        persisted: analytics' rolling minute counts (the errors report's
        windows restart empty) and the recent-transition lists of stats()."""
        return {
            "format": STORE_FORMAT,
            "version": self._version,
            "saved_at": time.time(),
            "breakers": self._breakers.snapshot(),
            "degradation": self._degradation.snapshot(),
            "analytics": _export_analytics(self._analytics),
            "health": self._health,
        }

    # ---------------------------------------------------------- internals
    def _start_loops(self) -> None:
        if self._loops:
            return
        loop = asyncio.get_running_loop()
        self._loops.append(loop.create_task(self._tick_loop(), name="supervisor-tick"))
        if self._health_poll_s is not None:
            self._loops.append(loop.create_task(self._health_loop(), name="supervisor-health"))

    def _ensure_started(self) -> None:
        if not self._loops:
            self._start_loops()

    def _bump(self) -> None:
        self._version += 1
        self._dirty = True
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _flush(self) -> None:
        """Persist if anything changed since the last write."""
        if self._dirty and self._store.save(self._document()):
            self._dirty = False

    def _tick(self) -> None:
        self._breakers.tick()  # due OPEN -> HALF_OPEN transitions (listeners bump)
        self._degradation.evaluate()

    def _snapshot(self) -> dict[str, Any]:
        self._breakers.tick()
        breakers = self._breakers.snapshot()["breakers"]
        degradation = self._degradation.status()
        health = {m: dict(h) for m, h in self._health.items()}
        incidents = self._analytics.incidents_summary()
        return {
            "version": self._version,  # read last: the parts are at least this new
            "taken_at": time.time(),
            "breakers": breakers,
            "degradation": degradation,
            "health": health,
            "incidents": incidents,
        }

    def _dispatch(self, event: RecoveryEvent, model: str, detail: Mapping[str, Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._recovery.dispatch(event, model, detail))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # ---------------------------------------------------------- listeners
    def _on_breaker(self, event: BreakerTransition) -> None:
        self._analytics.breaker_transition(event)
        self._degradation.breaker_transition(event)
        self._transitions.append(event.to_dict())
        self._bump()
        if event.to_state is BreakerState.OPEN:
            self._dispatch(
                RecoveryEvent.BREAKER_OPENED,
                event.key,
                {"reason": event.reason, "from": event.from_state.value},
            )

    def _on_level(self, change: LevelChange) -> None:
        self._level_changes.append(change.to_dict())
        self._bump()

    def _on_recovery_run(self, run: RecoveryRun) -> None:
        self._analytics.record_recovery_run(run)
        self._dirty = True

    def _apply_health(
        self,
        model: str,
        health: str,
        running: int,
        message: str,
        settled: bool | None = None,
    ) -> None:
        now = time.time()
        message = _clean_message(message)
        prev = self._health.get(model)
        if settled is None:
            settled = health != "starting" or bool(prev and prev["settled"])
        health_changed = prev is None or prev["health"] != health
        changed = (
            health_changed
            or prev is None
            or prev["running"] != running
            or prev["settled"] != settled
        )
        self._health[model] = {
            "health": health,
            "running": running,
            "since": now if health_changed or prev is None else prev["since"],
            "message": message,
            "settled": settled,
        }
        if health_changed and health in _ANALYTICS_HEALTH:
            self._analytics.model_health(model, health, at_s=now)
            if health == "down":
                self._dispatch(
                    RecoveryEvent.MODEL_UNHEALTHY,
                    model,
                    {"message": message, "from": None if prev is None else prev["health"]},
                )
        if changed:
            self._bump()
        else:
            self._dirty = self._dirty or prev is None or prev["message"] != message

    # -------------------------------------------------------------- loops
    async def _tick_loop(self) -> None:
        while True:
            try:
                self._counters["ticks"] += 1
                self._tick()
                self._flush()
            except Exception:
                self._counters["tick_errors"] += 1
                log.exception("supervisor: tick failed")
            await asyncio.sleep(self._tick_s)

    async def _health_loop(self) -> None:
        assert self._health_poll_s is not None
        while True:
            try:
                await self._poll_health()
            except Exception as exc:
                self._counters["health_poll_errors"] += 1
                self._last_health_error = f"{type(exc).__name__}: {exc}"
                log.warning("supervisor: health poll failed: %s", self._last_health_error)
            await asyncio.sleep(self._health_poll_s)

    async def _poll_health(self) -> None:
        from ray import serve

        assert self._health_poll_s is not None
        status = await asyncio.wait_for(
            asyncio.to_thread(serve.status), timeout=max(5.0, 3 * self._health_poll_s)
        )
        self._counters["health_polls"] += 1
        self._last_health_poll = time.time()
        self._last_health_error = None
        app = status.applications.get(self._app_name)
        for model in self._models:
            prev = self._health.get(model)
            was_settled = bool(prev and prev["settled"])
            if app is None:
                self._apply_health(
                    model,
                    "starting",
                    0,
                    f"application {self._app_name!r} is not deployed",
                    was_settled,
                )
                continue
            dep = app.deployments.get(model)
            if dep is None:
                app_status = str(getattr(app.status, "value", app.status))
                if app_status in ("DEPLOYING", "NOT_STARTED"):
                    self._apply_health(
                        model, "starting", 0, f"application is {app_status}", was_settled
                    )
                else:
                    message = app.message or f"no deployment {model!r} in {self._app_name!r}"
                    self._apply_health(model, "down", 0, message, True)
                continue
            dep_status = str(getattr(dep.status, "value", dep.status))
            states = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
            health, settled, running = derive_health(dep_status, states, was_settled=was_settled)
            self._apply_health(model, health, running, dep.message or dep_status, settled)
        self._flush()

    # ---------------------------------------------------------- methods
    async def ping(self) -> float:
        """The actor's wall clock (liveness)."""
        self._ensure_started()
        return time.time()

    async def report(
        self, outcomes: Iterable[Mapping[str, Any]], requests: Iterable[Mapping[str, Any]] = ()
    ) -> int:
        """Apply a batch; returns the snapshot version after it.

        ``outcomes``: ``Outcome.to_dict()`` items (breaker outcomes, with the
        permit that admitted the call); each is also an analytics attempt,
        and may carry optional ``workflow`` and ``shape`` (a ``"WxH"``
        string or a parameter dict) for the report's breakdown and hints.
        ``requests``: ``{"workflow", "final_kind" (None = served), "model",
        "errors" (failed attempts on the way), "latency_s", "shape"}``: the
        analytics request record and the degradation controller's input.
        A malformed item is skipped and counted (``stats()``), never fatal.
        """
        self._ensure_started()
        self._counters["report_calls"] += 1
        for item in outcomes:
            self._counters["outcomes_received"] += 1
            try:
                out = Outcome.from_dict(item)
                self._breakers.get(out.key).record_outcome(out)
                self._analytics.record_attempt(
                    out.key,
                    out.kind,
                    workflow=item.get("workflow"),
                    elapsed_s=out.duration_s,
                    shape=_shape(item.get("shape")),
                )
            except Exception:
                self._counters["outcomes_rejected"] += 1
                log.warning("supervisor: rejected outcome %r", item, exc_info=True)
        for req in requests:
            self._counters["requests_received"] += 1
            try:
                kind = req.get("final_kind")
                kind = None if kind is None else str(kind)
                self._analytics.record_request(
                    str(req["workflow"]),
                    kind,
                    model=None if req.get("model") is None else str(req["model"]),
                    errors=int(req.get("errors") or 0),
                )
                latency = req.get("latency_s")
                self._degradation.record(kind, None if latency is None else float(latency))
            except Exception:
                self._counters["requests_rejected"] += 1
                log.warning("supervisor: rejected request record %r", req, exc_info=True)
        self._flush()  # only writes if a breaker moved
        return self._version

    async def snapshot(self, since_version: int = -1, timeout_s: float = 2.0) -> dict[str, Any]:
        """The published state; a long-poll when ``since_version`` is current.

        Returns at once when the version differs from ``since_version``
        (newer, or older after a lost store); otherwise waits until it moves
        or ``timeout_s`` passes (capped at 60 s) and returns the state then.
        """
        self._ensure_started()
        self._counters["snapshot_calls"] += 1
        self._breakers.tick()
        if self._version == since_version:
            event = self._changed
            self._waiting += 1
            try:
                async with asyncio.timeout(max(0.0, min(float(timeout_s), _MAX_LONG_POLL_S))):
                    await event.wait()
                self._counters["long_polls_woken"] += 1
            except TimeoutError:
                self._counters["long_polls_timed_out"] += 1
            finally:
                self._waiting -= 1
        return self._snapshot()

    async def try_acquire(self, model: str) -> dict[str, Any] | None:
        """A permit for one call to ``model`` (``Permit.to_dict()``), or None.

        In HALF_OPEN this is a probe permit, granted at most
        ``half_open_permits`` times cluster-wide per half-open period; in
        CLOSED an ordinary (generation-stamped) permit; OPEN: None.
        """
        self._ensure_started()
        self._counters["try_acquire_calls"] += 1
        permit = self._breakers.try_acquire(str(model))
        if permit is None:
            self._flush()
            return None
        if permit.probe:
            self._counters["probe_permits_granted"] += 1
            self._dirty = True
        self._flush()
        return permit.to_dict()

    def _check_model(self, model: str) -> str:
        key = str(model)
        if self._models and key not in self._models and key not in self._breakers:
            raise ValueError(f"unknown model {key!r}; known: {', '.join(self._models)}")
        return key

    async def reset_breaker(self, model: str) -> dict[str, Any]:
        """Close ``model``'s breaker (admin); returns the snapshot.

        Raises ValueError for a model that is neither configured nor known."""
        self._ensure_started()
        key = self._check_model(model)
        self._breakers.reset(key, "admin reset")
        self._bump()
        self._flush()
        return self._snapshot()

    async def set_degradation(self, level: int | None) -> dict[str, Any]:
        """Pin the level (clamped to the ladder), or None for auto; ``{"level", "mode"}``."""
        self._ensure_started()
        if level is not None and (isinstance(level, bool) or int(level) < 0):
            raise ValueError(f"degradation level must be >= 0 or None, got {level!r}")
        self._degradation.set_override(None if level is None else int(level), "admin override")
        self._bump()
        self._flush()
        return self._degradation.status()

    async def reset_all(self) -> dict[str, Any]:
        """Tests: close every breaker, clear analytics and incidents, level auto at 0.

        Health is kept (it is a fact polled from Serve) and fed to the new
        analytics, so a model still ``down`` opens a new incident."""
        self._ensure_started()
        for task in list(self._pending):
            task.cancel()
        for key in self._breakers.keys():
            self._breakers.reset(key, "reset_all")
        self._analytics = ErrorAnalytics()
        self._degradation = self._new_controller()
        self._recovery = self._new_recovery()
        self._transitions.clear()
        self._level_changes.clear()
        for model, entry in self._health.items():
            if entry["health"] in _ANALYTICS_HEALTH:
                self._analytics.model_health(model, entry["health"])
        self._bump()
        self._flush()
        return self._snapshot()

    async def errors_report(self) -> dict[str, Any]:
        """``ErrorAnalytics.report()``: the ``GET /v1/errors/report`` body."""
        self._ensure_started()
        return self._analytics.report()

    async def set_health(
        self,
        model: str,
        health: str,
        running: int = 0,
        message: str = "",
        settled: bool | None = None,
    ) -> None:
        """Health pushed by whoever polls it (``healthy|degraded|down|starting``).

        ``settled`` defaults to True unless ``starting`` (then it keeps the
        previous value). ``down`` opens an incident and dispatches
        MODEL_UNHEALTHY; ``healthy`` with a CLOSED breaker closes it."""
        self._ensure_started()
        if health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {', '.join(HEALTH_VALUES)}, got {health!r}")
        self._apply_health(str(model), health, int(running), str(message), settled)
        self._flush()

    async def stats(self) -> dict[str, Any]:
        """Counters and internals for tests and ``/v1/status`` diagnostics."""
        self._ensure_started()
        return {
            **self._counters,
            "version": self._version,
            "persisted_writes": self._store.writes,
            "persist_errors": self._store.errors,
            "persist_last_error": self._store.last_error,
            "store_key": self._store.key,
            "restored_from_store": self._restored,
            "restore_error": self._restore_error,
            "started_at": self._started_at,
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "long_polls_waiting": self._waiting,
            "last_health_poll": self._last_health_poll,
            "last_health_error": self._last_health_error,
            "recovery": self._recovery.stats(),
            "recovery_runs": [r.to_dict() for r in self._recovery.runs(20)],
            "recent_transitions": list(self._transitions),
            "recent_level_changes": list(self._level_changes),
            "breaker_metrics": {k: self._breakers.get(k).metrics() for k in self._breakers},
        }
