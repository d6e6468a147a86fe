"""Ray actors that are not Serve deployments.

Supervisor (:mod:`actors.supervisor`)
    :class:`Supervisor`: the named, detached actor that owns the cluster-wide
    breakers, degradation level, error analytics, incidents and recovery
    registry; :func:`get_or_create_supervisor`, :func:`supervisor_options`,
    :func:`derive_health`, :func:`clear_store`.
"""

from __future__ import annotations

from .supervisor import (
    KV_NAMESPACE,
    SUPERVISOR_NAME,
    SUPERVISOR_NAMESPACE,
    Supervisor,
    clear_store,
    derive_health,
    get_or_create_supervisor,
    supervisor_options,
)

__all__ = [
    "KV_NAMESPACE",
    "SUPERVISOR_NAME",
    "SUPERVISOR_NAMESPACE",
    "Supervisor",
    "clear_store",
    "derive_health",
    "get_or_create_supervisor",
    "supervisor_options",
]
