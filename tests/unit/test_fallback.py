"""Fallback chains: validation, skipping OPEN steps, retries, total bound, retry budget."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from resilience import (
    Backpressure,
    BreakerConfig,
    BreakerRegistry,
    BreakerState,
    ChainResult,
    ConfigError,
    DeadlineExceeded,
    FakeClock,
    FallbackChain,
    FallbackExecutor,
    FallbackExhausted,
    InternalError,
    InvalidRequest,
    ModelError,
    ModelUnavailable,
    OutOfMemory,
    ReplicaFailure,
    RetryBudget,
    RetryBudgetExhausted,
    RetryBudgetPolicy,
    RetryPolicy,
    build_chains,
)

pytestmark = pytest.mark.unit

MODELS = ["qwen-image", "newbie-image", "wan-t2v", "hunyuan-video"]
FAST = RetryPolicy(max_attempts=3, initial_backoff_s=0.01, jitter=0.0)


class Script:
    """A fake model call: per-step queues of errors; a step with an empty queue succeeds."""

    def __init__(
        self,
        plan: dict[str, list[BaseException]] | None = None,
        clock: FakeClock | None = None,
        cost_s: float = 0.0,
    ):
        self.plan = {k: list(v) for k, v in (plan or {}).items()}
        self.calls: list[tuple[str, int]] = []
        self.params: list[Any] = []
        self.clock = clock
        self.cost_s = cost_s

    async def __call__(self, step: str, attempt_no: int, params: Any) -> str:
        self.calls.append((step, attempt_no))
        self.params.append(params)
        if self.clock is not None:
            self.clock.advance(self.cost_s)
        queue = self.plan.get(step, [])
        if queue:
            raise (
                queue.pop(0)
                if len(queue) > 1 or not isinstance(queue[0], _Always)
                else queue[0].err
            )
        return f"image from {step}"


class _Always(Exception):
    def __init__(self, err: BaseException) -> None:
        super().__init__()
        self.err = err


def always(err: BaseException) -> list[BaseException]:
    return [_Always(err)]


def executor(clock: FakeClock, **kw: Any) -> FallbackExecutor:
    kw.setdefault("retry", FAST)
    return FallbackExecutor(clock=clock, sleep=clock.sleep, **kw)


# ---------------------------------------------------------------- validation
def test_build_chains_flattens_references() -> None:
    """A chain naming another chain splices its steps in place."""
    chains = build_chains(
        {"video": ["hunyuan-video", "video-fallback"], "video-fallback": ["wan-t2v"]}, MODELS
    )
    assert chains["video"].steps == ("hunyuan-video", "wan-t2v")
    assert chains["video"].primary == "hunyuan-video"


def test_build_chains_accepts_step_objects() -> None:
    """Steps given as {'model': ...} mappings are read by their model key."""
    chains = build_chains({"t2i": [{"model": "qwen-image"}, "newbie-image"]}, MODELS)
    assert list(chains["t2i"]) == ["qwen-image", "newbie-image"]


@pytest.mark.parametrize(
    ("chains", "key", "words"),
    [
        ({"t2i": ["qwen-image", "flux"]}, "workflows.t2i[1]", "unknown step 'flux'"),
        (
            {"t2i": ["qwen-image", "qwen-image"]},
            "workflows.t2i[1]",
            "'qwen-image' already in chain",
        ),
        ({"t2i": []}, "workflows.t2i", "empty fallback chain"),
        ({"a": ["qwen-image", "b"], "b": ["wan-t2v", "a"]}, "workflows.a", "cycle a -> b -> a"),
        ({"a": ["qwen-image", "b"], "b": ["qwen-image"]}, "workflows.a[1]", "via chain 'b'"),
        ({"wan-t2v": ["qwen-image"]}, "workflows.wan-t2v", "both a step and a chain"),
    ],
)
def test_build_chains_errors_name_the_key(
    chains: dict[str, list[str]], key: str, words: str
) -> None:
    """Unknown, duplicate, empty, cyclic and ambiguous chains fail naming the key."""
    with pytest.raises(ConfigError) as info:
        build_chains(chains, MODELS)
    assert info.value.key == key
    assert words in info.value.message


def test_chain_rejects_duplicates_directly() -> None:
    """FallbackChain itself refuses a duplicate step."""
    with pytest.raises(ConfigError, match="appears twice"):
        FallbackChain("x", ("a", "b", "a"))


def test_starting_with_pins_and_strict() -> None:
    """A pinned model goes first, the rest follow; strict keeps only it."""
    chain = FallbackChain("t2v", ("hunyuan-video", "wan-t2v"))
    assert chain.starting_with("wan-t2v").steps == ("wan-t2v", "hunyuan-video")
    assert chain.starting_with("wan-t2v", strict=True).steps == ("wan-t2v",)


# ----------------------------------------------------------------- execution
async def test_primary_serves() -> None:
    """A healthy primary serves at depth 0 with one call."""
    clock = FakeClock()
    call = Script()
    result = await executor(clock).execute(["qwen-image", "newbie-image"], call, {"w": 1})
    assert (result.value, result.model, result.fallback_depth, result.calls) == (
        "image from qwen-image",
        "qwen-image",
        0,
        1,
    )
    assert result.headers() == {"X-Model": "qwen-image", "X-Attempts": "1", "X-Fallback-Depth": "0"}


async def test_retries_then_falls_back() -> None:
    """A primary failing all retries hands over to the fallback; attempts are listed in order."""
    clock = FakeClock()
    call = Script({"qwen-image": always(ReplicaFailure("died"))})
    result = await executor(clock).execute(["qwen-image", "newbie-image"], call, None)
    assert call.calls == [
        ("qwen-image", 1),
        ("qwen-image", 2),
        ("qwen-image", 3),
        ("newbie-image", 1),
    ]
    assert result.fallback_depth == 1
    assert [(a.model, a.kind, a.attempt) for a in result.attempts] == [
        ("qwen-image", "replica_failure", 1),
        ("qwen-image", "replica_failure", 2),
        ("qwen-image", "replica_failure", 3),
        ("newbie-image", None, 1),
    ]
    assert clock.sleeps == [0.01, 0.02]


async def test_open_step_skipped_for_free() -> None:
    """An OPEN primary is skipped without a call and without spending retry budget."""
    clock = FakeClock()
    reg = BreakerRegistry(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1), clock=clock
    )
    reg.get("qwen-image").force_open("test")
    budget = RetryBudget(RetryBudgetPolicy(min_retries=0, max_retry_ratio=0.0), clock=clock)
    call = Script()
    result = await executor(clock, gate=reg, budget=budget).execute(
        ["qwen-image", "newbie-image"], call, None
    )
    assert call.calls == [("newbie-image", 1)]
    assert result.skipped == ("qwen-image",) and result.calls == 1
    assert budget.stats()["retries"] == 0 and budget.stats()["denied"] == 0


async def test_max_total_attempts_bounds_whole_chain() -> None:
    """However many steps and retries, no more than max_total_attempts calls are made."""
    clock = FakeClock()
    call = Script({m: always(ModelError()) for m in MODELS})
    with pytest.raises(FallbackExhausted) as info:
        await executor(clock, max_total_attempts=4).execute(MODELS, call, None)
    assert len(call.calls) == 4
    assert call.calls == [
        ("qwen-image", 1),
        ("qwen-image", 2),
        ("qwen-image", 3),
        ("newbie-image", 1),
    ]
    assert info.value.detail["max_total_attempts_reached"] is True
    assert [a.model for a in info.value.attempts] == [c[0] for c in call.calls]


async def test_exhausted_lists_every_attempt_in_order() -> None:
    """FallbackExhausted (503) lists calls and skips in order with kinds and messages."""
    clock = FakeClock()
    reg = BreakerRegistry(clock=clock)
    reg.get("newbie-image").force_open("test")
    call = Script({"qwen-image": always(ModelError("nan loss")), "wan-t2v": [Backpressure("full")]})
    with pytest.raises(FallbackExhausted) as info:
        await executor(clock, retry=RetryPolicy(max_attempts=2, jitter=0.0), gate=reg).execute(
            ["qwen-image", "newbie-image", "wan-t2v"], call, None
        )
    err = info.value
    assert err.http_status == 503
    assert [(a.model, a.kind, a.called) for a in err.attempts] == [
        ("qwen-image", "model_error", True),
        ("qwen-image", "model_error", True),
        ("newbie-image", "circuit_open", False),
        ("wan-t2v", "backpressure", True),
    ]
    assert err.attempts[0].message == "nan loss"
    assert "qwen-image: model_error after 2 call(s)" in err.message


async def test_backpressure_moves_on_without_retry_or_breaker_failure() -> None:
    """Backpressure goes straight to the next step and never counts against the breaker."""
    clock = FakeClock()
    reg = BreakerRegistry(
        BreakerConfig(fail_max=1, minimum_calls=1, window_size_calls=1), clock=clock
    )
    call = Script({"qwen-image": always(Backpressure())})
    result = await executor(clock, gate=reg).execute(["qwen-image", "newbie-image"], call, None)
    assert call.calls == [("qwen-image", 1), ("newbie-image", 1)]
    assert result.model == "newbie-image" and reg.state("qwen-image") is BreakerState.CLOSED


async def test_model_unavailable_moves_on() -> None:
    """A step with no running replica is left at once for the next."""
    clock = FakeClock()
    call = Script({"qwen-image": always(ModelUnavailable())})
    result = await executor(clock).execute(["qwen-image", "newbie-image"], call, None)
    assert len(call.calls) == 2 and result.fallback_depth == 1


async def test_failures_open_the_breaker_and_later_requests_skip_it() -> None:
    """Failures reported through the gate open the primary's breaker; later requests skip it."""
    clock = FakeClock()
    reg = BreakerRegistry(BreakerConfig(fail_max=3, minimum_calls=50), clock=clock)
    ex = executor(clock, gate=reg, retry=RetryPolicy(max_attempts=1))
    call = Script({"qwen-image": always(ModelError())})
    for _ in range(3):
        await ex.execute(["qwen-image", "newbie-image"], call, None)
    assert reg.state("qwen-image") is BreakerState.OPEN
    call.calls.clear()
    await ex.execute(["qwen-image", "newbie-image"], call, None)
    assert call.calls == [("newbie-image", 1)]


