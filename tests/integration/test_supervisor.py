"""The supervisor actor on a real local Ray cluster (no Serve; health pushed with set_health)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import ray

from actors.supervisor import (
    SUPERVISOR_NAMESPACE,
    clear_store,
    derive_health,
    get_or_create_supervisor,
    supervisor_options,
)
from resilience import Outcome, Permit

pytestmark = pytest.mark.integration

MODELS = ["m-a", "m-b"]
FAST_BREAKER = {
    "fail_max": 3,
    "wait_in_open_s": 1.0,
    "minimum_calls": 5,
    "window_size_calls": 10,
    "half_open_permits": 1,
}


def fast_settings(store_key: str, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "models": list(MODELS),
        "breaker": dict(FAST_BREAKER),
        "breaker_overrides": {},
        "degradation": {
            "levels": [
                {"name": "light", "step_factor": 0.75},
                {"name": "medium", "step_factor": 0.5, "max_side_px": 512},
            ],
            "policy": {"raise_interval_s": 0.0, "healthy_period_s": 60.0},
        },
        "store_key": store_key,
        "app_name": "genguard-test",
        "health_poll_s": None,
        "tick_s": 0.1,
    }
    settings.update(overrides)
    return settings


def fail(model: str, kind: str = "replica_failure") -> dict[str, Any]:
    return Outcome(model, kind, 0.05, at_s=time.time()).to_dict()


def ok(model: str, permit: dict[str, Any] | None = None) -> dict[str, Any]:
    p = None if permit is None else Permit.from_dict(permit)
    return Outcome(model, None, 0.05, permit=p, at_s=time.time()).to_dict()


def wait_for(pred: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class Sup(NamedTuple):
    handle: Any
    name: str
    settings: dict[str, Any]


class Supervisors:
    """Creates uniquely named supervisors and kills them (and their stores) afterwards."""

    def __init__(self) -> None:
        self._made: list[tuple[str, str]] = []

    def track(self, name: str, store_key: str) -> None:
        self._made.append((name, store_key))

    def new(self, **overrides: Any) -> Sup:
        name = f"sup-test-{uuid.uuid4().hex[:10]}"
        settings = fast_settings(f"genguard-test/{name}", **overrides)
        clear_store(settings["store_key"])
        self.track(name, settings["store_key"])
        handle = get_or_create_supervisor(settings, name)
        ray.get(handle.ping.remote(), timeout=60)
        return Sup(handle, name, settings)

    def cleanup(self) -> None:
        for name, key in self._made:
            try:
                ray.kill(ray.get_actor(name, namespace=SUPERVISOR_NAMESPACE), no_restart=True)
            except ValueError:
                pass
            clear_store(key)


@pytest.fixture(scope="module")
def supervisor_ray() -> Iterator[None]:
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, namespace="genguard-test-supervisor", include_dashboard=False)
        started = True
    yield
    if started:
        ray.shutdown()


@pytest.fixture
def sups(supervisor_ray: None) -> Iterator[Supervisors]:
    made = Supervisors()
    yield made
    made.cleanup()


def test_batched_failures_open_breaker_and_wake_long_poll(sups: Supervisors) -> None:
    """Three failures in one report open the breaker; a long-poll parked before it returns within 1 s."""
    sup = sups.new().handle
    before = ray.get(sup.snapshot.remote())
    v = before["version"]
    assert before["breakers"]["m-a"]["state"] == "closed"
    poll = sup.snapshot.remote(since_version=v, timeout_s=10.0)
    wait_for(lambda: ray.get(sup.stats.remote())["long_polls_waiting"] == 1, 5)
    assert ray.wait([poll], timeout=0)[0] == []
    t0 = time.perf_counter()
    returned_v = ray.get(sup.report.remote([fail("m-a")] * 3, []))
    t_report = time.perf_counter() - t0
    snap = ray.get(poll, timeout=5)
    delay = time.perf_counter() - t0
    print(
        f"\nlong-poll delay: report sent -> snapshot returned {delay * 1000:.1f} ms "
        f"(report round trip {t_report * 1000:.1f} ms)"
    )
    assert delay < 1.0
    assert returned_v > v
    assert snap["version"] > v
    assert snap["breakers"]["m-a"]["state"] == "open"
    assert snap["breakers"]["m-b"]["state"] == "closed"
    assert [i["model"] for i in snap["incidents"]["open"]] == ["m-a"]


def test_every_polling_router_sees_open_within_a_second(sups: Supervisors) -> None:
    """Three router-like actors long-polling in their own processes all see OPEN < 1 s after the report."""
    sup = sups.new().handle

    @ray.remote(num_cpus=0.1)
    class Poller:
        async def ready(self) -> bool:
            return True

        async def wait_open(self, handle: Any, model: str) -> float:
            version = -1
            while True:
                snap = await handle.snapshot.remote(since_version=version, timeout_s=2.0)
                if snap["breakers"][model]["state"] == "open":
                    return time.time()
                version = snap["version"]

    pollers = [Poller.remote() for _ in range(3)]
    ray.get([p.ready.remote() for p in pollers], timeout=60)
    seen = [p.wait_open.remote(sup, "m-a") for p in pollers]
    wait_for(lambda: ray.get(sup.stats.remote())["long_polls_waiting"] == 3, 10)
    t_report = time.time()
    ray.get(sup.report.remote([fail("m-a")] * 3, []))
    delays = [t - t_report for t in ray.get(seen, timeout=10)]
    print(
        f"\nreport -> each router's snapshot shows OPEN: {[round(d * 1000, 1) for d in delays]} ms"
    )
    assert max(delays) < 1.0
    for p in pollers:
        ray.kill(p)


def test_long_poll_times_out_with_same_version(sups: Supervisors) -> None:
    """With nothing changing, a long-poll returns the same version after timeout_s; an unknown newer version returns at once."""
    sup = sups.new().handle
    v = ray.get(sup.snapshot.remote())["version"]
    t0 = time.perf_counter()
    snap = ray.get(sup.snapshot.remote(since_version=v, timeout_s=0.4))
    waited = time.perf_counter() - t0
    assert snap["version"] == v
    assert 0.35 <= waited < 2.0
    t0 = time.perf_counter()
    ahead = ray.get(sup.snapshot.remote(since_version=v + 100, timeout_s=5.0))
    assert time.perf_counter() - t0 < 1.0
    assert ahead["version"] == v


def test_half_open_grants_one_probe_cluster_wide_and_success_closes(sups: Supervisors) -> None:
    """After wait_in_open_s the breaker is half_open; 5 concurrent try_acquire get 1 permit; its success closes it."""
    sup = sups.new().handle
    ray.get(sup.report.remote([fail("m-a")] * 3, []))
    assert ray.get(sup.try_acquire.remote("m-a")) is None
    opened = ray.get(sup.snapshot.remote())
    assert opened["breakers"]["m-a"]["state"] == "open"
    snap = wait_for(
        lambda: (
            (s := ray.get(sup.snapshot.remote()))["breakers"]["m-a"]["state"] == "half_open" and s
        ),
        5,
    )
    assert snap["version"] > opened["version"]
    assert time.time() >= opened["breakers"]["m-a"]["open_until"]
    permits = ray.get([sup.try_acquire.remote("m-a") for _ in range(5)])
    granted = [p for p in permits if p is not None]
    assert len(granted) == 1
    assert granted[0]["probe"] is True and granted[0]["key"] == "m-a"
    assert ray.get(sup.stats.remote())["probe_permits_granted"] == 1
    ray.get(sup.report.remote([ok("m-a", granted[0])], []))
    closed = ray.get(sup.snapshot.remote())
    assert closed["breakers"]["m-a"]["state"] == "closed"
    assert closed["incidents"]["open"] == []
    assert [i["model"] for i in closed["incidents"]["recent"]] == ["m-a"]


def test_open_breaker_and_override_survive_supervisor_restart(sups: Supervisors) -> None:
    """An OPEN breaker (same open_until), the level override and the open incident survive ray.kill(no_restart=False)."""
    # A partial override: fail_max etc. still come from the base section.
    made = sups.new(breaker_overrides={"m-a": {"wait_in_open_s": 60.0}})
    sup = made.handle
    ray.get(sup.report.remote([fail("m-a")] * 3, []))
    assert ray.get(sup.set_degradation.remote(2)) == {"level": 2, "mode": "manual"}
    before = ray.get(sup.snapshot.remote())
    stats_before = ray.get(sup.stats.remote())
    assert before["breakers"]["m-a"]["state"] == "open"
    assert before["breakers"]["m-a"]["config"]["wait_in_open_s"] == 60.0
    assert before["breakers"]["m-a"]["config"]["fail_max"] == 3
    assert stats_before["restored_from_store"] is False
    assert stats_before["persisted_writes"] >= 1

    ray.kill(sup, no_restart=False)
    t0 = time.perf_counter()
    stats = wait_for(
        lambda: (
            (s := ray.get(sup.stats.remote(), timeout=30))["started_at"]
            != stats_before["started_at"]
            and s
        ),
        30,
        0.1,
    )
    print(f"\nsupervisor restarted and restored in {time.perf_counter() - t0:.2f} s")
    assert stats["restored_from_store"] is True
    after = ray.get(sup.snapshot.remote())
    assert after["breakers"]["m-a"]["state"] == "open"
    assert after["breakers"]["m-a"]["open_until"] == before["breakers"]["m-a"]["open_until"]
    assert after["breakers"]["m-a"]["opened_at"] == before["breakers"]["m-a"]["opened_at"]
    assert after["breakers"]["m-b"]["state"] == "closed"
    assert after["degradation"] == {"level": 2, "mode": "manual"}
    assert after["version"] > before["version"]
    assert [i["id"] for i in after["incidents"]["open"]] == [
        i["id"] for i in before["incidents"]["open"]
    ]
    assert ray.get(sup.try_acquire.remote("m-a")) is None

    fresh = ray.get_actor(made.name, namespace=SUPERVISOR_NAMESPACE)
    assert ray.get(fresh.snapshot.remote())["breakers"]["m-a"]["state"] == "open"
    # A router replica started now calls get_or_create_supervisor and gets the same state.
    again = get_or_create_supervisor(made.settings, made.name)
    snap = ray.get(again.snapshot.remote())
    assert snap["breakers"]["m-a"]["state"] == "open"
    assert snap["degradation"]["mode"] == "manual"


def test_resets_close_breakers_and_degradation_override_round_trip(sups: Supervisors) -> None:
    """reset_breaker and reset_all close breakers and bump the version; set_degradation(2) pins, None returns to auto."""
    sup = sups.new().handle
    ray.get(sup.report.remote([fail("m-a")] * 3 + [fail("m-b")] * 3, []))
    s0 = ray.get(sup.snapshot.remote())
    assert {k: b["state"] for k, b in s0["breakers"].items()} == {"m-a": "open", "m-b": "open"}

    s1 = ray.get(sup.reset_breaker.remote("m-a"))
    assert s1["version"] > s0["version"]
    assert s1["breakers"]["m-a"]["state"] == "closed"
    assert s1["breakers"]["m-b"]["state"] == "open"
    assert [i["model"] for i in s1["incidents"]["open"]] == ["m-b"]

    assert ray.get(sup.set_degradation.remote(2)) == {"level": 2, "mode": "manual"}
    s2 = ray.get(sup.snapshot.remote())
    assert s2["degradation"] == {"level": 2, "mode": "manual"}
    assert s2["version"] > s1["version"]
    assert ray.get(sup.set_degradation.remote(None))["mode"] == "auto"

    s3 = ray.get(sup.reset_all.remote())
    assert s3["version"] > s2["version"]
    assert {b["state"] for b in s3["breakers"].values()} == {"closed"}
    assert s3["degradation"] == {"level": 0, "mode": "auto"}
    assert s3["incidents"] == {"open": [], "recent": []}
    assert ray.get(sup.errors_report.remote())["totals"] == {"attempts": 0, "requests": 0}
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown model"):
        ray.get(sup.reset_breaker.remote("no-such-model"))


def test_reported_requests_drive_errors_report_and_recovery_rate(sups: Supervisors) -> None:
    """4 requests that hit errors, 3 of them served -> recovery_rate 0.75, with counts by model and kind."""
    sup = sups.new().handle
    outcomes = [
        {**fail("m-a"), "workflow": "text-to-image", "shape": {"width": 64, "height": 64}},
        {**fail("m-a", "timeout"), "workflow": "text-to-image"},
        {**ok("m-b"), "workflow": "text-to-image"},
    ]
    requests = [
        {
            "workflow": "text-to-image",
            "final_kind": None,
            "model": "m-b",
            "errors": 1,
            "latency_s": 0.2,
        },
        {
            "workflow": "text-to-image",
            "final_kind": None,
            "model": "m-b",
            "errors": 2,
            "latency_s": 0.3,
        },
        {
            "workflow": "text-to-video",
            "final_kind": None,
            "model": "m-a",
            "errors": 1,
            "latency_s": 0.4,
        },
        {
            "workflow": "text-to-video",
            "final_kind": "fallback_exhausted",
            "model": None,
            "errors": 2,
            "latency_s": 0.5,
            "shape": None,
        },
        {
            "workflow": "text-to-image",
            "final_kind": None,
            "model": "m-a",
            "errors": 0,
            "latency_s": 0.1,
        },
        {
            "workflow": "text-to-image",
            "final_kind": None,
            "model": "m-a",
            "errors": 0,
            "latency_s": 0.1,
        },
    ]
    ray.get(sup.report.remote(outcomes, requests))
    report = ray.get(sup.errors_report.remote())
    assert report["recovery_rate"] == pytest.approx(0.75)
    one = report["windows"]["1m"]
    assert one["requests"]["total"] == 6
    assert one["requests"]["hit_error"] == 4
    assert one["requests"]["recovered"] == 3
    assert one["requests"]["failed"] == 1
    assert one["requests"]["by_kind"] == {"fallback_exhausted": 1}
    assert one["attempts"]["total"] == 3
    assert one["attempts"]["by_kind"] == {"replica_failure": 1, "timeout": 1}
    assert one["attempts"]["by_model"]["m-a"]["errors"] == 2
    assert one["attempts"]["by_workflow"]["text-to-image"]["attempts"] == 3
    top = {t["kind"]: t for t in report["top_errors"]}
    assert "64x64" in top["replica_failure"]["hint"] or "m-a" in top["replica_failure"]["hint"]
    stats = ray.get(sup.stats.remote())
    assert stats["outcomes_received"] == 3 and stats["requests_received"] == 6


def test_non_failure_outcomes_never_move_the_breaker(sups: Supervisors) -> None:
    """invalid_request, backpressure and cancelled outcomes (and successes) leave it CLOSED, unversioned, unwritten."""
    sup = sups.new().handle
    wait_for(lambda: ray.get(sup.stats.remote())["persisted_writes"] >= 1, 5)
    before = ray.get(sup.snapshot.remote())
    writes = ray.get(sup.stats.remote())["persisted_writes"]
    batch = [fail("m-a", "invalid_request") for _ in range(10)]
    batch += [fail("m-a", "backpressure") for _ in range(10)]
    batch += [fail("m-a", "cancelled") for _ in range(5)]
    for _ in range(3):
        ray.get(sup.report.remote(batch, []))
    ray.get(sup.report.remote([ok("m-a") for _ in range(50)], []))
    time.sleep(0.3)  # a few ticks
    after = ray.get(sup.snapshot.remote())
    stats = ray.get(sup.stats.remote())
    assert after["breakers"]["m-a"]["state"] == "closed"
    assert after["breakers"]["m-a"]["consecutive_failures"] == 0
    assert after["version"] == before["version"]
    assert stats["persisted_writes"] == writes  # written on change only, not per report
    assert stats["breaker_metrics"]["m-a"]["ignored"] == 75
    assert stats["breaker_metrics"]["m-a"]["failures"] == 0


def test_racing_get_or_create_yields_one_actor(sups: Supervisors) -> None:
    """get_or_create_supervisor called from two Ray tasks at once (and the driver) yields one actor."""
    name = f"sup-test-race-{uuid.uuid4().hex[:8]}"
    settings = fast_settings(f"genguard-test/{name}")
    clear_store(settings["store_key"])
    sups.track(name, settings["store_key"])

    @ray.remote(num_cpus=0.1)
    def create(settings: dict[str, Any], name: str) -> str:
        from actors.supervisor import get_or_create_supervisor as goc

        handle = goc(settings, name)
        actor_id: str = ray.get(handle.stats.remote())["actor_id"]
        return actor_id

    ids = ray.get([create.remote(settings, name) for _ in range(2)], timeout=120)
    mine = ray.get(get_or_create_supervisor(settings, name).stats.remote())["actor_id"]
    assert len(set(ids) | {mine}) == 1
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == name]
    assert named == [{"name": name, "namespace": SUPERVISOR_NAMESPACE}]


def test_pushed_health_opens_and_closes_incidents_with_recovery_runs(sups: Supervisors) -> None:
    """set_health down opens an incident with a MODEL_UNHEALTHY recovery run; healthy closes it; starting is unsettled."""
    sup = sups.new().handle
    v0 = ray.get(sup.snapshot.remote())["version"]
    ray.get(sup.set_health.remote("m-b", "down", 0, "constructor failed"))
    snap = ray.get(sup.snapshot.remote())
    assert snap["version"] > v0
    assert snap["health"]["m-b"]["health"] == "down"
    assert snap["health"]["m-b"]["settled"] is True
    assert snap["health"]["m-b"]["message"] == "constructor failed"
    assert [(i["model"], i["cause"]) for i in snap["incidents"]["open"]] == [("m-b", "model down")]
    incident = wait_for(
        lambda: [i for i in ray.get(sup.errors_report.remote())["incidents"] if i["recovery"]],
        5,
    )[0]
    assert incident["recovery"][0]["event"] == "model_unhealthy"

    ray.get(sup.set_health.remote("m-b", "healthy", 1))
    report = ray.get(sup.errors_report.remote())
    assert [i["closed_at"] is not None for i in report["incidents"]] == [True]
    assert report["mttr_s"] is not None

    v1 = ray.get(sup.snapshot.remote())["version"]
    ray.get(sup.set_health.remote("m-a", "starting"))
    snap = ray.get(sup.snapshot.remote())
    assert snap["version"] > v1
    assert snap["health"]["m-a"]["health"] == "starting"
    assert snap["health"]["m-a"]["settled"] is False
    ray.get(sup.set_health.remote("m-a", "healthy", 2))  # same running count again: no bump
    v2 = ray.get(sup.snapshot.remote())["version"]
    ray.get(sup.set_health.remote("m-a", "healthy", 2, "fine"))
    assert ray.get(sup.snapshot.remote())["version"] == v2
    with pytest.raises(ray.exceptions.RayTaskError, match="health must be one of"):
        ray.get(sup.set_health.remote("m-a", "sick"))


def test_malformed_report_items_are_counted_not_fatal(sups: Supervisors) -> None:
    """A report with a malformed outcome and request applies the good items and counts the bad ones."""
    sup = sups.new().handle
    version = ray.get(
        sup.report.remote(
            [{"no_key": 1}, fail("m-a"), fail("m-a"), fail("m-a")],
            [{"final_kind": None}, {"workflow": "text-to-image", "final_kind": None}],
        )
    )
    stats = ray.get(sup.stats.remote())
    assert stats["outcomes_rejected"] == 1 and stats["requests_rejected"] == 1
    assert version == stats["version"]
    assert ray.get(sup.snapshot.remote())["breakers"]["m-a"]["state"] == "open"


@pytest.mark.parametrize(
    ("status", "replicas", "was_settled", "expected"),
    [
        ("HEALTHY", {"RUNNING": 2}, False, ("healthy", True, 2)),
        ("UPSCALING", {"RUNNING": 1, "STARTING": 1}, False, ("healthy", True, 1)),
        ("UNHEALTHY", {"RUNNING": 1, "STARTING": 1}, False, ("degraded", True, 1)),
        ("DEPLOY_FAILED", {"RUNNING": 1}, False, ("degraded", True, 1)),
        ("DEPLOY_FAILED", {}, False, ("down", True, 0)),
        ("UNHEALTHY", {"STARTING": 1}, True, ("down", True, 0)),
        ("UPDATING", {"STARTING": 1}, False, ("starting", False, 0)),
        ("UPDATING", {"STARTING": 1}, True, ("starting", True, 0)),
    ],
)
def test_derive_health_maps_serve_status(
    status: str, replicas: dict[str, int], was_settled: bool, expected: tuple[str, bool, int]
) -> None:
    """Serve deployment status and replica counts map to genguard health, settled and running."""
    assert derive_health(status, replicas, was_settled=was_settled) == expected


def test_supervisor_options_are_detached_restartable_and_cpu_free() -> None:
    """The actor options make it named, detached, restarted forever, CPU-free and long-poll friendly."""
    opts = supervisor_options("x")
    assert opts["name"] == "x" and opts["namespace"] == SUPERVISOR_NAMESPACE
    assert opts["lifetime"] == "detached" and opts["get_if_exists"] is True
    assert opts["max_restarts"] == -1 and opts["num_cpus"] == 0
    assert opts["max_concurrency"] >= 100
