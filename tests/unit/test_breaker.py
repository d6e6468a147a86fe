"""Circuit breakers: pybreaker's machine moved by windows, slow calls, permits, snapshots."""

from __future__ import annotations

import asyncio
import json

import pybreaker
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from resilience import (
    Backpressure,
    BreakerConfig,
    BreakerGate,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    Cancelled,
    CircuitBreaker,
    CircuitOpen,
    ConfigError,
    FakeClock,
    InvalidRequest,
    ModelError,
    Outcome,
    Permit,
    SnapshotGate,
)

pytestmark = pytest.mark.unit

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

# Consecutive-failure rule only: the window never trips.
CONSECUTIVE = BreakerConfig(
    fail_max=3, minimum_calls=100, window_size_calls=100, wait_in_open_s=10.0
)


def make(
    cfg: BreakerConfig = CONSECUTIVE, clock: FakeClock | None = None
) -> tuple[CircuitBreaker, FakeClock, list[BreakerTransition]]:
    clock = clock or FakeClock()
    events: list[BreakerTransition] = []
    breaker = CircuitBreaker("wan-t2v", cfg, clock=clock, listeners=[events.append])
    return breaker, clock, events


def test_consecutive_failures_open() -> None:
    """fail_max consecutive failures open the breaker; one fewer does not."""
    b, _, _ = make()
    b.record_failure(ModelError())
    b.record_failure(ModelError())
    assert b.state is CLOSED
    b.record_failure(ModelError())
    assert b.state is OPEN


def test_success_resets_consecutive_count() -> None:
    """A success between failures resets pybreaker's consecutive counter."""
    b, _, _ = make()
    for _ in range(5):
        b.record_failure(ModelError())
        b.record_failure(ModelError())
        b.record_success(0.1)
    assert b.state is CLOSED and b.pybreaker.fail_counter == 0


async def test_awaited_failures_open_and_stop_reaching_fn() -> None:
    """fail_max failing awaited calls open the breaker; exactly fail_max reach the function."""
    b, _, _ = make()
    reached = 0

    async def failing() -> None:
        nonlocal reached
        reached += 1
        await asyncio.sleep(0)
        raise ModelError("boom")

    outcomes = []
    for _ in range(7):
        try:
            await b.call(failing)
        except ModelError:
            outcomes.append("model_error")
        except CircuitOpen:
            outcomes.append("circuit_open")
    assert b.state is OPEN
    assert reached == 3
    assert outcomes == ["model_error"] * 3 + ["circuit_open"] * 4


async def test_awaited_success_returns_value() -> None:
    """A successful awaited call returns its value and counts as a success."""
    b, _, _ = make()

    async def ok(x: int) -> int:
        return x * 2

    assert await b.call(ok, 21) == 42
    assert b.metrics()["successes"] == 1


async def test_cancelled_call_releases_probe_permit() -> None:
    """Cancelling a wrapped HALF_OPEN call releases its permit and leaves the state alone."""
    b, _, _ = make(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1, half_open_permits=1)
    )
    b.record_failure(ModelError())
    b.half_open()

    async def hang() -> None:
        await asyncio.sleep(10)

    task = asyncio.create_task(b.call(hang))
    await asyncio.sleep(0)
    assert not b.allows()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert b.state is HALF_OPEN and b.allows()


def test_failure_rate_count_window() -> None:
    """In a count window the failure rate trips at the threshold once minimum_calls are in."""
    cfg = BreakerConfig(
        fail_max=None, window_size_calls=10, minimum_calls=10, failure_rate_threshold=0.5
    )
    b, _, events = make(cfg)
    for i in range(9):
        (b.record_failure if i % 2 == 0 else b.record_success)()
    assert b.state is CLOSED  # 5 failures of 9 calls: under minimum_calls
    b.record_success()
    assert b.state is OPEN  # 5 of 10 = 50 %
    assert events[-1].reason == "failure rate 50% >= 50% over 10 calls"


def test_count_window_slides() -> None:
    """Old outcomes leave the count window, so early failures stop counting."""
    cfg = BreakerConfig(
        fail_max=None, window_size_calls=4, minimum_calls=4, failure_rate_threshold=0.75
    )
    b, _, _ = make(cfg)
    b.record_failure()
    b.record_failure()
    for _ in range(10):
        b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is CLOSED and b.metrics()["failure_rate"] == 0.5