async def test_half_open_without_permit_is_skipped() -> None:
    """A HALF_OPEN step whose probe permits are taken is skipped."""
    clock = FakeClock()
    reg = BreakerRegistry(BreakerConfig(half_open_permits=1), clock=clock)
    reg.get("qwen-image").half_open()
    held = reg.try_acquire("qwen-image")
    assert held is not None
    call = Script()
    result = await executor(clock, gate=reg).execute(["qwen-image", "newbie-image"], call, None)
    assert result.model == "newbie-image" and result.skipped == ("qwen-image",)


async def test_successful_probe_closes_breaker() -> None:
    """A HALF_OPEN primary given a probe that succeeds serves and closes."""
    clock = FakeClock()
    reg = BreakerRegistry(BreakerConfig(half_open_permits=1), clock=clock)
    reg.get("qwen-image").half_open()
    result = await executor(clock, gate=reg).execute(["qwen-image", "newbie-image"], Script(), None)
    assert result.model == "qwen-image" and reg.state("qwen-image") is BreakerState.CLOSED


async def test_retry_budget_spent_only_by_repeats() -> None:
    """The first call to each step is free; only retries spend the budget."""
    clock = FakeClock()
    budget = RetryBudget(
        RetryBudgetPolicy(window_s=10, max_retry_ratio=0.0, min_retries=1), clock=clock
    )
    ex = executor(clock, budget=budget)
    call = Script({"qwen-image": always(ModelError()), "newbie-image": [ModelError()]})
    await ex.execute(["qwen-image", "newbie-image", "wan-t2v"], call, None)
    # qwen 1 (free), qwen 2 (spends the only retry), qwen 3 denied -> newbie 1 (free),
    # newbie retry denied -> wan-t2v 1 (free) serves.
    assert call.calls == [("qwen-image", 1), ("qwen-image", 2), ("newbie-image", 1), ("wan-t2v", 1)]
    assert budget.stats()["retries"] == 1 and budget.stats()["denied"] == 2


