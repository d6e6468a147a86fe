"""genguard's error tree: one root, a few meaningful branches.

::

    GenGuardError                   root; never raised itself        (500)
    ├── InvalidRequest              invalid_request: caller's fault   (422)
    ├── ConfigError                 invalid_config: start-up config   (500, also a ValueError)
    ├── ModelFailure                the model failed: breaker failure, retriable
    │   ├── ReplicaFailure          replica_failure: replica died / actor error
    │   ├── ModelError              model_error: the pipeline raised
    │   ├── BadOutput               bad_output: NaN / inf / empty output
    │   ├── ModelTimeout            timeout: one attempt ran out of time
    │   └── OutOfMemory             out_of_memory: not retried as-is; degrade, retry once smaller
    ├── StepUnavailable             this step cannot take the call now: skip to the next step
    │   ├── Backpressure            backpressure: queue full                   (503)
    │   ├── CircuitOpen             circuit_open: the step's breaker is OPEN   (503)
    │   └── ModelUnavailable        model_unavailable: no running replica      (503)
    ├── RequestFailed               the request as a whole failed (terminal)
    │   ├── DeadlineExceeded        deadline_exceeded                          (504)
    │   ├── RetryBudgetExhausted    retry_budget_exhausted                     (503)
    │   └── FallbackExhausted       fallback_exhausted: lists every attempt    (503)
    ├── Cancelled                   cancelled: client gone / job cancelled, never a failure (499)
    └── InternalError               internal: a genuine bug                    (500)

Every class carries, as class attributes:

- ``kind``: the string used in HTTP bodies, headers and analytics;
- ``http_status``;
- ``retriable``: may the same step be called again with the same parameters;
- ``counts_as_failure``: does it count against the step's circuit breaker;
- ``caller_error``: the caller's fault (4xx; never retried, never a failure);
- ``skip_step``: move on to the next fallback step (no retry on this one);
- ``degradable``: retrying once with smaller parameters may succeed (OOM).

and, per instance, the structured fields ``message``, ``model``, ``attempt``,
``detail`` (a JSON-able dict), ``retry_after_s`` and ``attempts`` (the ordered
:class:`AttemptRecord` list of the request so far). Instances pickle with
every field intact (they cross Ray process boundaries) and convert to and
from plain dicts (:meth:`GenGuardError.to_dict`, :func:`error_from_dict`).

Foreign exceptions (Ray, torch, diffusers) are translated into this tree at
one boundary each, with ``raise ... from exc``; :func:`as_genguard_error`
covers the standard-library cases (timeouts, cancellation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "AttemptRecord",
    "BadOutput",
    "Backpressure",
    "Cancelled",
    "CircuitOpen",
    "ConfigError",
    "DeadlineExceeded",
    "ERROR_KINDS",
    "FallbackExhausted",
    "GenGuardError",
    "InternalError",
    "InvalidRequest",
    "ModelError",
    "ModelFailure",
    "ModelTimeout",
    "ModelUnavailable",
    "OutOfMemory",
    "ReplicaFailure",
    "RequestFailed",
    "RetryBudgetExhausted",
    "StepUnavailable",
    "as_genguard_error",
    "counts_as_failure",
    "error_class",
    "error_from_dict",
    "is_retriable",
]

E = TypeVar("E", bound="GenGuardError")


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One step of a request: a model call, or a step skipped without a call.

    ``kind`` is ``None`` for a successful call, else the error kind.
    ``called`` is False when the step was skipped (breaker OPEN, no permit).
    """

    model: str
    kind: str | None
    message: str = ""
    elapsed_s: float = 0.0
    attempt: int = 1
    called: bool = True

    @property
    def ok(self) -> bool:
        """True for a successful call."""
        return self.kind is None

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``attempts[]`` in API.md error bodies."""
        return {
            "model": self.model,
            "kind": self.kind,
            "message": self.message,
            "elapsed_s": round(self.elapsed_s, 6),
            "attempt": self.attempt,
            "called": self.called,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttemptRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(
            model=str(data["model"]),
            kind=None if data.get("kind") is None else str(data["kind"]),
            message=str(data.get("message", "")),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
            attempt=int(data.get("attempt", 1)),
            called=bool(data.get("called", True)),
        )


def _rebuild(
    cls: type[GenGuardError],
    message: str,
    model: str | None,
    attempt: int | None,
    detail: dict[str, Any],
    attempts: tuple[AttemptRecord, ...],
    retry_after_s: float | None,
) -> GenGuardError:
    return cls(
        message,
        model=model,
        attempt=attempt,
        detail=detail,
        attempts=attempts,
        retry_after_s=retry_after_s,
    )


class GenGuardError(Exception):
    """Root of genguard's errors. Catch this to catch all of them."""

    kind: ClassVar[str] = "internal"
    http_status: ClassVar[int] = 500
    retriable: ClassVar[bool] = False
    counts_as_failure: ClassVar[bool] = False
    caller_error: ClassVar[bool] = False
    skip_step: ClassVar[bool] = False
    degradable: ClassVar[bool] = False
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str = "",
        *,
        model: str | None = None,
        attempt: int | None = None,
        detail: Mapping[str, Any] | None = None,
        attempts: Iterable[AttemptRecord] = (),
        retry_after_s: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.model = model
        self.attempt = attempt
        self.detail: dict[str, Any] = dict(detail or {})
        self.attempts: tuple[AttemptRecord, ...] = tuple(attempts)
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    def __str__(self) -> str:
        where = f" [{self.model}" + (f" #{self.attempt}" if self.attempt else "") + "]"
        return f"{self.kind}: {self.message}" + (where if self.model else "")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, model={self.model!r}, "
            f"attempt={self.attempt!r}, detail={self.detail!r}, "
            f"attempts=<{len(self.attempts)}>, retry_after_s={self.retry_after_s!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (
                type(self),
                self.message,
                self.model,
                self.attempt,
                self.detail,
                self.attempts,
                self.retry_after_s,
            ),
        )

    def with_attempts(self: E, attempts: Iterable[AttemptRecord]) -> E:
        """A copy of this error carrying ``attempts`` (the cause is kept)."""
        clone = type(self)(
            self.message,
            model=self.model,
            attempt=self.attempt,
            detail=self.detail,
            attempts=attempts,
            retry_after_s=self.retry_after_s,
        )
        clone.__cause__ = self.__cause__
        return clone

    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON-able dict (inverse: :func:`error_from_dict`)."""
        return {
            "kind": self.kind,
            "message": self.message,
            "model": self.model,
            "attempt": self.attempt,
            "detail": dict(self.detail),
            "retry_after_s": self.retry_after_s,
            "attempts": [a.to_dict() for a in self.attempts],
        }

    def http_body(self, request_id: str | None = None) -> dict[str, Any]:
        """The API.md error body: ``{"error": {kind, message}, request_id, attempts}``."""
        err: dict[str, Any] = {"kind": self.kind, "message": self.message}
        if self.model is not None:
            err["model"] = self.model
        return {
            "error": err,
            "request_id": request_id,
            "attempts": [a.to_dict() for a in self.attempts],
        }


class InvalidRequest(GenGuardError):
    """The request is invalid or can never be served. Caller's fault."""

    kind = "invalid_request"
    http_status = 422
    caller_error = True
    default_message = "invalid request"