def test_time_window_forgets_old_failures() -> None:
    """In a time window, failures older than window_s no longer count."""
    cfg = BreakerConfig(
        fail_max=None,
        sliding_window="time",
        window_s=60.0,
        minimum_calls=4,
        failure_rate_threshold=0.5,
    )
    b, clock, _ = make(cfg)
    for _ in range(3):
        b.record_failure()
    clock.advance(61)
    for _ in range(3):
        b.record_success()
    b.record_failure()
    assert b.state is CLOSED and b.metrics()["window_calls"] == 4


def test_time_window_trips() -> None:
    """In a time window, enough failures within window_s open the breaker."""
    cfg = BreakerConfig(
        fail_max=None,
        sliding_window="time",
        window_s=60.0,
        minimum_calls=4,
        failure_rate_threshold=0.5,
    )
    b, clock, _ = make(cfg)
    for _ in range(2):
        b.record_success()
        clock.advance(5)
    b.record_failure()
    b.record_failure()
    assert b.state is OPEN


def test_slow_calls_open() -> None:
    """Slow successes at the slow-call rate threshold open the breaker."""
    cfg = BreakerConfig(
        fail_max=None,
        window_size_calls=4,
        minimum_calls=4,
        slow_call_duration_s=1.0,
        slow_call_rate_threshold=0.5,
    )
    b, _, events = make(cfg)
    b.record_success(0.1)
    b.record_success(2.0)
    b.record_success(0.1)
    assert b.state is CLOSED
    b.record_success(1.0)
    assert b.state is OPEN and "slow-call rate 50%" in events[-1].reason


def test_open_to_half_open_after_wait() -> None:
    """OPEN admits nothing until wait_in_open_s elapses, then reads HALF_OPEN by itself."""
    b, clock, events = make()
    for _ in range(3):
        b.record_failure()
    clock.advance(9.99)
    assert b.try_acquire() is None and b.state is OPEN
    assert b.retry_after_s() == pytest.approx(0.01)
    clock.advance(0.01)
    assert b.state is HALF_OPEN
    assert [(e.from_state, e.to_state) for e in events] == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert events[-1].reason == "wait_in_open_s=10 elapsed"


def test_half_open_limits_permits_and_closes() -> None:
    """HALF_OPEN grants half_open_permits probes; that many successes close it."""
    cfg = BreakerConfig(
        fail_max=1, minimum_calls=1, window_size_calls=1, wait_in_open_s=5.0, half_open_permits=2
    )
    b, clock, events = make(cfg)
    b.record_failure()
    clock.advance(5)
    p1, p2, p3 = b.try_acquire(), b.try_acquire(), b.try_acquire()
    assert p1 is not None and p2 is not None and p3 is None
    assert p1.probe and p2.probe and p1.token != p2.token
    b.record_success(0.1, permit=p1)
    assert b.state is HALF_OPEN
    b.record_success(0.1, permit=p2)
    assert b.state is CLOSED
    assert events[-1].reason == "2 half-open probe(s) succeeded"


def test_half_open_failure_reopens_with_new_wait() -> None:
    """A failed probe re-opens the breaker and restarts the wait."""
    b, clock, events = make()
    for _ in range(3):
        b.record_failure()
    clock.advance(10)
    permit = b.try_acquire()
    assert permit is not None and permit.probe
    b.record_failure(ModelError(), 0.2, permit=permit)
    assert b.state is OPEN and b.open_until_s == pytest.approx(clock() + 10)
    assert events[-1].reason == "half-open probe failed (model_error)"


def test_half_open_slow_probe_reopens() -> None:
    """A slow probe counts as a failed probe."""
    cfg = BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1, slow_call_duration_s=1.0)
    b, clock, _ = make(cfg)
    b.record_failure()
    clock.advance(cfg.wait_in_open_s)
    permit = b.try_acquire()
    b.record_success(3.0, permit=permit)
    assert b.state is OPEN