async def test_outage_of_primary_served_in_full_by_fallback() -> None:
    """With a zero budget, a failing primary is still served by the fallback on every request."""
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(max_retry_ratio=0.0, min_retries=0), clock=clock)
    ex = executor(clock, budget=budget)
    call = Script({"qwen-image": always(ReplicaFailure())})
    results = [await ex.execute(["qwen-image", "newbie-image"], call, None) for _ in range(20)]
    assert all(r.model == "newbie-image" for r in results) and len(call.calls) == 40


async def test_budget_exhausted_final_error() -> None:
    """When the budget cut retries and every step failed, the error is RetryBudgetExhausted (503)."""
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(max_retry_ratio=0.0, min_retries=0), clock=clock)
    call = Script({m: always(ModelError()) for m in MODELS})
    with pytest.raises(RetryBudgetExhausted) as info:
        await executor(clock, budget=budget).execute(["qwen-image", "newbie-image"], call, None)
    assert info.value.http_status == 503 and len(info.value.attempts) == 2


async def test_budget_fail_fast_mode() -> None:
    """With on_budget_exhausted='fail' a denied retry ends the request at once."""
    clock = FakeClock()
    budget = RetryBudget(RetryBudgetPolicy(max_retry_ratio=0.0, min_retries=0), clock=clock)
    call = Script({"qwen-image": always(ModelError())})
    with pytest.raises(RetryBudgetExhausted):
        await executor(clock, budget=budget, on_budget_exhausted="fail").execute(
            ["qwen-image", "newbie-image"], call, None
        )
    assert call.calls == [("qwen-image", 1)]


