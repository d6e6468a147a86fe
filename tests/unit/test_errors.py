"""The error tree: flags per kind, pickling with fields, dict round trips."""

from __future__ import annotations

import asyncio
import json
import pickle

import pytest

import resilience.errors as errors_mod
from resilience import (
    ERROR_KINDS,
    AttemptRecord,
    Backpressure,
    Cancelled,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    FallbackExhausted,
    GenGuardError,
    InternalError,
    InvalidRequest,
    ModelFailure,
    ModelTimeout,
    OutOfMemory,
    ReplicaFailure,
    StepUnavailable,
    as_genguard_error,
    counts_as_failure,
    error_class,
    error_from_dict,
    is_retriable,
)

pytestmark = pytest.mark.unit

ALL_CLASSES = [
    obj
    for obj in vars(errors_mod).values()
    if isinstance(obj, type) and issubclass(obj, GenGuardError)
]

# kind -> (http_status, retriable, counts_as_failure, skip_step)
EXPECTED = {
    "invalid_request": (422, False, False, False),
    "backpressure": (503, False, False, True),
    "replica_failure": (503, True, True, False),
    "model_error": (503, True, True, False),
    "bad_output": (503, True, True, False),
    "timeout": (503, True, True, False),
    "deadline_exceeded": (504, False, False, False),
    "out_of_memory": (503, False, True, False),
    "circuit_open": (503, False, False, True),
    "model_unavailable": (503, False, False, True),
    "retry_budget_exhausted": (503, False, False, False),
    "fallback_exhausted": (503, False, False, False),
    "cancelled": (499, False, False, False),
    "internal": (500, False, False, False),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_kind_flags(kind: str) -> None:
    """Each required kind has the documented status, retriable, failure and skip flags."""
    cls = ERROR_KINDS[kind]
    assert (cls.http_status, cls.retriable, cls.counts_as_failure, cls.skip_step) == EXPECTED[kind]


def test_oom_is_degradable() -> None:
    """OutOfMemory is marked degradable (retry once smaller) and only it is."""
    assert [c.kind for c in ERROR_KINDS.values() if c.degradable] == ["out_of_memory"]


def test_caller_errors_never_retried_or_counted() -> None:
    """Every caller error is neither retriable nor a breaker failure."""
    callers = [c for c in ALL_CLASSES if c.caller_error]
    assert callers == [InvalidRequest]
    assert not any(c.retriable or c.counts_as_failure for c in callers)


def test_tree_branches() -> None:
    """The branches group the kinds as drawn in the module docstring."""
    assert issubclass(ReplicaFailure, ModelFailure) and issubclass(OutOfMemory, ModelFailure)
    assert issubclass(Backpressure, StepUnavailable) and issubclass(CircuitOpen, StepUnavailable)
    assert all(issubclass(c, GenGuardError) for c in ALL_CLASSES)
    assert issubclass(ConfigError, ValueError)
    assert "FallbackExhausted" in (errors_mod.__doc__ or "")


def _sample(cls: type[GenGuardError]) -> GenGuardError:
    att = (AttemptRecord("wan-t2v", "timeout", "slow", 1.5, 1), AttemptRecord("wan-i2v", None))
    return cls(
        "boom",
        model="wan-t2v",
        attempt=2,
        detail={"frames": 81, "nested": {"a": [1, 2]}},
        attempts=att,
        retry_after_s=3.0,
    )


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_pickle_round_trip(cls: type[GenGuardError]) -> None:
    """Every class pickles with its type and all fields intact."""
    err = _sample(cls)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert (
        back.message,
        back.model,
        back.attempt,
        back.detail,
        back.attempts,
        back.retry_after_s,
    ) == (
        "boom",
        "wan-t2v",
        2,
        {"frames": 81, "nested": {"a": [1, 2]}},
        err.attempts,
        3.0,
    )


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=lambda c: c.__name__)
def test_dict_round_trip(cls: type[GenGuardError]) -> None:
    """to_dict is JSON-able and error_from_dict rebuilds an equal error of the concrete kind."""
    err = _sample(cls)
    data = json.loads(json.dumps(err.to_dict()))
    back = error_from_dict(data)
    assert back.kind == err.kind
    assert back.to_dict() == err.to_dict()


def test_config_error_key_survives_pickle() -> None:
    """ConfigError keeps the offending key through pickling."""
    err = ConfigError("bad", key="breaker.wait_in_open_s")
    assert pickle.loads(pickle.dumps(err)).key == "breaker.wait_in_open_s"


def test_fallback_exhausted_http_body_lists_attempts_in_order() -> None:
    """The HTTP body has API.md's shape with attempts (model, kind, message, elapsed_s) in order."""
    attempts = [
        AttemptRecord("qwen-image", "model_error", "boom", 0.25, 1),
        AttemptRecord("qwen-image", "timeout", "slow", 1.0, 2),
        AttemptRecord("newbie-image", "circuit_open", "open", 0.0, 0, called=False),
    ]
    body = FallbackExhausted("all failed", attempts=attempts).http_body("req-1")
    assert body["error"] == {"kind": "fallback_exhausted", "message": "all failed"}
    assert body["request_id"] == "req-1"
    assert [(a["model"], a["kind"], a["elapsed_s"]) for a in body["attempts"]] == [
        ("qwen-image", "model_error", 0.25),
        ("qwen-image", "timeout", 1.0),
        ("newbie-image", "circuit_open", 0.0),
    ]


def test_with_attempts_copies() -> None:
    """with_attempts returns a new error of the same class carrying the attempts."""
    err = DeadlineExceeded("late", model="m")
    rec = AttemptRecord("m", "timeout")
    copy = err.with_attempts([rec])
    assert type(copy) is DeadlineExceeded and copy.attempts == (rec,) and err.attempts == ()


def test_unknown_kind_maps_to_internal() -> None:
    """An unknown kind string resolves to InternalError."""
    assert error_class("no-such-kind") is InternalError


def test_counts_as_failure_helper() -> None:
    """counts_as_failure classifies None, kind strings, our errors and foreign ones."""
    assert counts_as_failure(None) is False
    assert counts_as_failure("timeout") is True
    assert counts_as_failure("backpressure") is False
    assert counts_as_failure(Cancelled()) is False
    assert counts_as_failure(RuntimeError("x")) is True
    assert counts_as_failure(asyncio.CancelledError()) is False


def test_is_retriable() -> None:
    """Only genguard errors with retriable=True are retriable."""
    assert is_retriable(ModelTimeout()) and not is_retriable(OutOfMemory())
    assert not is_retriable(TimeoutError())


def test_as_genguard_error_translates_and_chains() -> None:
    """Standard-library errors translate to the tree with the original as __cause__."""
    timeout = TimeoutError("late")
    err = as_genguard_error(timeout, model="m", attempt=2)
    assert isinstance(err, ModelTimeout) and err.__cause__ is timeout and err.attempt == 2
    assert isinstance(as_genguard_error(asyncio.CancelledError()), Cancelled)
    assert isinstance(as_genguard_error(KeyError("k")), InternalError)
    same = InvalidRequest("x")
    assert as_genguard_error(same) is same


def test_str_names_kind_and_model() -> None:
    """str() shows kind, message, model and attempt."""
    assert str(ReplicaFailure("died", model="wan-t2v", attempt=3)) == (
        "replica_failure: died [wan-t2v #3]"
    )


def test_default_message() -> None:
    """An error built without a message gets its class's default message."""
    assert Backpressure().message == "capacity exhausted"
