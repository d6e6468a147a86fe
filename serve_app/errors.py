"""The two boundaries where foreign exceptions become genguard's error tree.

* ``from_replica_exception`` runs inside a model replica: torch, diffusers
  and injected faults become ``resilience`` errors before they cross the Ray
  process boundary.
* ``from_handle_exception`` runs in the router around every handle call:
  Ray and Serve errors (replica died, actor unavailable, backpressure,
  task errors) become ``resilience`` errors the fallback executor understands.

Both use ``raise ... from exc`` at the call site, so the original traceback
survives.
"""

from __future__ import annotations

import asyncio

from resilience import (
    Backpressure,
    BadOutput,
    Cancelled,
    GenGuardError,
    InternalError,
    InvalidRequest,
    ModelError,
    ModelTimeout,
    OutOfMemory,
    ReplicaFailure,
    error_from_dict,
)

# A CPU allocator failure has no exception type of its own: PyTorch raises a
# plain RuntimeError whose message starts like this (c10/core/CPUAllocator.cpp),
# so it is the one case matched by message, narrowly.
_CPU_ALLOC_MARKER = "DefaultCPUAllocator: can't allocate memory"


def is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and _CPU_ALLOC_MARKER in str(exc)


def from_replica_exception(exc: BaseException, model: str) -> GenGuardError:
    """Translate an exception raised while a replica generated."""
    from serve_app.faults import InjectedFault
    from serve_app.models.deployment import (
        ConstraintError,
        GenerationCancelled,
        NonFiniteOutputError,
    )

    if isinstance(exc, GenGuardError):
        return exc
    if isinstance(exc, ConstraintError):
        return InvalidRequest(str(exc), model=model, detail={"violations": exc.violations})
    if isinstance(exc, NonFiniteOutputError):
        return BadOutput(str(exc), model=model)
    if is_oom(exc):
        return OutOfMemory(f"{model}: out of memory: {exc}", model=model)
    if isinstance(exc, InjectedFault):
        return ModelError(str(exc), model=model, detail={"injected": exc.mode})
    if isinstance(exc, asyncio.CancelledError | GenerationCancelled):
        return Cancelled(f"{model}: generation cancelled", model=model)
    return ModelError(f"{model}: {type(exc).__name__}: {exc}", model=model)


def _cause(exc: BaseException) -> BaseException:
    """The original exception inside a RayTaskError."""
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            return cause
    return exc


def from_handle_exception(exc: BaseException, model: str) -> GenGuardError:
    """Translate an exception from awaiting a model deployment's handle."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
        RequestCancelledError,
    )

    if isinstance(exc, BackPressureError):
        return Backpressure(f"{model}: queue full ({exc})", model=model, retry_after_s=1.0)
    if isinstance(exc, ActorUnavailableError | ReplicaUnavailableError):
        return ReplicaFailure(f"{model}: replica unavailable", model=model)
    if isinstance(exc, ActorDiedError | RayActorError):
        return ReplicaFailure(f"{model}: replica died: {type(exc).__name__}", model=model)
    if isinstance(exc, DeploymentUnavailableError):
        return ReplicaFailure(f"{model}: deployment unavailable", model=model)
    if isinstance(exc, RequestCancelledError):
        return Cancelled(f"{model}: request cancelled", model=model)
    if isinstance(exc, TimeoutError):
        return ModelTimeout(f"{model}: timed out", model=model)
    if isinstance(exc, RayTaskError):
        cause = _cause(exc)
        if isinstance(cause, GenGuardError):
            # Rebuild a clean instance: the RayTaskError subclass Ray makes is
            # not what the executor should pass around.
            return error_from_dict(cause.to_dict())
        return from_replica_exception(cause, model)
    if isinstance(exc, GenGuardError):
        return exc
    return InternalError(f"{model}: unexpected {type(exc).__name__}: {exc}", model=model)
