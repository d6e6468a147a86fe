"""RetryPolicy and Retrier: backoff with jitter, retriable-only, deadline, hook, test switch."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilience import (
    AttemptEvent,
    ConfigError,
    DeadlineExceeded,
    FakeClock,
    InvalidRequest,
    ModelError,
    ModelTimeout,
    Retrier,
    RetryPolicy,
    retry_call,
    waits_disabled,
    waits_enabled,
)

pytestmark = pytest.mark.unit


class Flaky:
    """Fails with the given errors, then returns 'ok'; optionally takes fake time."""

    def __init__(
        self, fails: list[BaseException], clock: FakeClock | None = None, cost_s: float = 0.0
    ):
        self.fails = list(fails)
        self.calls: list[int] = []
        self.clock = clock
        self.cost_s = cost_s

    async def __call__(self, attempt_no: int) -> str:
        self.calls.append(attempt_no)
        if self.clock is not None:
            self.clock.advance(self.cost_s)
        if self.fails:
            raise self.fails.pop(0)
        return "ok"


def _retrier(policy: RetryPolicy, clock: FakeClock, seed: int = 0) -> Retrier:
    return Retrier(policy, clock=clock, rng=random.Random(seed), sleep=clock.sleep)


async def test_retries_retriable_until_success() -> None:
    """Two retriable failures then success: 3 calls, numbered 1..3, result returned."""
    clock = FakeClock()
    fn = Flaky([ModelError(), ModelError()])
    result = await _retrier(RetryPolicy(max_attempts=3, jitter=0.0), clock).run(fn)
    assert result == "ok" and fn.calls == [1, 2, 3]


async def test_exponential_backoff_without_jitter() -> None:
    """Backoffs are initial * multiplier**(n-1), capped at max_backoff_s."""
    clock = FakeClock()
    policy = RetryPolicy(
        max_attempts=5, initial_backoff_s=0.5, multiplier=2.0, max_backoff_s=1.5, jitter=0.0
    )
    fn = Flaky([ModelError()] * 4)
    await _retrier(policy, clock).run(fn)
    assert clock.sleeps == [0.5, 1.0, 1.5, 1.5]


async def test_non_retriable_raised_at_once() -> None:
    """A non-retriable error is raised after one call."""
    clock = FakeClock()
    fn = Flaky([InvalidRequest("bad")])
    with pytest.raises(InvalidRequest):
        await _retrier(RetryPolicy(max_attempts=5), clock).run(fn)
    assert fn.calls == [1]


async def test_foreign_exception_not_retried() -> None:
    """An untranslated exception is not retried and propagates unchanged."""
    clock = FakeClock()
    fn = Flaky([KeyError("x")])
    with pytest.raises(KeyError):
        await _retrier(RetryPolicy(max_attempts=5), clock).run(fn)
    assert fn.calls == [1]


async def test_exhaustion_raises_last_error() -> None:
    """After max_attempts retriable failures the last error is raised."""
    clock = FakeClock()
    last = ModelTimeout("third")
    fn = Flaky([ModelError("1"), ModelError("2"), last])
    with pytest.raises(ModelTimeout) as info:
        await _retrier(RetryPolicy(max_attempts=3), clock).run(fn)
    assert info.value is last and len(fn.calls) == 3


async def test_retry_not_started_when_it_cannot_finish_before_deadline() -> None:
    """With 0.8 s attempts, a 0.5 s backoff and a 2 s deadline only one call is made."""
    clock = FakeClock()
    start = clock()
    fn = Flaky([ModelError()] * 5, clock=clock, cost_s=0.8)
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.5, jitter=0.0)
    with pytest.raises(ModelError):
        await _retrier(policy, clock).run(fn, deadline_at_s=start + 2.0)
    assert fn.calls == [1] and clock() - start == pytest.approx(0.8)


async def test_retry_started_when_it_fits() -> None:
    """With 0.2 s attempts and 0.1 s backoffs inside 2 s, all 3 attempts run."""
    clock = FakeClock()
    start = clock()
    fn = Flaky([ModelError(), ModelError()], clock=clock, cost_s=0.2)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, jitter=0.0)
    assert await _retrier(policy, clock).run(fn, deadline_at_s=start + 2.0) == "ok"
    assert len(fn.calls) == 3 and clock() <= start + 2.0


async def test_expected_attempt_s_blocks_retry() -> None:
    """expected_attempt_s larger than the remaining budget prevents a retry of a fast failure."""
    clock = FakeClock()
    fn = Flaky([ModelError()] * 3)
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.0, expected_attempt_s=5.0)
    with pytest.raises(ModelError):
        await _retrier(policy, clock).run(fn, deadline_at_s=clock() + 4.0)
    assert fn.calls == [1]


async def test_deadline_already_passed() -> None:
    """A deadline in the past raises DeadlineExceeded without calling."""
    clock = FakeClock()
    fn = Flaky([])
    with pytest.raises(DeadlineExceeded):
        await _retrier(RetryPolicy(), clock).run(fn, deadline_at_s=clock() - 1)
    assert fn.calls == []


async def test_policy_deadline_s_applies() -> None:
    """The policy's own deadline_s bounds the run like a caller deadline."""
    clock = FakeClock()
    fn = Flaky([ModelError()] * 5, clock=clock, cost_s=1.0)
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.5, jitter=0.0, deadline_s=2.0)
    with pytest.raises(ModelError):
        await _retrier(policy, clock).run(fn)
    assert len(fn.calls) == 1