class ConfigError(GenGuardError, ValueError):
    """A start-up configuration error; ``key`` names the offending setting."""

    kind = "invalid_config"
    http_status = 500
    default_message = "invalid configuration"

    def __init__(self, message: str = "", *, key: str | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        if key is not None:
            self.detail["key"] = key

    @property
    def key(self) -> str | None:
        """Dotted path of the offending setting, e.g. ``breaker.wait_in_open_s``."""
        value = self.detail.get("key")
        return None if value is None else str(value)


class ModelFailure(GenGuardError):
    """The model failed this call: retriable, and a failure for its breaker."""

    kind = "model_error"
    http_status = 503
    retriable = True
    counts_as_failure = True
    default_message = "model failure"


class ReplicaFailure(ModelFailure):
    """The replica serving the call died or became unreachable."""

    kind = "replica_failure"
    default_message = "replica failed"


class ModelError(ModelFailure):
    """The pipeline raised an error while generating."""

    kind = "model_error"
    default_message = "model raised an error"


class BadOutput(ModelFailure):
    """The model returned unusable output (NaN, inf, empty)."""

    kind = "bad_output"
    default_message = "model returned unusable output"


class ModelTimeout(ModelFailure):
    """One attempt exceeded its time limit (retriable within the request deadline)."""

    kind = "timeout"
    default_message = "attempt timed out"


class OutOfMemory(ModelFailure):
    """The device ran out of memory: retry once with smaller parameters."""

    kind = "out_of_memory"
    retriable = False
    degradable = True
    default_message = "out of device memory"


class StepUnavailable(GenGuardError):
    """The step cannot take the call now; try the next step. Never a failure."""

    kind = "model_unavailable"
    http_status = 503
    skip_step = True
    default_message = "step unavailable"


class Backpressure(StepUnavailable):
    """The step's queue is full (Serve ``BackPressureError``)."""

    kind = "backpressure"
    default_message = "capacity exhausted"


class CircuitOpen(StepUnavailable):
    """The step's circuit breaker is OPEN (or HALF_OPEN without a permit)."""

    kind = "circuit_open"
    default_message = "circuit breaker open"


class ModelUnavailable(StepUnavailable):
    """The model has no running replica."""

    kind = "model_unavailable"
    default_message = "model has no running replica"


class RequestFailed(GenGuardError):
    """The request as a whole failed; ``attempts`` says what was tried."""

    kind = "fallback_exhausted"
    http_status = 503
    default_message = "request failed"


class DeadlineExceeded(RequestFailed):
    """The request's deadline passed before any step succeeded."""

    kind = "deadline_exceeded"
    http_status = 504
    default_message = "request deadline exceeded"


class RetryBudgetExhausted(RequestFailed):
    """A retry was needed but the retry budget is spent."""

    kind = "retry_budget_exhausted"
    http_status = 503
    default_message = "retry budget exhausted"


class FallbackExhausted(RequestFailed):
    """Every step of the fallback chain failed or was skipped."""

    kind = "fallback_exhausted"
    http_status = 503
    default_message = "every step of the fallback chain failed"


class Cancelled(GenGuardError):
    """The generation was cancelled (client disconnect, job cancel). Not a failure."""

    kind = "cancelled"
    http_status = 499
    default_message = "cancelled"


class InternalError(GenGuardError):
    """A genuine bug (HTTP 500)."""

    kind = "internal"
    http_status = 500
    default_message = "internal error"


_CONCRETE: tuple[type[GenGuardError], ...] = (
    InvalidRequest,
    ConfigError,
    ReplicaFailure,
    ModelError,
    BadOutput,
    ModelTimeout,
    OutOfMemory,
    Backpressure,
    CircuitOpen,
    ModelUnavailable,
    DeadlineExceeded,
    RetryBudgetExhausted,
    FallbackExhausted,
    Cancelled,
    InternalError,
)

ERROR_KINDS: Mapping[str, type[GenGuardError]] = {cls.kind: cls for cls in _CONCRETE}
"""Error kind string -> the concrete class raised for it."""


def error_class(kind: str) -> type[GenGuardError]:
    """The class for an error ``kind``; unknown kinds map to :class:`InternalError`."""
    return ERROR_KINDS.get(kind, InternalError)


def error_from_dict(data: Mapping[str, Any]) -> GenGuardError:
    """Rebuild an error from :meth:`GenGuardError.to_dict` output."""
    cls = error_class(str(data.get("kind", "internal")))
    attempts: Sequence[Mapping[str, Any]] = data.get("attempts") or ()
    return cls(
        str(data.get("message", "")),
        model=data.get("model"),
        attempt=data.get("attempt"),
        detail=data.get("detail") or {},
        attempts=[AttemptRecord.from_dict(a) for a in attempts],
        retry_after_s=data.get("retry_after_s"),
    )


def is_retriable(exc: BaseException) -> bool:
    """True if ``exc`` is a genguard error whose ``retriable`` is true."""
    return isinstance(exc, GenGuardError) and exc.retriable


def counts_as_failure(exc: BaseException | str | None) -> bool:
    """Whether an outcome counts against a breaker.

    ``None`` (success) is not a failure; a kind string is looked up; a genguard
    error answers for itself; cancellation is never a failure; any other
    (untranslated) exception is a failure.
    """
    if exc is None:
        return False
    if isinstance(exc, str):
        return error_class(exc).counts_as_failure
    if isinstance(exc, GenGuardError):
        return exc.counts_as_failure
    return not isinstance(exc, asyncio.CancelledError)


def as_genguard_error(
    exc: BaseException, *, model: str | None = None, attempt: int | None = None
) -> GenGuardError:
    """Translate a standard-library exception into the tree (identity for ours).

    ``TimeoutError`` becomes :class:`ModelTimeout`, ``asyncio.CancelledError``
    :class:`Cancelled`, anything else :class:`InternalError`. The original is
    set as ``__cause__``. Ray/torch translation lives in the Ray layers.
    """
    if isinstance(exc, GenGuardError):
        return exc
    err: GenGuardError
    if isinstance(exc, TimeoutError):
        err = ModelTimeout(str(exc) or "", model=model, attempt=attempt)
    elif isinstance(exc, asyncio.CancelledError):
        err = Cancelled(str(exc) or "", model=model, attempt=attempt)
    else:
        err = InternalError(f"{type(exc).__name__}: {exc}", model=model, attempt=attempt)
    err.__cause__ = exc
    return err
