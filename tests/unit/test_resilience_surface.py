"""The public surface: __all__ resolves, and importing resilience never imports Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import resilience

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def test_all_names_resolve() -> None:
    """Every name in resilience.__all__ is an attribute of the package."""
    missing = [name for name in resilience.__all__ if not hasattr(resilience, name)]
    assert missing == []
    assert len(resilience.__all__) == len(set(resilience.__all__))


def test_submodule_names_reexported() -> None:
    """Every public name of every submodule is re-exported from the package."""
    from resilience import (
        analytics,
        breaker,
        degradation,
        errors,
        fallback,
        recovery,
        retry,
        testing,
    )

    names = {
        n
        for m in (analytics, breaker, degradation, errors, fallback, recovery, retry, testing)
        for n in m.__all__
    }
    assert sorted(names - set(resilience.__all__)) == []


def test_import_does_not_import_ray() -> None:
    """In a fresh interpreter, `import resilience` leaves 'ray' out of sys.modules."""
    code = "import sys, resilience, resilience.testing; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]"
