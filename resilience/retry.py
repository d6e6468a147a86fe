"""Retries with jittered exponential backoff inside a deadline, on tenacity's async API.

A :class:`RetryPolicy` is plain frozen data (build it from config with
:meth:`RetryPolicy.from_mapping`); a :class:`Retrier` runs an async callable
under it::

    retrier = Retrier(policy, clock=time.monotonic, rng=random.Random(seed))
    result = await retrier.run(lambda attempt_no: call_model(attempt_no),
                               deadline_at_s=start + 30.0, model="wan-t2v")

Only errors whose ``retriable`` is true are retried (see
:mod:`resilience.errors`); anything else is re-raised at once. A retry whose
backoff plus expected duration would end past the deadline is not started:
the last error is raised instead. :func:`set_waits_enabled` (or the
:func:`waits_disabled` context manager) turns backoff sleeps off in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.wait import wait_base

from ._util import Clock, build_policy, require
from .errors import DeadlineExceeded, ModelTimeout, is_retriable

__all__ = [
    "AttemptEvent",
    "AttemptHook",
    "Retrier",
    "RetryPolicy",
    "retry_call",
    "set_waits_enabled",
    "waits_disabled",
    "waits_enabled",
]

T = TypeVar("T")

_WAITS_ENABLED = True


def set_waits_enabled(enabled: bool) -> None:
    """Globally turn backoff sleeps on or off (tests turn them off)."""
    global _WAITS_ENABLED
    _WAITS_ENABLED = bool(enabled)


def waits_enabled() -> bool:
    """Whether backoff sleeps currently happen."""
    return _WAITS_ENABLED


@contextlib.contextmanager
def waits_disabled() -> Iterator[None]:
    """Context manager: no backoff sleeps inside the block."""
    before = _WAITS_ENABLED
    set_waits_enabled(False)
    try:
        yield
    finally:
        set_waits_enabled(before)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How one step is retried.

    - ``max_attempts``: calls in all, first included (1 = no retry).
    - backoff before retry ``n`` (n = 1 after the first failure) is
      ``min(max_backoff_s, initial_backoff_s * multiplier ** (n - 1))``, then
      jittered uniformly by ``±jitter`` (a fraction 0..1) and capped again.
    - ``deadline_s``: budget for the whole run (None: only the caller's deadline).
    - ``attempt_timeout_s``: cap on one attempt (None: only the deadline).
    - ``expected_attempt_s``: lower bound on how long an attempt takes, used to
      decide whether a retry can still finish before the deadline (the longest
      observed attempt in this run is used when larger).
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    multiplier: float = 2.0
    jitter: float = 0.5
    deadline_s: float | None = None
    attempt_timeout_s: float | None = None
    expected_attempt_s: float = 0.0

    def __post_init__(self) -> None:
        require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        require(self.initial_backoff_s >= 0, "initial_backoff_s", "must be >= 0")
        require(
            self.max_backoff_s >= self.initial_backoff_s,
            "max_backoff_s",
            "must be >= initial_backoff_s",
        )
        require(self.multiplier >= 1.0, "multiplier", "must be >= 1")
        require(0.0 <= self.jitter <= 1.0, "jitter", "must be within 0..1")
        require(self.deadline_s is None or self.deadline_s > 0, "deadline_s", "must be > 0")
        require(
            self.attempt_timeout_s is None or self.attempt_timeout_s > 0,
            "attempt_timeout_s",
            "must be > 0",
        )
        require(self.expected_attempt_s >= 0, "expected_attempt_s", "must be >= 0")

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | object | None, path: str = "retry"
    ) -> RetryPolicy:
        """Build from a config mapping; errors name ``path.key``."""
        return build_policy(cls, data, path)

    def base_backoff_s(self, retry_no: int) -> float:
        """Backoff before retry ``retry_no`` (1-based) without jitter."""
        if retry_no < 1:
            return 0.0
        exp = min(retry_no - 1, 1000)
        try:
            raw = self.initial_backoff_s * self.multiplier**exp
        except OverflowError:
            raw = math.inf
        return min(self.max_backoff_s, raw)

    def backoff_s(self, retry_no: int, rng: random.Random) -> float:
        """Jittered backoff before retry ``retry_no``; always in ``[0, max_backoff_s]``."""
        base = self.base_backoff_s(retry_no)
        if self.jitter and base:
            base *= 1.0 + rng.uniform(-self.jitter, self.jitter)
        return max(0.0, min(self.max_backoff_s, base))


@dataclass(frozen=True, slots=True)
class AttemptEvent:
    """Reported to the attempt hook after every attempt (``error`` None = success)."""

    attempt: int
    started_at_s: float
    elapsed_s: float
    error: BaseException | None
    model: str | None = None


AttemptHook = Callable[[AttemptEvent], None]


class _Wait(wait_base):
    def __init__(self, policy: RetryPolicy, rng: random.Random) -> None:
        self._policy = policy
        self._rng = rng

    def __call__(self, retry_state: RetryCallState) -> float:
        return self._policy.backoff_s(retry_state.attempt_number, self._rng)


class _Run:
    """State of one :meth:`Retrier.run`: attempt counting and the stop rule."""

    def __init__(
        self,
        retrier: Retrier,
        fn: Callable[[int], Awaitable[Any]],
        deadline_at_s: float | None,
        on_attempt: AttemptHook | None,
        may_retry: Callable[[int], bool] | None,
        model: str | None,
    ) -> None:
        self.r = retrier
        self.fn = fn
        self.deadline_at_s = deadline_at_s
        self.on_attempt = on_attempt
        self.may_retry = may_retry
        self.model = model
        self.attempt_no = 0
        self.longest_s = 0.0
        self.stop_reason: str | None = None

    def remaining_s(self) -> float | None:
        if self.deadline_at_s is None:
            return None
        return self.deadline_at_s - self.r.clock()

    async def attempt(self) -> Any:
        self.attempt_no += 1
        n = self.attempt_no
        remaining = self.remaining_s()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded(model=self.model, attempt=n)
        limits = [x for x in (self.r.policy.attempt_timeout_s, remaining) if x is not None]
        timeout = min(limits) if limits else None
        start = self.r.clock()
        error: BaseException | None = None
        try:
            try:
                if timeout is None:
                    return await self.fn(n)
                async with asyncio.timeout(timeout):
                    return await self.fn(n)
            except TimeoutError as exc:
                limit = "" if timeout is None else f" within {timeout:.3g}s"
                raise ModelTimeout(
                    f"no answer{limit}",
                    model=self.model,
                    attempt=n,
                    detail={} if timeout is None else {"timeout_s": timeout},
                ) from exc
        except BaseException as exc:
            error = exc
            raise
        finally:
            elapsed = max(0.0, self.r.clock() - start)
            self.longest_s = max(self.longest_s, elapsed)
            hook = self.on_attempt
            if hook is not None:
                hook(AttemptEvent(n, start, elapsed, error, self.model))

    def stop(self, retry_state: RetryCallState) -> bool:
        policy = self.r.policy
        if retry_state.attempt_number >= policy.max_attempts:
            self.stop_reason = "max_attempts"
            return True
        remaining = self.remaining_s()
        if remaining is not None:
            wait = retry_state.upcoming_sleep if waits_enabled() else 0.0
            expected = max(policy.expected_attempt_s, self.longest_s)
            if wait + expected >= remaining:
                self.stop_reason = "deadline"
                return True
        if self.may_retry is not None and not self.may_retry(retry_state.attempt_number + 1):
            self.stop_reason = "vetoed"
            return True
        return False


async def _no_sleep(_: float) -> None:
    return None


class Retrier:
    """Runs async callables under a :class:`RetryPolicy` (tenacity ``AsyncRetrying``).

    ``clock`` measures deadlines and attempt durations; ``rng`` draws jitter;
    ``sleep`` waits the backoff (pass a fake clock's async sleep in tests).
    ``on_attempt`` is called after every attempt of every run.
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_attempt: AttemptHook | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.rng = rng or random.Random()
        self._sleep = sleep
        self._on_attempt = on_attempt

    async def _sleep_maybe(self, seconds: float) -> None:
        if waits_enabled() and seconds > 0:
            await self._sleep(seconds)

    async def run(
        self,
        fn: Callable[[int], Awaitable[T]],
        *,
        deadline_at_s: float | None = None,
        on_attempt: AttemptHook | None = None,
        may_retry: Callable[[int], bool] | None = None,
        model: str | None = None,
    ) -> T:
        """Await ``fn(attempt_no)`` (1-based), retrying retriable errors.

        ``deadline_at_s`` is absolute on ``clock`` (the policy's ``deadline_s``,
        counted from now, applies too: the earlier wins). ``may_retry(next_no)``
        may veto a retry (the fallback chain uses it for its budgets); it is
        asked last, only when the policy would retry. Raises the last error.
        """
        deadline = deadline_at_s
        if self.policy.deadline_s is not None:
            own = self.clock() + self.policy.deadline_s
            deadline = own if deadline is None else min(deadline, own)

        hooks = [h for h in (self._on_attempt, on_attempt) if h is not None]

        def hook(ev: AttemptEvent) -> None:
            for h in hooks:
                h(ev)

        state = _Run(self, fn, deadline, hook if hooks else None, may_retry, model)
        retrying = AsyncRetrying(
            sleep=self._sleep_maybe,
            stop=state.stop,
            wait=_Wait(self.policy, self.rng),
            retry=retry_if_exception(is_retriable),
            reraise=True,
        )
        result: T = await retrying(state.attempt)
        return result


async def retry_call(
    policy: RetryPolicy,
    fn: Callable[[int], Awaitable[T]],
    *,
    clock: Clock = time.monotonic,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    deadline_at_s: float | None = None,
    on_attempt: AttemptHook | None = None,
    model: str | None = None,
) -> T:
    """One-shot form of :meth:`Retrier.run`."""
    retrier = Retrier(policy, clock=clock, rng=rng, sleep=sleep)
    return await retrier.run(fn, deadline_at_s=deadline_at_s, on_attempt=on_attempt, model=model)
