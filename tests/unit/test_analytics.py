"""Error analytics: rolling windows, recovery rate, incidents and MTTR, report, bounded memory."""

from __future__ import annotations

import json

import pytest

from resilience import (
    AttemptRecord,
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    ErrorAnalytics,
    FakeClock,
    RecoveryEvent,
    RecoveryRegistry,
    RecoveryRun,
    hint_for,
    shape_of,
)

pytestmark = pytest.mark.unit

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


def make() -> tuple[ErrorAnalytics, FakeClock]:
    clock = FakeClock(start=1_764_750_000.0)
    return ErrorAnalytics(clock=clock), clock


def transition(
    key: str, a: BreakerState, b: BreakerState, at: float, reason: str = "r"
) -> BreakerTransition:
    return BreakerTransition(key, a, b, at, reason)


def test_counts_by_model_workflow_kind() -> None:
    """Attempts are counted by model, workflow and kind in the 1-minute window."""
    a, _ = make()
    for _ in range(3):
        a.record_attempt("wan-t2v", "timeout", workflow="text-to-video")
    a.record_attempt("wan-t2v", None, workflow="text-to-video")
    a.record_attempt("qwen-image", "out_of_memory", workflow="text-to-image")
    w = a.counts(1)["attempts"]
    assert (w["total"], w["errors"]) == (5, 4)
    assert w["by_kind"] == {"timeout": 3, "out_of_memory": 1}
    assert w["by_model"]["wan-t2v"] == {"attempts": 4, "errors": 3, "by_kind": {"timeout": 3}}
    assert w["by_workflow"]["text-to-image"]["by_kind"] == {"out_of_memory": 1}


def test_windows_roll() -> None:
    """An event 10 minutes old is in the 15 and 60 minute windows but not the 1 minute one; after 61 minutes in none."""
    a, clock = make()
    a.record_attempt("wan-t2v", "timeout")
    clock.advance(600)
    a.record_attempt("wan-t2v", "model_error")
    report = a.report()
    assert [report["windows"][w]["attempts"]["errors"] for w in ("1m", "15m", "60m")] == [1, 2, 2]
    clock.advance(61 * 60)
    assert a.counts(60)["attempts"]["total"] == 0


def test_recovery_rate() -> None:
    """Recovery rate = requests that hit an error and succeeded / requests that hit an error."""
    a, _ = make()
    assert a.recovery_rate() is None
    a.record_request("text-to-image", None, model="qwen-image", errors=0)
    for _ in range(3):
        a.record_request("text-to-image", None, model="newbie-image", errors=2)
    a.record_request("text-to-image", "fallback_exhausted", errors=4)
    assert a.recovery_rate() == 0.75
    req = a.counts(1)["requests"]
    assert (req["total"], req["failed"], req["hit_error"], req["recovered"]) == (5, 1, 4, 3)


def test_record_attempts_from_records() -> None:
    """record_attempts counts only attempts that were calls."""
    a, _ = make()
    a.record_attempts(
        [
            AttemptRecord("qwen-image", "model_error"),
            AttemptRecord("newbie-image", "circuit_open", called=False),
            AttemptRecord("wan-t2v", None),
        ],
        workflow="text-to-image",
    )
    assert a.counts(1)["attempts"]["total"] == 2


def test_incident_from_breaker_open_to_close() -> None:
    """A breaker opening opens an incident; CLOSED closes it with its duration; MTTR averages them."""
    a, clock = make()
    t0 = clock()
    a.breaker_transition(
        transition("wan-t2v", CLOSED, OPEN, t0, "failure rate 60% >= 50% over 10 calls")
    )
    clock.advance(30)
    a.breaker_transition(transition("wan-t2v", OPEN, HALF_OPEN, clock()))
    clock.advance(10)
    a.breaker_transition(transition("wan-t2v", HALF_OPEN, CLOSED, clock()))
    (inc,) = a.incidents()
    assert inc["model"] == "wan-t2v" and inc["opened_at"] == t0 and inc["closed_at"] == t0 + 40
    assert (
        inc["duration_s"] == 40
        and inc["cause"] == "breaker open: failure rate 60% >= 50% over 10 calls"
    )
    assert [e["to"] for e in inc["events"]] == ["open", "half_open", "closed"]
    a.breaker_transition(transition("qwen-image", CLOSED, OPEN, clock()))
    clock.advance(20)
    a.breaker_transition(transition("qwen-image", OPEN, CLOSED, clock()))
    assert a.mttr_s() == 30.0


def test_incident_needs_healthy_model_to_close() -> None:
    """An incident stays open until the breaker is CLOSED and the model healthy again."""
    a, clock = make()
    a.model_health("wan-i2v", "down")
    a.breaker_transition(transition("wan-i2v", CLOSED, OPEN, clock()))
    clock.advance(5)
    a.breaker_transition(transition("wan-i2v", OPEN, CLOSED, clock()))
    assert len(a.incidents_summary()["open"]) == 1
    clock.advance(5)
    a.model_health("wan-i2v", "healthy")
    summary = a.incidents_summary()
    assert (
        summary["open"] == []
        and summary["recent"][0]["duration_s"] == 10
        and summary["recent"][0]["cause"] == "model down"
    )