def test_retry_budget_window_slides() -> None:
    """The allowance is max(min_retries, ratio * requests) and frees up after window_s."""
    clock = FakeClock()
    budget = RetryBudget(
        RetryBudgetPolicy(window_s=10, max_retry_ratio=0.5, min_retries=1), clock=clock
    )
    for _ in range(4):
        budget.record_request()
    assert budget.allowance() == 2
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    clock.advance(11)
    assert budget.stats() == {"requests": 0, "retries": 0, "denied": 0, "remaining": 1}
    assert budget.try_spend() is True


async def test_caller_error_ends_request() -> None:
    """An InvalidRequest from a step is raised at once, with attempts, and no fallback is tried."""
    clock = FakeClock()
    call = Script({"qwen-image": [InvalidRequest("height must be a multiple of 16")]})
    with pytest.raises(InvalidRequest) as info:
        await executor(clock).execute(["qwen-image", "newbie-image"], call, None)
    assert call.calls == [("qwen-image", 1)] and len(info.value.attempts) == 1


async def test_deadline_exceeded_504() -> None:
    """Steps that use up the deadline end in DeadlineExceeded (504) listing the attempts."""
    clock = FakeClock()
    call = Script({m: always(ModelError()) for m in MODELS}, clock=clock, cost_s=1.0)
    with pytest.raises(DeadlineExceeded) as info:
        await executor(
            clock, retry=RetryPolicy(max_attempts=2, initial_backoff_s=0.1, jitter=0.0)
        ).execute(MODELS, call, None, deadline_s=2.5)
    assert info.value.http_status == 504
    # qwen 1 (t=1), retry needs 0.1 + 1.0 -> fits (t=2.1); newbie 1 starts (t=3.1) ... deadline passed.
    assert [a.model for a in info.value.attempts] == ["qwen-image", "qwen-image", "newbie-image"]
    assert clock.now - 1_000_000.0 == pytest.approx(3.1)


async def test_oom_retries_once_smaller() -> None:
    """After an OOM, on_oom's smaller parameters get one more call on the same step."""
    clock = FakeClock()
    call = Script({"wan-t2v": [OutOfMemory("CUDA OOM")]})
    seen: list[tuple[str, dict[str, int]]] = []

    def on_oom(step: str, params: dict[str, int], err: OutOfMemory) -> dict[str, int]:
        seen.append((step, params))
        return {**params, "num_frames": 49}

    result: ChainResult[str, dict[str, int]] = await executor(clock).execute(
        ["wan-t2v", "hunyuan-video"], call, {"num_frames": 81}, on_oom=on_oom
    )
    assert call.calls == [("wan-t2v", 1), ("wan-t2v", 2)]
    assert call.params == [{"num_frames": 81}, {"num_frames": 49}]
    assert result.params == {"num_frames": 49} and seen == [("wan-t2v", {"num_frames": 81})]


