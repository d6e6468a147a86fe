"""Per-key circuit breakers: pybreaker's state machine, moved by genguard's windows.

The state machine (CLOSED, OPEN, HALF_OPEN; its transitions and listeners)
is a :class:`pybreaker.CircuitBreaker`. Beside it sit what resilience4j users
rely on, and they move it through ``open()`` / ``half_open()`` / ``close()``:

- a sliding window, count-based (last ``window_size_calls`` calls) or
  time-based (last ``window_s`` seconds), tripping when the failure rate
  reaches ``failure_rate_threshold`` once ``minimum_calls`` are in it;
- slow calls (``duration_s >= slow_call_duration_s``) tripping at
  ``slow_call_rate_threshold``;
- pybreaker's own consecutive-failure counter (``fail_max``);
- ``wait_in_open_s``, after which OPEN turns HALF_OPEN by itself (on the next
  read of the state, on :meth:`CircuitBreaker.tick`, or on a permit request);
- ``half_open_permits`` probe calls in HALF_OPEN, granted as :class:`Permit`
  objects; all must succeed (and not be slow) to close; any failed probe
  re-opens. Leaked probe permits expire after ``permit_ttl_s``.

pybreaker's ``call_async`` is Tornado-only, so genguard drives the machine
itself: :meth:`CircuitBreaker.call` wraps an awaited call, and the
``record_*`` methods record outcomes after the fact (what a router reports).
Outcomes whose error has ``counts_as_failure == False`` (caller errors,
backpressure, cancellation) never move a breaker. Every transition is a
:class:`BreakerTransition` (key, from, to, time, reason) sent to listeners.
:meth:`CircuitBreaker.snapshot` / :meth:`CircuitBreaker.restore` export the
whole state as a JSON-able dict, so another process (the supervisor actor)
can hold it; :class:`SnapshotGate` is the router-side view of such snapshots.

Timestamps are on the injected ``clock`` (default ``time.time``: snapshots
travel between processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import pybreaker

from ._util import Clock, RollingCounts, build_policy, require
from .errors import CircuitOpen, GenGuardError, counts_as_failure

__all__ = [
    "BreakerConfig",
    "BreakerGate",
    "BreakerRegistry",
    "BreakerState",
    "BreakerTransition",
    "CircuitBreaker",
    "Outcome",
    "Permit",
    "SnapshotGate",
    "TransitionListener",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class BreakerState(StrEnum):
    """Breaker state; the value is the API.md spelling."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_FROM_PB = {
    pybreaker.STATE_CLOSED: BreakerState.CLOSED,
    pybreaker.STATE_OPEN: BreakerState.OPEN,
    pybreaker.STATE_HALF_OPEN: BreakerState.HALF_OPEN,
}


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """Policy of one breaker (rates are fractions 0..1).

    - ``fail_max``: consecutive failures that open it (pybreaker's counter;
      None disables this rule).
    - ``sliding_window``: ``"count"`` (last ``window_size_calls`` calls) or
      ``"time"`` (last ``window_s`` seconds).
    - ``failure_rate_threshold`` / ``slow_call_rate_threshold``: trip rates,
      evaluated once ``minimum_calls`` calls are in the window.
    - ``slow_call_duration_s``: a call at least this long is slow (None: off).
    - ``wait_in_open_s``: OPEN lasts this long, then HALF_OPEN.
    - ``half_open_permits``: probe calls allowed in HALF_OPEN; that many
      successes close it.
    - ``permit_ttl_s``: an outstanding probe permit expires after this long.
    """

    fail_max: int | None = 5
    sliding_window: Literal["count", "time"] = "count"
    window_size_calls: int = 100
    window_s: float = 60.0
    failure_rate_threshold: float = 0.5
    minimum_calls: int = 10
    slow_call_duration_s: float | None = 60.0
    slow_call_rate_threshold: float = 1.0
    wait_in_open_s: float = 30.0
    half_open_permits: int = 1
    permit_ttl_s: float = 120.0

    def __post_init__(self) -> None:
        require(self.fail_max is None or self.fail_max >= 1, "fail_max", "must be >= 1 or null")
        require(
            self.sliding_window in ("count", "time"),
            "sliding_window",
            "must be 'count' or 'time'",
        )
        require(self.window_size_calls >= 1, "window_size_calls", "must be >= 1")
        require(self.window_s > 0, "window_s", "must be > 0")
        require(
            0.0 < self.failure_rate_threshold <= 1.0,
            "failure_rate_threshold",
            "must be within (0, 1]",
        )
        require(self.minimum_calls >= 1, "minimum_calls", "must be >= 1")
        if self.sliding_window == "count":
            require(
                self.minimum_calls <= self.window_size_calls,
                "minimum_calls",
                "must not exceed window_size_calls (the window could never trip)",
            )
        require(
            self.slow_call_duration_s is None or self.slow_call_duration_s > 0,
            "slow_call_duration_s",
            "must be > 0 or null",
        )
        require(
            0.0 < self.slow_call_rate_threshold <= 1.0,
            "slow_call_rate_threshold",
            "must be within (0, 1]",
        )
        require(self.wait_in_open_s >= 0, "wait_in_open_s", "must be >= 0")
        require(self.half_open_permits >= 1, "half_open_permits", "must be >= 1")
        require(self.permit_ttl_s > 0, "permit_ttl_s", "must be > 0")

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | object | None, path: str = "breaker"
    ) -> BreakerConfig:
        """Build from a config mapping; errors name ``path.key``."""
        return build_policy(cls, data, path)