async def test_recovery_runs_are_events_in_the_incident() -> None:
    """Recovery runs dispatched during an incident are listed in it, not as incidents."""
    a, clock = make()
    rec = RecoveryRegistry(clock=clock, listeners=[a.record_recovery_run])

    async def free_cache(ctx: object) -> None:
        clock.advance(2)

    rec.register(RecoveryEvent.BREAKER_OPENED, "free_cache", free_cache)
    a.breaker_transition(transition("wan-t2v", CLOSED, OPEN, clock()))
    await rec.dispatch(RecoveryEvent.BREAKER_OPENED, model="wan-t2v")
    clock.advance(8)
    a.breaker_transition(transition("wan-t2v", OPEN, CLOSED, clock()))
    (inc,) = a.incidents()
    assert [(r["procedure"], r["outcome"], r["duration_s"]) for r in inc["recovery"]] == [
        ("free_cache", "succeeded", 2.0)
    ]
    assert inc["duration_s"] == 10 and a.mttr_s() == 10


def test_run_outside_incident_is_kept_apart() -> None:
    """A run with no open incident is reported separately."""
    a, clock = make()
    a.record_recovery_run(
        RecoveryRun("free_cache", "out_of_memory", "wan-t2v", clock(), clock() + 1, "succeeded")
    )
    assert a.incidents() == [] and len(a.report()["recovery_runs_outside_incidents"]) == 1


def test_breaker_listener_wiring() -> None:
    """Wired as a registry listener, a real breaker opening opens an incident."""
    a, clock = make()
    reg = BreakerRegistry(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1),
        clock=clock,
        listeners=[a.breaker_transition],
    )
    reg.record_failure("hunyuan-video", "replica_failure")
    assert a.incidents_summary()["open"][0]["model"] == "hunyuan-video"


def test_report_is_json_with_top_errors_and_hints() -> None:
    """report() is JSON-serializable, with top error kinds ordered by count and an OOM hint naming model and shape."""
    a, clock = make()
    shape = shape_of({"width": 832, "height": 480, "num_frames": 81})
    for _ in range(5):
        a.record_attempt("wan-t2v", "out_of_memory", workflow="text-to-video", shape=shape)
    for _ in range(2):
        a.record_attempt("hunyuan-video", "timeout", workflow="text-to-video", shape="1280x720x129")
    a.record_request("text-to-video", "deadline_exceeded", errors=2)
    a.breaker_transition(transition("wan-t2v", CLOSED, OPEN, clock()))
    report = json.loads(json.dumps(a.report()))
    assert set(report) >= {"windows", "recovery_rate", "incidents", "mttr_s", "top_errors"}
    top = report["top_errors"]
    assert [t["kind"] for t in top] == ["out_of_memory", "timeout", "deadline_exceeded"]
    assert top[0]["count"] == 5 and top[0]["models"] == {"wan-t2v": 5}
    assert top[0]["hint"].startswith("OOM on wan-t2v at 832x480x81: lower max_frames")
    assert "hunyuan-video at 1280x720x129" in top[1]["hint"]
    assert report["incidents"][0]["closed_at"] is None


@pytest.mark.parametrize(
    "kind",
    [
        "timeout",
        "replica_failure",
        "backpressure",
        "bad_output",
        "circuit_open",
        "model_unavailable",
        "fallback_exhausted",
        "unknown",
    ],
)
def test_every_kind_has_a_hint(kind: str) -> None:
    """Each kind's hint names the model when one is given."""
    assert "wan-t2v" in hint_for(kind, "wan-t2v")


def test_million_events_bounded_memory() -> None:
    """A million events over three hours, with 2000 model names, keep at most 60 buckets of capped size."""
    clock = FakeClock(start=0.0)
    a = ErrorAnalytics(clock=clock, max_keys_per_bucket=256)
    models = [f"model-{i}" for i in range(2000)]
    kinds = [None, None, None, "timeout", "out_of_memory"]
    rec = a.record_attempt
    for i in range(1_000_000):
        if i % 1000 == 0:
            clock.now += 10.8  # 1000 windows of 10.8 s: three hours
        rec(models[i % 2000], kinds[i % 5], workflow="text-to-video")
    mem = a.memory_footprint()
    assert mem["buckets"] <= 60
    assert mem["max_keys_in_a_bucket"] <= 256 + 3 + 1
    assert a.total_attempts == 1_000_000
    last_hour = a.counts(60)["attempts"]["total"]
    assert 330_000 <= last_hour <= 336_000  # ~1/3 of the events fall in the last hour
    assert "_other" in a.counts(60)["attempts"]["by_model"]


def test_incident_log_bounded() -> None:
    """Closed incidents are kept up to max_incidents."""
    clock = FakeClock()
    a = ErrorAnalytics(clock=clock, max_incidents=10)
    for i in range(50):
        a.breaker_transition(transition(f"m{i}", CLOSED, OPEN, clock()))
        a.breaker_transition(transition(f"m{i}", OPEN, CLOSED, clock()))
    assert a.memory_footprint()["closed_incidents"] == 10 and len(a.incidents()) == 10


def test_shape_of() -> None:
    """shape_of renders WxH or WxHxF."""
    assert shape_of({"width": 64, "height": 32}) == "64x32"
    assert shape_of({"width": 64, "height": 32, "num_frames": 9}) == "64x32x9"
    assert shape_of(None) is None