@pytest.mark.parametrize(
    "err", [InvalidRequest(), Backpressure(), Cancelled(), CircuitOpen(), asyncio.CancelledError()]
)
def test_non_failures_never_move(err: BaseException) -> None:
    """Errors with counts_as_failure False never change state or counters, in any state."""
    b, clock, events = make(BreakerConfig(fail_max=2, minimum_calls=2, window_size_calls=2))
    for _ in range(50):
        b.record_failure(err)
    assert b.state is CLOSED and b.metrics()["window_calls"] == 0 and b.pybreaker.fail_counter == 0
    b.record_failure(ModelError())
    b.record_failure(ModelError())
    clock.advance(b.config.wait_in_open_s)
    permit = b.try_acquire()
    gen = b.generation
    b.record(err, 0.1, permit=permit)
    assert b.state is HALF_OPEN and b.generation == gen and b.allows()  # permit handed back
    assert len(events) == 2


def test_ignored_kind_strings_do_not_move() -> None:
    """Recording the kind string 'backpressure' is ignored like the error."""
    b, _, _ = make(BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1))
    b.record("backpressure", 0.1)
    assert b.state is CLOSED
    b.record("replica_failure", 0.1)
    assert b.state is OPEN


def test_stale_permit_does_not_move() -> None:
    """An outcome with a permit from an earlier state is dropped."""
    cfg = BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1)
    b, clock, _ = make(cfg)
    old = b.try_acquire()
    assert old is not None and not old.probe
    b.record_failure()
    clock.advance(cfg.wait_in_open_s)
    assert b.state is HALF_OPEN
    b.record_failure(ModelError(), permit=old)
    assert b.state is HALF_OPEN and b.metrics()["stale"] == 1


def test_leaked_probe_permit_expires() -> None:
    """A probe permit never reported expires after permit_ttl_s, freeing the slot."""
    cfg = BreakerConfig(
        fail_max=1, minimum_calls=1, window_size_calls=1, permit_ttl_s=30.0, wait_in_open_s=1.0
    )
    b, clock, _ = make(cfg)
    b.record_failure()
    clock.advance(1)
    assert b.try_acquire() is not None and b.try_acquire() is None
    clock.advance(30)
    assert b.try_acquire() is not None and b.metrics()["expired_permits"] == 1


def test_transition_event_fields() -> None:
    """A transition event carries key, from, to, time and reason; to_dict is JSON-able."""
    b, clock, events = make()
    for _ in range(3):
        b.record_failure(ModelError())
    ev = events[0]
    assert (ev.key, ev.from_state, ev.to_state, ev.at_s) == ("wan-t2v", CLOSED, OPEN, clock())
    assert ev.reason == "3 consecutive failures (fail_max), last model_error"
    assert json.loads(json.dumps(ev.to_dict()))["to"] == "open"


def test_state_machine_is_pybreaker() -> None:
    """The underlying pybreaker breaker holds the state and notifies its own listeners."""
    b, _, _ = make()
    seen: list[tuple[str, str]] = []

    class L(pybreaker.CircuitBreakerListener):
        def state_change(self, cb, old_state, new_state):  # type: ignore[no-untyped-def]
            seen.append((old_state.name, new_state.name))

    b.pybreaker.add_listener(L())
    for _ in range(3):
        b.record_failure()
    assert b.pybreaker.current_state == pybreaker.STATE_OPEN
    assert seen == [("closed", "open")]


def test_force_and_reset() -> None:
    """force_open opens with its reason; reset closes and clears the window."""
    b, _, events = make()
    b.force_open("admin")
    assert b.state is OPEN and events[-1].reason == "admin"
    b.reset()
    assert b.state is CLOSED and b.metrics()["window_calls"] == 0


def test_snapshot_is_json_and_restores() -> None:
    """A snapshot survives JSON and a new breaker restored from it has the same state, timers and window."""
    cfg = BreakerConfig(
        fail_max=None,
        window_size_calls=10,
        minimum_calls=10,
        wait_in_open_s=30.0,
        half_open_permits=2,
    )
    b, clock, _ = make(cfg)
    for _ in range(4):
        b.record_failure()
    b.record_success()
    half_snap = json.loads(json.dumps(b.snapshot()))
    b.force_open("x")
    snap = json.loads(json.dumps(b.snapshot()))
    events: list[BreakerTransition] = []
    c = CircuitBreaker.from_snapshot(snap, clock=clock)
    c.add_listener(events.append)
    assert c.state is OPEN and c.open_until_s == b.open_until_s and c.generation == b.generation
    assert events == []
    clock.advance(30)
    assert c.state is HALF_OPEN and events[-1].to_state is HALF_OPEN

    d = CircuitBreaker("wan-t2v", cfg, clock=clock)
    d.restore(half_snap)
    assert (
        d.state is CLOSED
        and d.metrics()["window_calls"] == 5
        and d.metrics()["failure_rate"] == 0.8
    )


