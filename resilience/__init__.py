"""genguard's resilience core: pure Python, no Ray, clock and randomness injected.

Errors (:mod:`resilience.errors`)
    :class:`GenGuardError` and its tree; :class:`AttemptRecord`; kind lookup.
Retry (:mod:`resilience.retry`)
    :class:`RetryPolicy`, :class:`Retrier` (tenacity's async API), test switch.
Circuit breakers (:mod:`resilience.breaker`)
    :class:`BreakerConfig`, :class:`CircuitBreaker` (pybreaker's state machine
    with windows, slow calls, probe permits), :class:`BreakerRegistry`,
    :class:`SnapshotGate` (router view), :class:`Permit`, :class:`Outcome`.
Fallback chains (:mod:`resilience.fallback`)
    :func:`build_chains`, :class:`FallbackChain`, :class:`FallbackExecutor`,
    :class:`RetryBudget`.
Degradation (:mod:`resilience.degradation`)
    :class:`DegradationLadder`, :func:`adjust_parameters`,
    :class:`ModelConstraints`, :class:`DegradationController`.
Analytics (:mod:`resilience.analytics`)
    :class:`ErrorAnalytics`: rolling counts, recovery rate, incidents, MTTR, report.
Recovery (:mod:`resilience.recovery`)
    :class:`RecoveryRegistry`: event -> async procedures with cooldowns.
Testing (:mod:`resilience.testing`)
    :class:`FakeClock`.
"""

from __future__ import annotations

from .analytics import WINDOWS_MIN, ErrorAnalytics, Incident, hint_for, shape_of
from .breaker import (
    BreakerConfig,
    BreakerGate,
    BreakerRegistry,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    Outcome,
    Permit,
    SnapshotGate,
    TransitionListener,
)
from .degradation import (
    Adjustment,
    DegradationController,
    DegradationLadder,
    DegradationLevel,
    DegradationPolicy,
    LevelChange,
    LevelListener,
    ModelConstraints,
    Signals,
    adjust_parameters,
)
from .errors import (
    ERROR_KINDS,
    AttemptRecord,
    Backpressure,
    BadOutput,
    Cancelled,
    CircuitOpen,
    ConfigError,
    DeadlineExceeded,
    FallbackExhausted,
    GenGuardError,
    InternalError,
    InvalidRequest,
    ModelError,
    ModelFailure,
    ModelTimeout,
    ModelUnavailable,
    OutOfMemory,
    ReplicaFailure,
    RequestFailed,
    RetryBudgetExhausted,
    StepUnavailable,
    as_genguard_error,
    counts_as_failure,
    error_class,
    error_from_dict,
    is_retriable,
)
from .fallback import (
    ChainResult,
    FallbackChain,
    FallbackExecutor,
    RetryBudget,
    RetryBudgetPolicy,
    StepCall,
    build_chains,
)
from .recovery import (
    Procedure,
    RecoveryContext,
    RecoveryEvent,
    RecoveryRegistry,
    RecoveryRun,
    RunListener,
)
from .retry import (
    AttemptEvent,
    AttemptHook,
    Retrier,
    RetryPolicy,
    retry_call,
    set_waits_enabled,
    waits_disabled,
    waits_enabled,
)
from .testing import FakeClock

__all__ = [
    # errors
    "ERROR_KINDS",
    "AttemptRecord",
    "Backpressure",
    "BadOutput",
    "Cancelled",
    "CircuitOpen",
    "ConfigError",
    "DeadlineExceeded",
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
    # retry
    "AttemptEvent",
    "AttemptHook",
    "Retrier",
    "RetryPolicy",
    "retry_call",
    "set_waits_enabled",
    "waits_disabled",
    "waits_enabled",
    # breaker
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
    # fallback
    "ChainResult",
    "FallbackChain",
    "FallbackExecutor",
    "RetryBudget",
    "RetryBudgetPolicy",
    "StepCall",
    "build_chains",
    # degradation
    "Adjustment",
    "DegradationController",
    "DegradationLadder",
    "DegradationLevel",
    "DegradationPolicy",
    "LevelChange",
    "LevelListener",
    "ModelConstraints",
    "Signals",
    "adjust_parameters",
    # analytics
    "WINDOWS_MIN",
    "ErrorAnalytics",
    "Incident",
    "hint_for",
    "shape_of",
    # recovery
    "Procedure",
    "RecoveryContext",
    "RecoveryEvent",
    "RecoveryRegistry",
    "RecoveryRun",
    "RunListener",
    # testing
    "FakeClock",
]
