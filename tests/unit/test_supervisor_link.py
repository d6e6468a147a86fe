"""The router's supervisor link without a supervisor: local breakers take over."""

from __future__ import annotations

import pytest

from resilience import ModelError
from serve_app.config import load_app_config
from serve_app.supervisor_link import SupervisorLink
from tests.conftest import local_args

pytestmark = pytest.mark.unit


def _link() -> SupervisorLink:
    args = local_args()
    args["resilience"] = {"breaker": {"fail_max": 3, "minimum_calls": 100, "wait_in_open_s": 30}}
    return SupervisorLink(load_app_config(args), "unit")


async def test_unreachable_supervisor_falls_back_to_local_breakers() -> None:
    """With no snapshot, admission and state come from local breakers fed by outcomes."""
    link = _link()
    assert link.fresh() is False and link.status()["reachable"] is False
    for _ in range(3):
        permit = await link.acquire("qwen-image")
        assert permit is not None
        link.complete(permit, ModelError("boom", model="qwen-image"), 0.01)
    assert link.state("qwen-image").value == "open"
    assert link.allows("qwen-image") is False
    assert link.allows("newbie-image") is True
    assert link.retry_after_s("qwen-image") is not None


async def test_fresh_snapshot_decides_and_outcomes_are_queued_with_workflow() -> None:
    """With a fresh snapshot the supervisor's state wins; outcomes are batched with their workflow."""
    from serve_app.supervisor_link import CURRENT_WORKFLOW

    link = _link()
    link.apply({"version": 3, "breakers": {"qwen-image": {"state": "open", "open_until": 9e18}},
                "degradation": {"level": 2, "mode": "manual"}, "health": {}})
    assert link.fresh() and link.allows("qwen-image") is False
    assert link.degradation() == {"level": 2, "mode": "manual"}
    CURRENT_WORKFLOW.set("text-to-image")
    permit = await link.acquire("newbie-image")
    assert permit is not None
    link.complete(permit, None, 0.02)
    assert link._outcomes[0]["key"] == "newbie-image" and link._outcomes[0]["workflow"] == "text-to-image"