@dataclass(frozen=True, slots=True)
class Permit:
    """Admission to one call. ``probe`` permits (HALF_OPEN) are counted.

    ``generation`` identifies the breaker state that granted it: an outcome
    reported with a permit from an earlier state never moves the breaker.
    Picklable and dict-convertible, so a supervisor can grant it to a router.
    """

    key: str
    generation: int
    token: int = 0
    probe: bool = False
    granted_at_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "key": self.key,
            "generation": self.generation,
            "token": self.token,
            "probe": self.probe,
            "granted_at_s": self.granted_at_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Permit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            key=str(data["key"]),
            generation=int(data["generation"]),
            token=int(data.get("token", 0)),
            probe=bool(data.get("probe", False)),
            granted_at_s=float(data.get("granted_at_s", 0.0)),
        )


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change of breaker ``key``."""

    key: str
    from_state: BreakerState
    to_state: BreakerState
    at_s: float
    reason: str
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (``from`` / ``to`` keys)."""
        return {
            "key": self.key,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "at": self.at_s,
            "reason": self.reason,
            "generation": self.generation,
        }


TransitionListener = Callable[[BreakerTransition], None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """An outcome reported after the fact (``kind`` None = success).

    Routers batch these and the supervisor applies them with
    :meth:`BreakerRegistry.record_outcomes`.
    """

    key: str
    kind: str | None = None
    duration_s: float = 0.0
    permit: Permit | None = None
    at_s: float | None = None
    failure: bool | None = None

    @property
    def counts_as_failure(self) -> bool:
        """``failure`` if given, else derived from ``kind``."""
        if self.failure is not None:
            return self.failure
        return counts_as_failure(self.kind)

    @classmethod
    def of(
        cls,
        key: str,
        error: BaseException | str | None,
        duration_s: float,
        *,
        permit: Permit | None = None,
        at_s: float | None = None,
    ) -> Outcome:
        """Build from an exception (or kind string, or None for success).

        An untranslated foreign exception gets kind ``internal`` but still
        counts as a failure (as it would for the local breaker)."""
        if error is None or isinstance(error, str):
            kind = error
        elif isinstance(error, GenGuardError):
            kind = error.kind
        elif isinstance(error, asyncio.CancelledError):
            kind = "cancelled"
        else:
            kind = "internal"
        return cls(key, kind, duration_s, permit, at_s, counts_as_failure(error))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "key": self.key,
            "kind": self.kind,
            "duration_s": self.duration_s,
            "permit": None if self.permit is None else self.permit.to_dict(),
            "at_s": self.at_s,
            "failure": self.counts_as_failure,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Outcome:
        """Inverse of :meth:`to_dict`."""
        permit = data.get("permit")
        return cls(
            key=str(data["key"]),
            kind=data.get("kind"),
            duration_s=float(data.get("duration_s", 0.0)),
            permit=None if permit is None else Permit.from_dict(permit),
            at_s=data.get("at_s"),
            failure=data.get("failure"),
        )


@runtime_checkable
class BreakerGate(Protocol):
    """What a fallback chain needs from breakers (local registry or router view)."""

    def allows(self, key: str) -> bool:
        """Would a call to ``key`` be admitted now (without taking a permit)?"""
        ...

    async def acquire(self, key: str) -> Permit | None:
        """A permit for one call to ``key``, or None to skip the step."""
        ...

    def complete(self, permit: Permit, error: BaseException | None, duration_s: float) -> None:
        """Report the outcome of a permitted call (``error`` None = success)."""
        ...


class _RecordedFailure(Exception):
    """Raised inside pybreaker's ``call`` to feed it a recorded failure."""


def _raise_recorded() -> None:
    raise _RecordedFailure


def _noop() -> None:
    return None


class _PbListener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: CircuitBreaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = None if old_state is None else _FROM_PB[old_state.name]
        self._owner._on_pb_transition(old, _FROM_PB[new_state.name])


class _CountWindow:
    """The last ``size`` calls: a ring of outcome codes with running sums."""

    __slots__ = ("_codes", "_i", "calls", "failures", "size", "slow")

    def __init__(self, size: int) -> None:
        self.size = size
        self._codes: list[int] = []
        self._i = 0
        self.calls = self.failures = self.slow = 0

    def add(self, failure: bool, slow: bool) -> None:
        code = int(failure) | (int(slow) << 1)
        if len(self._codes) < self.size:
            self._codes.append(code)
            self.calls += 1
        else:
            old = self._codes[self._i]
            self.failures -= old & 1
            self.slow -= old >> 1
            self._codes[self._i] = code
            self._i = (self._i + 1) % self.size
        self.failures += code & 1
        self.slow += code >> 1

    def totals(self) -> tuple[int, int, int]:
        return self.calls, self.failures, self.slow

    def clear(self) -> None:
        self._codes = []
        self._i = 0
        self.calls = self.failures = self.slow = 0

    def to_dict(self) -> dict[str, Any]:
        ordered = self._codes[self._i :] + self._codes[: self._i]
        return {"codes": ordered}

    def load(self, data: Mapping[str, Any]) -> None:
        self.clear()
        for code in list(data.get("codes", []))[-self.size :]:
            self.add(bool(int(code) & 1), bool(int(code) >> 1))


class _TimeWindow:
    """Calls in the last ``window_s`` seconds, in per-second-ish buckets."""

    __slots__ = ("_rc",)

    def __init__(self, window_s: float, clock: Clock) -> None:
        n = max(1, min(60, math.ceil(window_s)))
        self._rc = RollingCounts(window_s, 3, clock, n_buckets=n)

    def add(self, failure: bool, slow: bool) -> None:
        self._rc.add(0)
        if failure:
            self._rc.add(1)
        if slow:
            self._rc.add(2)

    def totals(self) -> tuple[int, int, int]:
        calls, failures, slow = self._rc.totals()
        return calls, failures, slow

    def clear(self) -> None:
        self._rc.clear()

    def to_dict(self) -> dict[str, Any]:
        return self._rc.to_dict()

    def load(self, data: Mapping[str, Any]) -> None:
        self._rc.load(data)


_STAT_NAMES = (
    "successes",
    "failures",
    "slow_calls",
    "ignored",
    "not_permitted",
    "stale",
    "late",
    "expired_permits",
)


class CircuitBreaker:
    """One breaker for one key (a model): pybreaker's machine plus genguard's windows."""

    def __init__(
        self,
        key: str,
        config: BreakerConfig | Mapping[str, Any] | object | None = None,
        *,
        clock: Clock = time.time,
        listeners: Iterable[TransitionListener] = (),
    ) -> None:
        self.key = key
        self.config = (
            BreakerConfig.from_mapping(config) if not isinstance(config, BreakerConfig) else config
        )
        self._clock = clock
        self._lock = threading.RLock()
        self._listeners: list[TransitionListener] = list(listeners)
        cfg = self.config
        self._storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._pb = pybreaker.CircuitBreaker(
            fail_max=cfg.fail_max if cfg.fail_max is not None else 2**62,
            # genguard times OPEN -> HALF_OPEN on its own clock; pybreaker's
            # wall-clock timer must never fire, so its timeout is effectively infinite.
            reset_timeout=10**9,
            success_threshold=cfg.half_open_permits,
            state_storage=self._storage,
            name=key,
            throw_new_error_on_trip=False,
            listeners=[_PbListener(self)],
        )
        self._window: _CountWindow | _TimeWindow = (
            _CountWindow(cfg.window_size_calls)
            if cfg.sliding_window == "count"
            else _TimeWindow(cfg.window_s, clock)
        )
        now = clock()
        self._since = now
        self._opened_at: float | None = None
        self._open_until: float | None = None
        self._generation = 0
        self._probes: dict[int, float] = {}
        self._probes_granted = 0
        self._next_token = 1
        self._reason = ""
        self._quiet = False
        self._stats = dict.fromkeys(_STAT_NAMES, 0)

    # ----------------------------------------------------------- inspection
    @property
    def pybreaker(self) -> pybreaker.CircuitBreaker:
        """The underlying pybreaker state machine (add pybreaker listeners here)."""
        return self._pb

    @property
    def state(self) -> BreakerState:
        """Current state (performs a due OPEN -> HALF_OPEN transition first)."""
        with self._lock:
            self._advance()
            return _FROM_PB[self._pb.current_state]

    @property
    def generation(self) -> int:
        """Increments on every transition; stamps permits."""
        return self._generation

    @property
    def since_s(self) -> float:
        """When the current state was entered."""
        return self._since

    @property
    def open_until_s(self) -> float | None:
        """When an OPEN breaker turns HALF_OPEN (None unless OPEN)."""
        return self._open_until

    def retry_after_s(self) -> float | None:
        """Seconds until an OPEN breaker admits probes (None if not OPEN)."""
        with self._lock:
            if self.state is not BreakerState.OPEN or self._open_until is None:
                return None
            return max(0.0, self._open_until - self._clock())

    def metrics(self) -> dict[str, Any]:
        """Window totals, rates and lifetime counters (JSON-able)."""
        with self._lock:
            calls, failures, slow = self._window.totals()
            return {
                "state": self.state.value,
                "window_calls": calls,
                "failure_rate": failures / calls if calls else 0.0,
                "slow_call_rate": slow / calls if calls else 0.0,
                "consecutive_failures": self._pb.fail_counter,
                "probes_outstanding": len(self._probes),
                **self._stats,
            }

    # ------------------------------------------------------------ listeners
    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(BreakerTransition)`` on every transition."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TransitionListener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _on_pb_transition(self, old: BreakerState | None, new: BreakerState) -> None:
        now = self._clock()
        self._generation += 1
        self._since = now
        self._probes.clear()
        self._probes_granted = 0
        if new is BreakerState.OPEN:
            self._opened_at = now
            self._open_until = now + self.config.wait_in_open_s
            self._window.clear()
        elif new is BreakerState.CLOSED:
            self._opened_at = None
            self._open_until = None
            self._window.clear()
        else:
            self._open_until = None
        reason, self._reason = self._reason or "state change", ""
        if self._quiet or old is None or old is new:
            return
        event = BreakerTransition(self.key, old, new, now, reason, self._generation)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("breaker %s: transition listener failed", self.key)

    # ---------------------------------------------------------- transitions
    def _advance(self) -> None:
        pb_state = self._pb.current_state
        if pb_state == pybreaker.STATE_OPEN:
            if self._open_until is not None and self._clock() >= self._open_until:
                self._reason = f"wait_in_open_s={self.config.wait_in_open_s:g} elapsed"
                self._pb.half_open()
        elif pb_state == pybreaker.STATE_HALF_OPEN and self._probes:
            now = self._clock()
            ttl = self.config.permit_ttl_s
            for token, granted in list(self._probes.items()):
                if now - granted >= ttl:
                    del self._probes[token]
                    self._probes_granted -= 1
                    self._stats["expired_permits"] += 1

    def tick(self) -> BreakerState:
        """Perform any time-driven transition now; returns the state."""
        return self.state

    def force_open(self, reason: str = "forced open") -> None:
        """Open now (restarts the wait if already OPEN)."""
        with self._lock:
            if self.state is BreakerState.OPEN:
                self._open_until = self._clock() + self.config.wait_in_open_s
                return
            self._reason = reason
            self._pb.open()

    def half_open(self, reason: str = "forced half-open") -> None:
        """Move to HALF_OPEN now."""
        with self._lock:
            if self.state is not BreakerState.HALF_OPEN:
                self._reason = reason
                self._pb.half_open()

    def reset(self, reason: str = "reset") -> None:
        """Close now and clear the window (admin reset)."""
        with self._lock:
            if self.state is not BreakerState.CLOSED:
                self._reason = reason
                self._pb.close()
            self._window.clear()
            self._storage.reset_counter()

    # -------------------------------------------------------------- permits
    def allows(self) -> bool:
        """Would a call be admitted now? (Does not take a permit.)"""
        with self._lock:
            st = self.state
            if st is BreakerState.CLOSED:
                return True
            if st is BreakerState.OPEN:
                return False
            return self._probes_granted < self.config.half_open_permits

    def try_acquire(self) -> Permit | None:
        """A permit for one call, or None (OPEN, or no HALF_OPEN permit left)."""
        with self._lock:
            st = self.state
            now = self._clock()
            if st is BreakerState.CLOSED:
                return Permit(self.key, self._generation, 0, False, now)
            if (
                st is BreakerState.HALF_OPEN
                and self._probes_granted < self.config.half_open_permits
            ):
                token = self._next_token
                self._next_token += 1
                self._probes[token] = now
                self._probes_granted += 1
                return Permit(self.key, self._generation, token, True, now)
            self._stats["not_permitted"] += 1
            return None

    async def acquire(self) -> Permit | None:
        """Async form of :meth:`try_acquire` (the :class:`BreakerGate` shape)."""
        return self.try_acquire()

    def release(self, permit: Permit) -> None:
        """Hand back an unused permit (the call was not made or not counted)."""
        with self._lock:
            if permit.probe and permit.generation == self._generation:
                if self._probes.pop(permit.token, None) is not None:
                    self._probes_granted -= 1

    # ------------------------------------------------------------- outcomes
    def record(
        self,
        error: BaseException | str | None,
        duration_s: float = 0.0,
        *,
        permit: Permit | None = None,
    ) -> None:
        """Record one outcome: ``error`` None = success; an exception or an
        error kind string otherwise (classified by ``counts_as_failure``).

        With a ``permit``, the outcome only counts if the permit was granted
        by the current state (its ``generation``). Without one, it applies to
        the current state: in CLOSED it enters the window, in HALF_OPEN it is
        taken as a probe result, in OPEN it is dropped."""
        if error is None:
            self._record(False, False, "success", duration_s, permit)
        elif counts_as_failure(error):
            kind = error if isinstance(error, str) else getattr(error, "kind", type(error).__name__)
            self._record(True, False, str(kind), duration_s, permit)
        else:
            self._record(False, True, "ignored", duration_s, permit)

    def record_success(self, duration_s: float = 0.0, *, permit: Permit | None = None) -> None:
        """Record a successful call that took ``duration_s``."""
        self._record(False, False, "success", duration_s, permit)

    def record_failure(
        self,
        error: BaseException | str | None = None,
        duration_s: float = 0.0,
        *,
        permit: Permit | None = None,
    ) -> None:
        """Record a failed call. An ``error`` with ``counts_as_failure`` False
        only releases the permit; ``None`` is a generic failure."""
        if error is None:
            self._record(True, False, "failure", duration_s, permit)
        else:
            self.record(error, duration_s, permit=permit)

    def complete(self, permit: Permit, error: BaseException | None, duration_s: float) -> None:
        """:class:`BreakerGate` form of :meth:`record`."""
        self.record(error, duration_s, permit=permit)

    def record_outcome(self, outcome: Outcome) -> None:
        """Apply one reported :class:`Outcome` for this key."""
        if outcome.kind is None:
            self._record(False, False, "success", outcome.duration_s, outcome.permit)
        elif outcome.counts_as_failure:
            self._record(True, False, outcome.kind, outcome.duration_s, outcome.permit)
        else:
            self._record(False, True, outcome.kind, outcome.duration_s, outcome.permit)

    def _record(
        self,
        failure: bool,
        ignored: bool,
        kind: str,
        duration_s: float,
        permit: Permit | None,
    ) -> None:
        with self._lock:
            self._advance()
            if permit is not None:
                if permit.key != self.key:
                    raise ValueError(f"permit for {permit.key!r} used on breaker {self.key!r}")
                if permit.generation != self._generation:
                    self._stats["stale"] += 1
                    return
                if permit.probe:
                    if self._probes.pop(permit.token, None) is None:
                        self._stats["stale"] += 1
                        return
                    if ignored:
                        self._probes_granted -= 1
            if ignored:
                self._stats["ignored"] += 1
                return
            slow_s = self.config.slow_call_duration_s
            slow = slow_s is not None and duration_s >= slow_s
            self._stats["failures" if failure else "successes"] += 1
            if slow:
                self._stats["slow_calls"] += 1
            state = _FROM_PB[self._pb.current_state]
            if state is BreakerState.OPEN:
                self._stats["late"] += 1
                return
            if state is BreakerState.HALF_OPEN:
                if failure:
                    self._reason = f"half-open probe failed ({kind})"
                    self._feed_failure()
                elif slow:
                    self._reason = f"half-open probe slow ({duration_s:.3g}s >= {slow_s:g}s)"
                    self._feed_failure()
                else:
                    self._reason = f"{self.config.half_open_permits} half-open probe(s) succeeded"
                    self._feed_success()
                return
            self._window.add(failure, slow)
            if failure:
                self._reason = (
                    f"{self.config.fail_max} consecutive failures (fail_max), last {kind}"
                )
                self._feed_failure()
            else:
                self._feed_success()
            if _FROM_PB[self._pb.current_state] is BreakerState.CLOSED:
                self._check_rates()

    def _feed_failure(self) -> None:
        try:
            self._pb.call(_raise_recorded)
        except (_RecordedFailure, pybreaker.CircuitBreakerError):
            pass

    def _feed_success(self) -> None:
        with contextlib.suppress(pybreaker.CircuitBreakerError):
            self._pb.call(_noop)

    def _check_rates(self) -> None:
        cfg = self.config
        calls, failures, slow = self._window.totals()
        if calls < cfg.minimum_calls:
            return
        rate = failures / calls
        if rate >= cfg.failure_rate_threshold:
            self._reason = (
                f"failure rate {rate:.0%} >= {cfg.failure_rate_threshold:.0%} over {calls} calls"
            )
            self._pb.open()
            return
        if cfg.slow_call_duration_s is not None:
            srate = slow / calls
            if srate >= cfg.slow_call_rate_threshold:
                self._reason = (
                    f"slow-call rate {srate:.0%} >= {cfg.slow_call_rate_threshold:.0%} "
                    f"(>= {cfg.slow_call_duration_s:g}s) over {calls} calls"
                )
                self._pb.open()

    # --------------------------------------------------------- wrapped call
    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn(*args, **kwargs)`` through the breaker.

        Raises :class:`CircuitOpen` without calling ``fn`` when not admitted;
        records the outcome (and its duration) otherwise. Cancellation only
        releases the permit.
        """
        permit = self.try_acquire()
        if permit is None:
            raise CircuitOpen(
                f"breaker for {self.key} is {self.state.value}",
                model=self.key,
                retry_after_s=self.retry_after_s(),
            )
        start = self._clock()
        try:
            result = await fn(*args, **kwargs)
        except asyncio.CancelledError:
            self.release(permit)
            raise
        except BaseException as exc:
            self.record(exc, self._clock() - start, permit=permit)
            raise
        self.record(None, self._clock() - start, permit=permit)
        return result

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> dict[str, Any]:
        """The whole state as a JSON-able dict (see :meth:`restore`)."""
        with self._lock:
            st = self.state
            return {
                "key": self.key,
                "state": st.value,
                "since": self._since,
                "generation": self._generation,
                "opened_at": self._opened_at,
                "open_until": self._open_until,
                "consecutive_failures": self._pb.fail_counter,
                "half_open": {
                    "permits": self.config.half_open_permits,
                    "granted": self._probes_granted,
                    "successes": self._pb.success_counter,
                    "probes": {str(k): v for k, v in self._probes.items()},
                    "next_token": self._next_token,
                },
                "window": {"type": self.config.sliding_window, **self._window.to_dict()},
                "stats": dict(self._stats),
                "config": asdict(self.config),
                "taken_at": self._clock(),
            }

    def restore(self, snap: Mapping[str, Any]) -> None:
        """Load :meth:`snapshot` output; emits no transition events."""
        state = BreakerState(snap["state"])
        with self._lock:
            self._quiet = True
            try:
                if state is BreakerState.OPEN:
                    self._pb.open()
                elif state is BreakerState.HALF_OPEN:
                    self._pb.half_open()
                else:
                    self._pb.close()
            finally:
                self._quiet = False
            self._storage.reset_counter()
            for _ in range(min(int(snap.get("consecutive_failures", 0)), 10_000)):
                self._storage.increment_counter()
            half = snap.get("half_open") or {}
            self._storage.reset_success_counter()
            for _ in range(min(int(half.get("successes", 0)), 10_000)):
                self._storage.increment_success_counter()
            self._since = float(snap.get("since", self._clock()))
            self._generation = int(snap.get("generation", 0))
            opened = snap.get("opened_at")
            until = snap.get("open_until")
            self._opened_at = None if opened is None else float(opened)
            self._open_until = None if until is None else float(until)
            if state is BreakerState.OPEN and self._open_until is None:
                self._open_until = self._clock() + self.config.wait_in_open_s
            self._probes = {int(k): float(v) for k, v in (half.get("probes") or {}).items()}
            self._probes_granted = int(half.get("granted", len(self._probes)))
            self._next_token = max(int(half.get("next_token", 1)), 1 + max(self._probes, default=0))
            window = snap.get("window") or {}
            if window.get("type", self.config.sliding_window) == self.config.sliding_window:
                self._window.load(window)
            stats = snap.get("stats") or {}
            for name in _STAT_NAMES:
                self._stats[name] = int(stats.get(name, 0))

    @classmethod
    def from_snapshot(
        cls,
        snap: Mapping[str, Any],
        config: BreakerConfig | Mapping[str, Any] | object | None = None,
        *,
        clock: Clock = time.time,
    ) -> CircuitBreaker:
        """A new breaker holding ``snap`` (config from ``snap`` unless given)."""
        cfg = config if config is not None else snap.get("config")
        breaker = cls(str(snap["key"]), cfg, clock=clock)
        breaker.restore(snap)
        return breaker


class BreakerRegistry:
    """One :class:`CircuitBreaker` per key, created on first use.

    Implements :class:`BreakerGate`. ``overrides`` give per-key configs.
    Registry listeners see every breaker's transitions, including breakers
    created later.
    """

    def __init__(
        self,
        config: BreakerConfig | Mapping[str, Any] | object | None = None,
        *,
        overrides: Mapping[str, BreakerConfig | Mapping[str, Any]] | None = None,
        keys: Iterable[str] = (),
        clock: Clock = time.time,
        listeners: Iterable[TransitionListener] = (),
    ) -> None:
        self.config = (
            config if isinstance(config, BreakerConfig) else BreakerConfig.from_mapping(config)
        )
        self._overrides = {
            k: v if isinstance(v, BreakerConfig) else BreakerConfig.from_mapping(v, f"breaker.{k}")
            for k, v in (overrides or {}).items()
        }
        self._clock = clock
        self._listeners: list[TransitionListener] = list(listeners)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.RLock()
        for key in keys:
            self.get(key)

    def _emit(self, event: BreakerTransition) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("breaker registry: transition listener failed")

    def get(self, key: str) -> CircuitBreaker:
        """The breaker for ``key`` (created with its config if new)."""
        breaker = self._breakers.get(key)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.get(key)
                if breaker is None:
                    breaker = CircuitBreaker(
                        key,
                        self._overrides.get(key, self.config),
                        clock=self._clock,
                        listeners=[self._emit],
                    )
                    self._breakers[key] = breaker
        return breaker

    __getitem__ = get

    def __contains__(self, key: object) -> bool:
        return key in self._breakers

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._breakers))

    def __len__(self) -> int:
        return len(self._breakers)

    def keys(self) -> list[str]:
        """Keys with a breaker."""
        return list(self._breakers)

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(BreakerTransition)`` on every breaker's transitions."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TransitionListener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def state(self, key: str) -> BreakerState:
        """State of ``key``'s breaker."""
        return self.get(key).state

    def states(self) -> dict[str, str]:
        """``{key: state}`` for every breaker."""
        return {k: b.state.value for k, b in list(self._breakers.items())}

    def status(self) -> dict[str, dict[str, Any]]:
        """``{key: {"state", "since"}}`` as in API.md ``GET /v1/status``."""
        return {
            k: {"state": b.state.value, "since": b.since_s} for k, b in list(self._breakers.items())
        }

    def allows(self, key: str) -> bool:
        """Would ``key`` admit a call now?"""
        return self.get(key).allows()

    def retry_after_s(self, key: str) -> float | None:
        """Seconds until ``key``'s OPEN breaker admits probes (None if not OPEN)."""
        return self.get(key).retry_after_s()

    def try_acquire(self, key: str) -> Permit | None:
        """A permit for ``key``, or None."""
        return self.get(key).try_acquire()

    async def acquire(self, key: str) -> Permit | None:
        """:class:`BreakerGate`: a permit for ``key``, or None."""
        return self.get(key).try_acquire()

    def release(self, permit: Permit) -> None:
        """Hand back an unused permit."""
        self.get(permit.key).release(permit)

    def complete(self, permit: Permit, error: BaseException | None, duration_s: float) -> None:
        """:class:`BreakerGate`: the outcome of a permitted call."""
        self.get(permit.key).record(error, duration_s, permit=permit)

    def record(
        self,
        key: str,
        error: BaseException | str | None,
        duration_s: float = 0.0,
        *,
        permit: Permit | None = None,
    ) -> None:
        """Record an outcome after the fact (``error`` None = success)."""
        self.get(key).record(error, duration_s, permit=permit)

    def record_success(
        self, key: str, duration_s: float = 0.0, *, permit: Permit | None = None
    ) -> None:
        """Record a success for ``key``."""
        self.get(key).record_success(duration_s, permit=permit)

    def record_failure(
        self,
        key: str,
        error: BaseException | str | None = None,
        duration_s: float = 0.0,
        *,
        permit: Permit | None = None,
    ) -> None:
        """Record a failure for ``key`` (non-failure errors are ignored)."""
        self.get(key).record_failure(error, duration_s, permit=permit)

    def record_outcomes(self, outcomes: Iterable[Outcome | Mapping[str, Any]]) -> int:
        """Apply a batch of reported outcomes; returns how many were applied."""
        n = 0
        for item in outcomes:
            out = item if isinstance(item, Outcome) else Outcome.from_dict(item)
            self.get(out.key).record_outcome(out)
            n += 1
        return n

    async def call(self, key: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Await ``fn`` through ``key``'s breaker (see :meth:`CircuitBreaker.call`)."""
        return await self.get(key).call(fn, *args, **kwargs)

    def tick(self) -> dict[str, str]:
        """Perform due time-driven transitions on every breaker; returns states."""
        return {k: b.tick().value for k, b in list(self._breakers.items())}

    def reset(self, key: str, reason: str = "admin reset") -> None:
        """Close ``key``'s breaker (``POST /admin/breakers/{model}/reset``)."""
        self.get(key).reset(reason)

    def snapshot(self) -> dict[str, Any]:
        """``{"version": 1, "taken_at", "breakers": {key: snapshot}}``, JSON-able."""
        return {
            "version": 1,
            "taken_at": self._clock(),
            "breakers": {k: b.snapshot() for k, b in list(self._breakers.items())},
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        """Load :meth:`snapshot` output (no transition events are emitted)."""
        for key, bsnap in (snap.get("breakers") or {}).items():
            self.get(str(key)).restore(bsnap)


class SnapshotGate:
    """Router-side :class:`BreakerGate` over snapshots published by the supervisor.

    Decides locally from the latest snapshot: CLOSED admits (a local permit
    stamped with the snapshot's generation), OPEN before ``open_until`` skips,
    HALF_OPEN (or OPEN past ``open_until``) asks ``probe(key)`` for a permit
    (the supervisor's :meth:`BreakerRegistry.try_acquire`, cluster-wide) and
    skips when there is none. Outcomes are queued; :meth:`drain` hands them to
    the batch reporter (apply them with :meth:`BreakerRegistry.record_outcomes`).
    Keys missing from the snapshot count as CLOSED.
    """

    def __init__(
        self,
        snapshot: Mapping[str, Any] | None = None,
        *,
        clock: Clock = time.time,
        probe: Callable[[str], Awaitable[Permit | None]] | None = None,
        max_pending: int = 10_000,
    ) -> None:
        self._clock = clock
        self._probe = probe
        self._snaps: dict[str, Mapping[str, Any]] = {}
        self._pending: list[Outcome] = []
        self._max_pending = max_pending
        self.dropped = 0
        self._updated_at: float | None = None
        if snapshot is not None:
            self.update(snapshot)

    def update(self, snapshot: Mapping[str, Any]) -> None:
        """Replace the view with a :meth:`BreakerRegistry.snapshot`."""
        self._snaps = dict(snapshot.get("breakers") or {})
        self._updated_at = self._clock()

    def snapshot_age_s(self) -> float | None:
        """Seconds since the last :meth:`update` (None before the first)."""
        return None if self._updated_at is None else self._clock() - self._updated_at

    def state(self, key: str) -> BreakerState:
        """Effective state of ``key`` (OPEN past its ``open_until`` reads HALF_OPEN)."""
        snap = self._snaps.get(key)
        if snap is None:
            return BreakerState.CLOSED
        st = BreakerState(snap["state"])
        until = snap.get("open_until")
        if st is BreakerState.OPEN and until is not None and self._clock() >= float(until):
            return BreakerState.HALF_OPEN
        return st

    def retry_after_s(self, key: str) -> float | None:
        """Seconds until ``key``'s OPEN breaker admits probes (None if not OPEN)."""
        snap = self._snaps.get(key)
        if snap is None or self.state(key) is not BreakerState.OPEN:
            return None
        until = snap.get("open_until")
        return None if until is None else max(0.0, float(until) - self._clock())

    def allows(self, key: str) -> bool:
        """False only when ``key`` is OPEN and its wait has not elapsed."""
        return self.state(key) is not BreakerState.OPEN

    async def acquire(self, key: str) -> Permit | None:
        """A local permit when CLOSED, a supervisor probe permit when HALF_OPEN."""
        st = self.state(key)
        if st is BreakerState.CLOSED:
            gen = int((self._snaps.get(key) or {}).get("generation", 0))
            return Permit(key, gen, 0, False, self._clock())
        if st is BreakerState.HALF_OPEN and self._probe is not None:
            return await self._probe(key)
        return None

    def complete(self, permit: Permit, error: BaseException | None, duration_s: float) -> None:
        """Queue the outcome for the next batch report."""
        if len(self._pending) >= self._max_pending:
            self._pending.pop(0)
            self.dropped += 1
        self._pending.append(
            Outcome.of(permit.key, error, duration_s, permit=permit, at_s=self._clock())
        )

    def drain(self) -> list[Outcome]:
        """Take the queued outcomes."""
        out, self._pending = self._pending, []
        return out
