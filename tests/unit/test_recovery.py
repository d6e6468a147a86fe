"""Recovery procedures: event dispatch, per-procedure cooldowns, run records."""

from __future__ import annotations

import asyncio

import pytest

from resilience import (
    ConfigError,
    FakeClock,
    RecoveryContext,
    RecoveryEvent,
    RecoveryRegistry,
    RecoveryRun,
)

pytestmark = pytest.mark.unit


def registry(**kw: object) -> tuple[RecoveryRegistry, FakeClock, list[RecoveryContext]]:
    clock = FakeClock()
    seen: list[RecoveryContext] = []
    reg = RecoveryRegistry(clock=clock, **kw)  # type: ignore[arg-type]
    return reg, clock, seen


async def test_dispatch_runs_and_records() -> None:
    """A dispatched event runs its procedure with the context and records start, end and outcome."""
    reg, clock, seen = registry()

    async def free_cache(ctx: RecoveryContext) -> None:
        seen.append(ctx)
        clock.advance(1.5)

    reg.register(RecoveryEvent.OUT_OF_MEMORY, "free_cache", free_cache)
    start = clock()
    (run,) = await reg.dispatch("out_of_memory", model="wan-t2v", detail={"shape": "832x480x81"})
    assert (run.procedure, run.event, run.model, run.outcome) == (
        "free_cache",
        "out_of_memory",
        "wan-t2v",
        "succeeded",
    )
    assert (run.started_at, run.ended_at, run.duration_s) == (start, start + 1.5, 1.5)
    assert seen[0].event is RecoveryEvent.OUT_OF_MEMORY and seen[0].detail == {
        "shape": "832x480x81"
    }
    assert reg.runs() == [run]
    assert RecoveryRun.from_dict(run.to_dict()) == run


async def test_cooldown_per_procedure_and_model() -> None:
    """Within cooldown_s a procedure is skipped for that model; other models and later times run."""
    reg, clock, _ = registry()
    count = {"n": 0}

    async def proc(ctx: RecoveryContext) -> None:
        count["n"] += 1

    reg.register(RecoveryEvent.BREAKER_OPENED, "restart", proc, cooldown_s=60)
    assert len(await reg.dispatch(RecoveryEvent.BREAKER_OPENED, model="a")) == 1
    clock.advance(30)
    assert await reg.dispatch(RecoveryEvent.BREAKER_OPENED, model="a") == []
    assert reg.cooling_down("restart", "a") == pytest.approx(30)
    assert len(await reg.dispatch(RecoveryEvent.BREAKER_OPENED, model="b")) == 1
    clock.advance(30)
    assert len(await reg.dispatch(RecoveryEvent.BREAKER_OPENED, model="a")) == 1
    assert count["n"] == 3 and reg.stats()["skipped_cooldown"] == 1


async def test_failure_recorded_and_next_still_runs() -> None:
    """A failing procedure is recorded as failed and the next procedure still runs, in order."""
    reg, _, _ = registry()
    order: list[str] = []

    async def bad(ctx: RecoveryContext) -> None:
        order.append("bad")
        raise RuntimeError("device busy")

    async def good(ctx: RecoveryContext) -> None:
        order.append("good")

    reg.register(RecoveryEvent.MODEL_UNHEALTHY, "bad", bad)
    reg.register(RecoveryEvent.MODEL_UNHEALTHY, "good", good)
    runs = await reg.dispatch(RecoveryEvent.MODEL_UNHEALTHY, model="qwen-image")
    assert order == ["bad", "good"] and reg.procedures("model_unhealthy") == ["bad", "good"]
    assert [(r.outcome, r.error) for r in runs] == [
        ("failed", "RuntimeError: device busy"),
        ("succeeded", None),
    ]
    assert reg.stats() == {
        "runs": 2,
        "succeeded": 1,
        "failed": 1,
        "timed_out": 0,
        "skipped_cooldown": 0,
    }


async def test_timeout_recorded() -> None:
    """A procedure exceeding timeout_s is stopped and recorded as timed_out."""
    reg, _, _ = registry()

    async def hang(ctx: RecoveryContext) -> None:
        await asyncio.sleep(10)

    reg.register(RecoveryEvent.BACKPRESSURE_SUSTAINED, "scale", hang, timeout_s=0.01)
    (run,) = await reg.dispatch(RecoveryEvent.BACKPRESSURE_SUSTAINED)
    assert run.outcome == "timed_out"


async def test_listeners_receive_runs() -> None:
    """Run listeners (analytics) receive every run."""
    got: list[RecoveryRun] = []
    reg, _, _ = registry(listeners=[got.append])

    async def proc(ctx: RecoveryContext) -> None:
        return None

    reg.register(RecoveryEvent.OUT_OF_MEMORY, "p", proc, cooldown_s=0)
    for _ in range(3):
        await reg.dispatch(RecoveryEvent.OUT_OF_MEMORY, model="m")
    assert len(got) == 3


async def test_runs_bounded() -> None:
    """Only the last max_runs runs are kept."""
    reg, _, _ = registry(max_runs=5)

    async def proc(ctx: RecoveryContext) -> None:
        return None

    reg.register(RecoveryEvent.OUT_OF_MEMORY, "p", proc, cooldown_s=0)
    for _ in range(20):
        await reg.dispatch(RecoveryEvent.OUT_OF_MEMORY)
    assert len(reg.runs()) == 5 and len(reg.runs(limit=2)) == 2


async def test_cancellation_propagates() -> None:
    """Cancelling a dispatch cancels the running procedure instead of recording it."""
    reg, _, _ = registry()
    started = asyncio.Event()

    async def hang(ctx: RecoveryContext) -> None:
        started.set()
        await asyncio.sleep(10)

    reg.register(RecoveryEvent.OUT_OF_MEMORY, "hang", hang)
    task = asyncio.create_task(reg.dispatch(RecoveryEvent.OUT_OF_MEMORY))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reg.runs() == []


async def test_event_without_procedures() -> None:
    """An event with nothing registered runs nothing."""
    reg, _, _ = registry()
    assert await reg.dispatch(RecoveryEvent.MODEL_UNHEALTHY, model="x") == []


def test_registration_errors() -> None:
    """Unknown events, duplicate names and negative cooldowns are ConfigErrors."""
    reg, _, _ = registry()

    async def proc(ctx: RecoveryContext) -> None:
        return None

    with pytest.raises(ConfigError, match="unknown recovery event"):
        reg.register("meteor_strike", "p", proc)
    reg.register(RecoveryEvent.OUT_OF_MEMORY, "p", proc)
    with pytest.raises(ConfigError, match="already registered"):
        reg.register(RecoveryEvent.OUT_OF_MEMORY, "p", proc)
    with pytest.raises(ConfigError) as info:
        reg.register(RecoveryEvent.OUT_OF_MEMORY, "q", proc, cooldown_s=-1)
    assert info.value.key == "recovery.q"