async def test_attempt_hook_reports_every_attempt() -> None:
    """The hook sees each attempt's number, error and elapsed time, success included."""
    clock = FakeClock()
    events: list[AttemptEvent] = []
    fn = Flaky([ModelError("a")], clock=clock, cost_s=0.25)
    await _retrier(RetryPolicy(max_attempts=3, jitter=0.0), clock).run(
        fn, on_attempt=events.append, model="wan-t2v"
    )
    assert [(e.attempt, type(e.error).__name__ if e.error else None) for e in events] == [
        (1, "ModelError"),
        (2, None),
    ]
    assert [e.elapsed_s for e in events] == [pytest.approx(0.25), pytest.approx(0.25)]
    assert {e.model for e in events} == {"wan-t2v"}


async def test_waits_disabled_switch() -> None:
    """Inside waits_disabled no backoff sleep happens, and the switch restores itself."""
    clock = FakeClock()
    fn = Flaky([ModelError()] * 2)
    with waits_disabled():
        assert not waits_enabled()
        await _retrier(RetryPolicy(max_attempts=3, initial_backoff_s=5.0), clock).run(fn)
    assert clock.sleeps == [] and waits_enabled() and len(fn.calls) == 3


async def test_attempt_timeout_becomes_retriable_model_timeout() -> None:
    """A hanging attempt is cut at attempt_timeout_s as ModelTimeout and retried."""
    calls = 0

    async def hang(_: int) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            await asyncio.sleep(10)
        return "late-ok"

    started = time.monotonic()
    with waits_disabled():
        out = await Retrier(RetryPolicy(max_attempts=3, attempt_timeout_s=0.01)).run(hang)
    assert out == "late-ok" and calls == 3 and time.monotonic() - started < 2.0


async def test_builtin_timeout_error_is_translated() -> None:
    """A builtin TimeoutError from the call is retried as ModelTimeout."""
    clock = FakeClock()
    fn = Flaky([TimeoutError("t"), TimeoutError("t")])
    with pytest.raises(ModelTimeout):
        await _retrier(RetryPolicy(max_attempts=2), clock).run(fn)
    assert len(fn.calls) == 2


async def test_may_retry_veto() -> None:
    """may_retry returning False stops retrying after the first call."""
    clock = FakeClock()
    fn = Flaky([ModelError()] * 3)
    with pytest.raises(ModelError):
        await _retrier(RetryPolicy(max_attempts=3), clock).run(fn, may_retry=lambda n: False)
    assert fn.calls == [1]


async def test_retry_call_helper() -> None:
    """retry_call runs once-off with the same semantics."""
    clock = FakeClock()
    fn = Flaky([ModelError()])
    out = await retry_call(RetryPolicy(max_attempts=2), fn, clock=clock, sleep=clock.sleep)
    assert out == "ok" and len(fn.calls) == 2


async def test_jitter_is_seeded() -> None:
    """The same rng seed gives the same jittered backoffs."""
    runs = []
    for _ in range(2):
        clock = FakeClock()
        await _retrier(RetryPolicy(max_attempts=4, jitter=0.5), clock, seed=42).run(
            Flaky([ModelError()] * 3)
        )
        runs.append(clock.sleeps)
    assert runs[0] == runs[1] and len(runs[0]) == 3


@given(
    retry_no=st.integers(min_value=1, max_value=60),
    initial=st.floats(min_value=0.0, max_value=5.0),
    extra=st.floats(min_value=0.0, max_value=30.0),
    mult=st.floats(min_value=1.0, max_value=4.0),
    jitter=st.floats(min_value=0.0, max_value=1.0),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_backoff_bounds(
    retry_no: int, initial: float, extra: float, mult: float, jitter: float, seed: int
) -> None:
    """A jittered backoff stays within ±jitter of the base and within [0, max_backoff_s]."""
    policy = RetryPolicy(
        initial_backoff_s=initial, max_backoff_s=initial + extra, multiplier=mult, jitter=jitter
    )
    base = policy.base_backoff_s(retry_no)
    value = policy.backoff_s(retry_no, random.Random(seed))
    assert 0.0 <= value <= policy.max_backoff_s
    assert base * (1 - jitter) - 1e-9 <= value <= base * (1 + jitter) + 1e-9


def test_from_mapping_builds_frozen_policy() -> None:
    """A config mapping builds a frozen policy with those values."""
    policy = RetryPolicy.from_mapping({"max_attempts": 4, "initial_backoff_s": 0.1})
    assert (policy.max_attempts, policy.initial_backoff_s) == (4, 0.1)
    with pytest.raises(AttributeError):
        policy.max_attempts = 9  # type: ignore[misc]


def test_from_mapping_names_unknown_key() -> None:
    """An unknown setting is a ConfigError naming retry.<key>."""
    with pytest.raises(ConfigError) as info:
        RetryPolicy.from_mapping({"max_attempt": 4})
    assert info.value.key == "retry.max_attempt"


def test_from_mapping_names_invalid_value() -> None:
    """An impossible value is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as info:
        RetryPolicy.from_mapping({"max_attempts": 0}, path="workflows.t2i.retry")
    assert info.value.key == "workflows.t2i.retry.max_attempts"
    assert "max_attempts must be >= 1" in info.value.message


def test_from_pydantic_model() -> None:
    """A pydantic config model is accepted directly (via model_dump)."""
    from pydantic import BaseModel

    class RetryConfig(BaseModel):
        max_attempts: int = 2
        deadline_s: float | None = 30.0

    assert RetryPolicy.from_mapping(RetryConfig()) == RetryPolicy(max_attempts=2, deadline_s=30.0)
