"""Fallback chains: ordered steps (models) tried in turn, with retries and budgets.

Build chains from config with :func:`build_chains` (validated: unknown step,
duplicate step, cycle through chains that reference other chains, empty
chain; each a :class:`~resilience.errors.ConfigError` naming the key), then
run a request through one with :meth:`FallbackExecutor.execute`::

    executor = FallbackExecutor(retry=RetryPolicy(max_attempts=2), max_total_attempts=4,
                                gate=breakers, budget=RetryBudget(clock=time.monotonic))
    result = await executor.execute(chains["text-to-image"], call, params, deadline_s=30)
    result.value, result.model, result.attempts

where ``call(step_name, attempt_no, params)`` is the router's async model
call (``attempt_no`` is 1-based per step). For each step in order:

- a step whose breaker does not admit the call is skipped, free;
- the step is called and retriable errors are retried with the step's
  :class:`~resilience.retry.RetryPolicy`, inside the request deadline;
- a :class:`~resilience.errors.StepUnavailable` error (backpressure, no
  replica, no permit) or an exhausted retry moves on to the next step;
- :class:`~resilience.errors.OutOfMemory` is retried once with the smaller
  parameters ``on_oom`` returns (if given), then moves on;
- caller errors, cancellation and bugs end the request at once.

One request never makes more than ``max_total_attempts`` model calls in
all. A retry (any repeat call to a step already called in this request)
spends the sliding-window :class:`RetryBudget`; the first call to each step
and skipping a step are free. When the budget is spent the chain moves on
(or, with ``on_budget_exhausted="fail"``, fails at once with
:class:`~resilience.errors.RetryBudgetExhausted`). Final failure raises
:class:`~resilience.errors.FallbackExhausted` (or ``DeadlineExceeded`` /
``RetryBudgetExhausted``) carrying every attempt in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from ._util import Clock, RollingCounts, build_policy, require
from .breaker import BreakerGate, Permit
from .errors import (
    AttemptRecord,
    Cancelled,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    FallbackExhausted,
    GenGuardError,
    InternalError,
    OutOfMemory,
    RetryBudgetExhausted,
)
from .retry import AttemptEvent, Retrier, RetryPolicy

__all__ = [
    "ChainResult",
    "FallbackChain",
    "FallbackExecutor",
    "RetryBudget",
    "RetryBudgetPolicy",
    "StepCall",
    "build_chains",
]

T = TypeVar("T")
P = TypeVar("P")

StepCall = Callable[[str, int, P], Awaitable[T]]
"""``async call(step_name, attempt_no, params) -> value``."""


@dataclass(frozen=True, slots=True)
class FallbackChain:
    """A validated, flattened, ordered chain of step names (first = primary)."""

    name: str
    steps: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError(f"{self.name}: empty fallback chain", key=self.name)
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if not step:
                raise ConfigError(f"{self.name}[{i}]: empty step name", key=f"{self.name}[{i}]")
            if step in seen:
                raise ConfigError(
                    f"{self.name}[{i}]: step {step!r} appears twice", key=f"{self.name}[{i}]"
                )
            seen.add(step)

    def __iter__(self) -> Iterator[str]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def primary(self) -> str:
        """The first step."""
        return self.steps[0]

    def starting_with(self, step: str, *, strict: bool = False) -> FallbackChain:
        """The chain with ``step`` pinned first (a request's ``model``);
        ``strict`` keeps only that step (``"fallback": "strict"``)."""
        if strict:
            return FallbackChain(self.name, (step,))
        return FallbackChain(self.name, (step, *(s for s in self.steps if s != step)))


def _step_name(raw: Any) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, Mapping) and "model" in raw:
        return str(raw["model"])
    model = getattr(raw, "model", None)
    if isinstance(model, str):
        return model
    raise ConfigError(f"step {raw!r} is not a step name")


def build_chains(
    chains: Mapping[str, Sequence[Any]],
    known_steps: Iterable[str],
    *,
    path: str = "workflows",
) -> dict[str, FallbackChain]:
    """Validate and flatten chain definitions.

    Each entry of a chain is a known step name (a model key; a mapping or
    object with a ``model`` field is accepted too) or the name of another
    chain, whose steps are spliced in at that place. Errors
    (:class:`ConfigError`, key ``path.chain[i]``): empty chain, unknown step,
    a name that is both a step and a chain, the same step twice (directly or
    through a referenced chain), a cycle of chain references.
    """
    known = set(known_steps)
    defs = {name: [_step_name(s) for s in steps] for name, steps in chains.items()}
    for name in defs:
        if name in known:
            raise ConfigError(
                f"{path}.{name}: name is both a step and a chain", key=f"{path}.{name}"
            )
    flat: dict[str, tuple[str, ...]] = {}

    def expand(name: str, stack: list[str]) -> tuple[str, ...]:
        if name in flat:
            return flat[name]
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            raise ConfigError(f"{path}.{stack[0]}: chain cycle {cycle}", key=f"{path}.{name}")
        steps = defs[name]
        if not steps:
            raise ConfigError(f"{path}.{name}: empty fallback chain", key=f"{path}.{name}")
        out: list[str] = []
        origin: dict[str, str] = {}
        for i, step in enumerate(steps):
            where = f"{path}.{name}[{i}]"
            if step in defs:
                expanded = expand(step, [*stack, name])
                via = f" via chain {step!r}"
            elif step in known:
                expanded = (step,)
                via = ""
            else:
                raise ConfigError(
                    f"{where}: unknown step {step!r}; known: {', '.join(sorted(known))}",
                    key=where,
                )
            for s in expanded:
                if s in origin:
                    raise ConfigError(
                        f"{where}: step {s!r}{via} already in chain {name!r} "
                        f"({origin[s]}); a step may appear once",
                        key=where,
                    )
                origin[s] = where
                out.append(s)
        flat[name] = tuple(out)
        return flat[name]

    return {name: FallbackChain(name, expand(name, [])) for name in defs}


@dataclass(frozen=True, slots=True)
class RetryBudgetPolicy:
    """Retries allowed over a sliding ``window_s``: ``max(min_retries,
    max_retry_ratio * requests in the window)`` (Envoy's retry budget)."""

    window_s: float = 10.0
    max_retry_ratio: float = 0.2
    min_retries: int = 3

    def __post_init__(self) -> None:
        require(self.window_s > 0, "window_s", "must be > 0")
        require(self.max_retry_ratio >= 0, "max_retry_ratio", "must be >= 0")
        require(self.min_retries >= 0, "min_retries", "must be >= 0")

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | object | None, path: str = "retry_budget"
    ) -> RetryBudgetPolicy:
        """Build from a config mapping; errors name ``path.key``."""
        return build_policy(cls, data, path)


class RetryBudget:
    """A sliding-window retry budget (one per router replica).

    :meth:`record_request` counts a request; :meth:`try_spend` asks for one
    repeat call and returns False once the window's allowance is used.
    """

    _REQ = 0
    _RETRY = 1
    _DENIED = 2

    def __init__(
        self, policy: RetryBudgetPolicy | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        self.policy = policy or RetryBudgetPolicy()
        self._rc = RollingCounts(self.policy.window_s, 3, clock, n_buckets=10)

    def record_request(self) -> None:
        """Count one request toward the window."""
        self._rc.add(self._REQ)

    def allowance(self) -> int:
        """Retries the window allows in all."""
        requests = self._rc.totals()[self._REQ]
        return max(self.policy.min_retries, math.floor(self.policy.max_retry_ratio * requests))

    def remaining(self) -> int:
        """Retries still available in the window."""
        return max(0, self.allowance() - self._rc.totals()[self._RETRY])

    def try_spend(self) -> bool:
        """Spend one retry if available."""
        if self.remaining() > 0:
            self._rc.add(self._RETRY)
            return True
        self._rc.add(self._DENIED)
        return False

    def stats(self) -> dict[str, int]:
        """``{"requests", "retries", "denied", "remaining"}`` in the window."""
        req, retries, denied = self._rc.totals()
        return {
            "requests": req,
            "retries": retries,
            "denied": denied,
            "remaining": self.remaining(),
        }


@dataclass(frozen=True, slots=True)
class ChainResult(Generic[T, P]):
    """A successful chain run."""

    value: T
    model: str
    fallback_depth: int
    attempts: tuple[AttemptRecord, ...]
    calls: int
    params: P

    @property
    def skipped(self) -> tuple[str, ...]:
        """Steps skipped without a call, in order."""
        return tuple(a.model for a in self.attempts if not a.called)

    def headers(self) -> dict[str, str]:
        """``X-Model``, ``X-Attempts``, ``X-Fallback-Depth`` (API.md)."""
        return {
            "X-Model": self.model,
            "X-Attempts": str(self.calls),
            "X-Fallback-Depth": str(self.fallback_depth),
        }


class _Request(Generic[P]):
    """Book-keeping of one :meth:`FallbackExecutor.execute` call."""

    def __init__(self, max_total: int) -> None:
        self.max_total = max_total
        self.calls = 0
        self.attempts: list[AttemptRecord] = []
        self.budget_denied = False
        self.errors: list[GenGuardError] = []


class FallbackExecutor:
    """Runs requests through fallback chains (see the module docstring).

    ``retry`` is the default per-step policy; ``step_policies`` override it
    per step. ``gate`` is a :class:`~resilience.breaker.BreakerGate` (a
    :class:`~resilience.breaker.BreakerRegistry` or a router's
    :class:`~resilience.breaker.SnapshotGate`); None admits everything.
    ``clock`` is the deadline clock; ``sleep`` waits backoffs.
    """

    def __init__(
        self,
        *,
        retry: RetryPolicy | None = None,
        max_total_attempts: int = 6,
        gate: BreakerGate | None = None,
        budget: RetryBudget | None = None,
        step_policies: Mapping[str, RetryPolicy] | None = None,
        on_budget_exhausted: Literal["next_step", "fail"] = "next_step",
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        require(max_total_attempts >= 1, "max_total_attempts", "must be >= 1")
        require(
            on_budget_exhausted in ("next_step", "fail"),
            "on_budget_exhausted",
            "must be 'next_step' or 'fail'",
        )
        self.retry = retry or RetryPolicy()
        self.max_total_attempts = max_total_attempts
        self.gate = gate
        self.budget = budget
        self.step_policies = dict(step_policies or {})
        self.on_budget_exhausted = on_budget_exhausted
        self.clock = clock
        self.rng = rng or random.Random()
        self._sleep = sleep

    def policy_for(self, step: str) -> RetryPolicy:
        """The retry policy used for ``step``."""
        return self.step_policies.get(step, self.retry)

    async def execute(
        self,
        chain: FallbackChain | Sequence[str],
        call: StepCall[P, T],
        params: P,
        *,
        deadline_s: float | None = None,
        deadline_at_s: float | None = None,
        adapt: Callable[[str, P], P] | None = None,
        on_oom: Callable[[str, P, OutOfMemory], P | None] | None = None,
        on_attempt: Callable[[AttemptRecord], None] | None = None,
    ) -> ChainResult[T, P]:
        """Run ``call`` along ``chain`` until a step succeeds.

        ``deadline_s`` (from now) and ``deadline_at_s`` (absolute on
        ``clock``) bound the whole request; the earlier wins. ``adapt(step,
        params)`` gives the parameters for a step (a fallback's constraints);
        ``on_oom(step, params, error)`` gives smaller parameters for one retry
        after an OOM, or None. ``on_attempt`` sees every :class:`AttemptRecord`.
        """
        if not isinstance(chain, FallbackChain):
            chain = FallbackChain("chain", tuple(chain))
        now = self.clock()
        deadline = deadline_at_s
        if deadline_s is not None:
            deadline = now + deadline_s if deadline is None else min(deadline, now + deadline_s)
        req: _Request[P] = _Request(self.max_total_attempts)
        if self.budget is not None:
            self.budget.record_request()

        def note(record: AttemptRecord) -> None:
            req.attempts.append(record)
            if on_attempt is not None:
                on_attempt(record)

        for depth, step in enumerate(chain.steps):
            policy = self.policy_for(step)
            if deadline is not None:
                remaining = deadline - self.clock()
                if remaining <= 0 or remaining < policy.expected_attempt_s:
                    raise self._deadline(req, step)
            if req.calls >= req.max_total:
                break
            if self.gate is not None and not self.gate.allows(step):
                # A gate may say why it refuses (e.g. the model is down);
                # otherwise the refusal is an OPEN breaker.
                explain = getattr(self.gate, "skip_error", None)
                found = explain(step) if callable(explain) else None
                hint = getattr(self.gate, "retry_after_s", None)
                skip = found if isinstance(found, GenGuardError) else CircuitOpen(
                    f"breaker for {step} does not admit calls",
                    model=step,
                    retry_after_s=hint(step) if callable(hint) else None,
                )
                req.errors.append(skip)
                note(AttemptRecord(step, skip.kind, skip.message, 0.0, 0, called=False))
                continue
            step_params = adapt(step, params) if adapt is not None else params
            ok, value, err = await self._guarded(
                req, step, policy, call, step_params, deadline, note, 1
            )
            if ok:
                return ChainResult(value, step, depth, tuple(req.attempts), req.calls, step_params)
            if isinstance(err, OutOfMemory) and on_oom is not None:
                smaller = on_oom(step, step_params, err)
                if smaller is not None and self._may_repeat(req, step):
                    first = sum(1 for a in req.attempts if a.model == step and a.called) + 1
                    one = dataclasses.replace(policy, max_attempts=1)
                    ok, value, err = await self._guarded(
                        req, step, one, call, smaller, deadline, note, first
                    )
                    if ok:
                        return ChainResult(
                            value, step, depth, tuple(req.attempts), req.calls, smaller
                        )
            if self.on_budget_exhausted == "fail" and req.budget_denied:
                raise RetryBudgetExhausted(
                    f"retry budget spent while retrying {step}", model=step, attempts=req.attempts
                )

        if deadline is not None and self.clock() >= deadline:
            raise self._deadline(req, None)
        retry_after = min(
            (e.retry_after_s for e in req.errors if e.retry_after_s is not None), default=None
        )
        summary = self._summary(req, chain)
        if req.budget_denied:
            raise RetryBudgetExhausted(
                f"retry budget spent; {summary}", attempts=req.attempts, retry_after_s=retry_after
            )
        detail = {"max_total_attempts_reached": req.calls >= req.max_total}
        raise FallbackExhausted(
            summary, attempts=req.attempts, retry_after_s=retry_after, detail=detail
        )

    # -------------------------------------------------------------- helpers
    async def _guarded(
        self,
        req: _Request[Any],
        step: str,
        policy: RetryPolicy,
        call: StepCall[Any, T],
        params: Any,
        deadline: float | None,
        note: Callable[[AttemptRecord], None],
        first_attempt: int,
    ) -> tuple[bool, Any, GenGuardError | None]:
        """Run one step; (True, value, None) on success, (False, None, error)
        when the chain should move on; raises errors that end the request."""
        try:
            value = await self._run_step(
                req, step, policy, call, params, deadline, note, first_attempt
            )
        except GenGuardError as exc:
            self._check_terminal(req, exc)
            return False, None, exc
        except Exception as exc:
            raise InternalError(
                f"untranslated {type(exc).__name__} from step {step}: {exc}",
                model=step,
                attempts=req.attempts,
            ) from exc
        return True, value, None

    def _deadline(self, req: _Request[Any], step: str | None) -> DeadlineExceeded:
        return DeadlineExceeded(
            "request deadline passed" + (f" before trying {step}" if step else ""),
            attempts=req.attempts,
        )

    def _summary(self, req: _Request[Any], chain: FallbackChain) -> str:
        parts = []
        for step in chain.steps:
            mine = [a for a in req.attempts if a.model == step]
            if not mine:
                parts.append(f"{step}: not tried")
            elif not any(a.called for a in mine):
                parts.append(f"{step}: skipped ({mine[-1].kind})")
            else:
                n = sum(1 for a in mine if a.called)
                parts.append(f"{step}: {mine[-1].kind} after {n} call(s)")
        return "; ".join(parts)

    def _check_terminal(self, req: _Request[Any], exc: GenGuardError) -> None:
        """Re-raise errors that end the request; otherwise note and move on."""
        if isinstance(exc, DeadlineExceeded):
            raise exc.with_attempts(req.attempts) from exc
        if exc.caller_error or isinstance(exc, Cancelled | InternalError):
            raise exc.with_attempts(req.attempts) from exc
        req.errors.append(exc)

    def _may_repeat(self, req: _Request[Any], step: str) -> bool:
        if req.calls >= req.max_total:
            return False
        if self.gate is not None and not self.gate.allows(step):
            return False
        if self.budget is not None and not self.budget.try_spend():
            req.budget_denied = True
            return False
        return True

    async def _run_step(
        self,
        req: _Request[Any],
        step: str,
        policy: RetryPolicy,
        call: StepCall[Any, T],
        params: Any,
        deadline: float | None,
        note: Callable[[AttemptRecord], None],
        first_attempt: int = 1,
    ) -> T:
        gate = self.gate
        current: dict[str, Any] = {"permit": None, "called": False}
        offset = first_attempt - 1

        async def attempt(n: int) -> T:
            current["permit"] = None
            current["called"] = False
            if gate is not None:
                permit = await gate.acquire(step)
                if permit is None:
                    raise CircuitOpen(f"no permit for {step}", model=step, attempt=n + offset)
                current["permit"] = permit
            req.calls += 1
            current["called"] = True
            return await call(step, n + offset, params)

        def hook(ev: AttemptEvent) -> None:
            permit: Permit | None = current["permit"]
            err = ev.error
            if gate is not None and permit is not None:
                # A permit whose call never started is handed back (not a failure).
                outcome = err if current["called"] else Cancelled("call not started")
                gate.complete(permit, outcome, ev.elapsed_s)
            if not current["called"]:
                if isinstance(err, GenGuardError) and not isinstance(err, DeadlineExceeded):
                    note(
                        AttemptRecord(step, err.kind, err.message, 0.0, ev.attempt + offset, False)
                    )
                return
            if err is None:
                note(AttemptRecord(step, None, "", ev.elapsed_s, ev.attempt + offset))
                return
            if isinstance(err, GenGuardError):
                kind, message = err.kind, err.message
            elif isinstance(err, asyncio.CancelledError):
                kind, message = Cancelled.kind, "cancelled"
            else:
                kind, message = InternalError.kind, f"{type(err).__name__}: {err}"
            note(AttemptRecord(step, kind, message, ev.elapsed_s, ev.attempt + offset))

        def may_retry(_next: int) -> bool:
            return self._may_repeat(req, step)

        retrier = Retrier(policy, clock=self.clock, rng=self.rng, sleep=self._sleep)
        return await retrier.run(
            attempt, deadline_at_s=deadline, on_attempt=hook, may_retry=may_retry, model=step
        )