def test_snapshot_keeps_outstanding_probes() -> None:
    """A restored HALF_OPEN breaker keeps granted probes, and their permits still count."""
    cfg = BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1, half_open_permits=1)
    b, clock, _ = make(cfg)
    b.record_failure()
    clock.advance(cfg.wait_in_open_s)
    permit = b.try_acquire()
    assert permit is not None
    c = CircuitBreaker.from_snapshot(json.loads(json.dumps(b.snapshot())), clock=clock)
    assert c.try_acquire() is None
    c.record_success(0.1, permit=Permit.from_dict(json.loads(json.dumps(permit.to_dict()))))
    assert c.state is CLOSED


def test_config_validation_names_key() -> None:
    """Impossible breaker settings are ConfigErrors naming breaker.<key>."""
    with pytest.raises(ConfigError) as info:
        BreakerConfig.from_mapping({"failure_rate_threshold": 50})
    assert info.value.key == "breaker.failure_rate_threshold"
    with pytest.raises(ConfigError) as info:
        BreakerConfig.from_mapping({"minimum_calls": 20, "window_size_calls": 10})
    assert info.value.key == "breaker.minimum_calls"


def test_registry_per_key_and_overrides() -> None:
    """The registry makes one breaker per key, with per-key overrides."""
    clock = FakeClock()
    reg = BreakerRegistry(
        {"fail_max": 2, "minimum_calls": 50}, overrides={"qwen-image": {"fail_max": 1}}, clock=clock
    )
    reg.record_failure("wan-t2v", ModelError())
    reg.record_failure("qwen-image", ModelError())
    assert reg.states() == {"wan-t2v": "closed", "qwen-image": "open"}
    assert reg.get("wan-t2v") is reg.get("wan-t2v") and len(reg) == 2


def test_registry_listeners_see_all_keys() -> None:
    """Registry listeners receive transitions of breakers created later."""
    reg = BreakerRegistry(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1), clock=FakeClock()
    )
    events: list[BreakerTransition] = []
    reg.add_listener(events.append)
    reg.record_failure("a")
    reg.record_failure("b")
    assert [(e.key, e.to_state) for e in events] == [("a", OPEN), ("b", OPEN)]


def test_registry_is_a_gate() -> None:
    """BreakerRegistry satisfies the BreakerGate protocol."""
    assert isinstance(BreakerRegistry(clock=FakeClock()), BreakerGate)


def test_registry_batch_outcomes() -> None:
    """A batch of outcome dicts (as routers report them) moves the breaker."""
    reg = BreakerRegistry(BreakerConfig(fail_max=3, minimum_calls=50), clock=FakeClock())
    batch = [Outcome("wan-t2v", "backpressure", 0.1).to_dict()] * 5
    batch += [Outcome.of("wan-t2v", ModelError(), 0.2).to_dict() for _ in range(3)]
    assert reg.record_outcomes(json.loads(json.dumps(batch))) == 8
    assert reg.state("wan-t2v") is OPEN


def test_registry_snapshot_round_trip() -> None:
    """A registry snapshot restored into a fresh registry reproduces every state."""
    clock = FakeClock()
    reg = BreakerRegistry(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1), clock=clock
    )
    reg.record_failure("a")
    reg.record_success("b")
    other = BreakerRegistry(reg.config, clock=clock)
    other.restore(json.loads(json.dumps(reg.snapshot())))
    assert other.states() == {"a": "open", "b": "closed"}
    assert other.status()["a"]["since"] == reg.status()["a"]["since"]