async def test_oom_without_hook_moves_on() -> None:
    """Without on_oom an OOM is not retried as-is; the next step is tried."""
    clock = FakeClock()
    call = Script({"wan-t2v": [OutOfMemory()]})
    result = await executor(clock).execute(["wan-t2v", "hunyuan-video"], call, None)
    assert call.calls == [("wan-t2v", 1), ("hunyuan-video", 1)] and result.model == "hunyuan-video"


async def test_adapt_gives_per_step_params() -> None:
    """adapt(step, params) supplies each step's parameters."""
    clock = FakeClock()
    call = Script({"qwen-image": [Backpressure()]})
    adapt: Callable[[str, dict[str, Any]], dict[str, Any]] = lambda step, p: {**p, "for": step}  # noqa: E731
    await executor(clock).execute(["qwen-image", "newbie-image"], call, {"w": 64}, adapt=adapt)
    assert call.params == [{"w": 64, "for": "qwen-image"}, {"w": 64, "for": "newbie-image"}]


async def test_untranslated_exception_is_internal_error() -> None:
    """A foreign exception from the call is a bug: InternalError with the cause chained."""
    clock = FakeClock()
    boom = KeyError("oops")
    call = Script({"qwen-image": [boom]})
    with pytest.raises(InternalError) as info:
        await executor(clock).execute(["qwen-image", "newbie-image"], call, None)
    assert info.value.__cause__ is boom and len(call.calls) == 1


async def test_cancellation_propagates_and_releases_permit() -> None:
    """Cancelling a request propagates CancelledError and hands back the HALF_OPEN permit."""
    clock = FakeClock()
    reg = BreakerRegistry(BreakerConfig(half_open_permits=1), clock=clock)
    reg.get("qwen-image").half_open()
    started = asyncio.Event()

    async def hang(step: str, n: int, params: Any) -> str:
        started.set()
        await asyncio.sleep(10)
        return "never"

    task = asyncio.create_task(executor(clock, gate=reg).execute(["qwen-image"], hang, None))
    await started.wait()
    assert not reg.allows("qwen-image")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reg.allows("qwen-image") and reg.state("qwen-image") is BreakerState.HALF_OPEN


async def test_step_policy_override() -> None:
    """step_policies give a step its own retry policy."""
    clock = FakeClock()
    call = Script({"qwen-image": always(ModelError())})
    ex = executor(clock, step_policies={"qwen-image": RetryPolicy(max_attempts=1)})
    await ex.execute(["qwen-image", "newbie-image"], call, None)
    assert call.calls == [("qwen-image", 1), ("newbie-image", 1)]


async def test_on_attempt_hook_sees_each_record() -> None:
    """on_attempt receives every attempt record as it happens."""
    clock = FakeClock()
    seen: list[tuple[str, str | None]] = []
    call = Script({"qwen-image": [ModelError()]})
    await executor(clock).execute(
        ["qwen-image"], call, None, on_attempt=lambda r: seen.append((r.model, r.kind))
    )
    assert seen == [("qwen-image", "model_error"), ("qwen-image", None)]


async def test_all_open_gives_retry_after() -> None:
    """When every step is OPEN, FallbackExhausted carries the soonest Retry-After."""
    clock = FakeClock()
    reg = BreakerRegistry(BreakerConfig(wait_in_open_s=30.0), clock=clock)
    reg.get("qwen-image").force_open("test")
    clock.advance(10)
    reg.get("newbie-image").force_open("test")
    call = Script()
    with pytest.raises(FallbackExhausted) as info:
        await executor(clock, gate=reg).execute(["qwen-image", "newbie-image"], call, None)
    assert call.calls == [] and info.value.retry_after_s == pytest.approx(20.0)
    assert [a.called for a in info.value.attempts] == [False, False]