async def test_snapshot_gate_router_view() -> None:
    """The router gate admits CLOSED locally, skips OPEN, asks the supervisor in HALF_OPEN."""
    clock = FakeClock()
    reg = BreakerRegistry(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1, wait_in_open_s=10),
        clock=clock,
    )
    reg.record_failure("a")
    reg.record_success("b")
    asked: list[str] = []

    async def probe(key: str) -> Permit | None:
        asked.append(key)
        return reg.try_acquire(key)

    gate = SnapshotGate(reg.snapshot(), clock=clock, probe=probe)
    assert isinstance(gate, BreakerGate)
    permit_b = await gate.acquire("b")
    assert permit_b is not None and not permit_b.probe
    assert await gate.acquire("a") is None and not gate.allows("a") and asked == []
    assert gate.retry_after_s("a") == pytest.approx(10.0) and gate.retry_after_s("b") is None
    clock.advance(10)
    assert gate.state("a") is HALF_OPEN
    probe_permit = await gate.acquire("a")
    assert asked == ["a"] and probe_permit is not None and probe_permit.probe
    gate.complete(probe_permit, None, 0.3)
    gate.complete(permit_b, ModelError(), 0.1)
    reg.record_outcomes(gate.drain())
    assert reg.state("a") is CLOSED and gate.drain() == []


async def test_snapshot_gate_unknown_key_is_closed() -> None:
    """A key missing from the snapshot is admitted as CLOSED."""
    gate = SnapshotGate({"breakers": {}}, clock=FakeClock())
    permit = await gate.acquire("new-model")
    assert permit is not None and permit.generation == 0


# --------------------------------------------------------------- state machine
NON_FAILURES = [
    InvalidRequest(),
    Backpressure(),
    Cancelled(),
    CircuitOpen(),
    "backpressure",
    "cancelled",
]


class BreakerMachine(RuleBasedStateMachine):
    """Random outcomes and time steps against the breaker's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.cfg = BreakerConfig(
            fail_max=3,
            window_size_calls=6,
            minimum_calls=4,
            failure_rate_threshold=0.5,
            slow_call_duration_s=2.0,
            slow_call_rate_threshold=0.75,
            wait_in_open_s=10.0,
            half_open_permits=2,
            permit_ttl_s=1_000.0,
        )
        self.events: list[BreakerTransition] = []
        self.b = CircuitBreaker("m", self.cfg, clock=self.clock, listeners=[self.events.append])
        self.permits: list[Permit] = []

    @rule(dt=st.floats(min_value=0.0, max_value=12.0))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    @rule()
    def acquire(self) -> None:
        state = self.b.state
        until = self.b.open_until_s
        permit = self.b.try_acquire()
        if state is OPEN:
            assert permit is None
            assert until is not None and self.clock() < until
        if permit is not None:
            self.permits.append(permit)

    @precondition(lambda self: bool(self.permits))
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "slow"]))
    def complete(self, data: st.DataObject, outcome: str) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        if outcome == "failure":
            self.b.record_failure(ModelError(), 0.1, permit=permit)
        else:
            self.b.record_success(5.0 if outcome == "slow" else 0.1, permit=permit)

    @precondition(lambda self: bool(self.permits))
    @rule()
    def complete_all_fast(self) -> None:
        while self.permits:
            self.b.record_success(0.1, permit=self.permits.pop())

    @precondition(lambda self: bool(self.permits))
    @rule(data=st.data(), err=st.sampled_from(NON_FAILURES))
    def complete_non_failure(self, data: st.DataObject, err: BaseException | str) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        before = (self.b.state, self.b.generation, self.b.pybreaker.fail_counter)
        self.b.record(err, 0.1, permit=permit)
        assert (self.b.state, self.b.generation, self.b.pybreaker.fail_counter) == before

    @rule(err=st.sampled_from(NON_FAILURES))
    def report_non_failure(self, err: BaseException | str) -> None:
        before = (self.b.state, self.b.generation, self.b.metrics()["window_calls"])
        self.b.record(err, 3.0)
        assert (self.b.state, self.b.generation, self.b.metrics()["window_calls"]) == before

    @rule(failure=st.booleans())
    def report_after_the_fact(self, failure: bool) -> None:
        if failure:
            self.b.record_failure(ModelError(), 0.1)
        else:
            self.b.record_success(0.1)

    @invariant()
    def open_admits_nothing_until_wait(self) -> None:
        if self.b.state is OPEN:
            assert not self.b.allows()
            until = self.b.open_until_s
            assert until is not None and self.clock() < until

    @invariant()
    def half_open_bounded(self) -> None:
        if self.b.state is HALF_OPEN:
            live = [p for p in self.permits if p.probe and p.generation == self.b.generation]
            assert len(live) <= self.cfg.half_open_permits

    @invariant()
    def transitions_are_legal(self) -> None:
        legal = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}
        assert all((e.from_state, e.to_state) in legal for e in self.events)


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
