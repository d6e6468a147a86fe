"""Degradation: ladder from config, parameter adjustment within constraints, the controller."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from resilience import (
    BreakerState,
    BreakerTransition,
    ConfigError,
    DegradationController,
    DegradationLadder,
    DegradationLevel,
    DegradationPolicy,
    FakeClock,
    LevelChange,
    ModelConstraints,
    Signals,
    adjust_parameters,
)

pytestmark = pytest.mark.unit

RUNGS = [
    {"step_factor": 0.75, "min_steps": 10},
    {"step_factor": 0.5, "min_steps": 8, "max_side_px": 768, "max_frames": 49},
    {
        "step_factor": 0.25,
        "min_steps": 4,
        "max_side_px": 512,
        "max_frames": 33,
        "max_guidance_scale": 1.0,
    },
]
LADDER = DegradationLadder.from_config(RUNGS)
WAN = ModelConstraints(
    multiple_of=16, max_side_px=1280, max_steps=100, frames="4k+1", min_frames=5, max_frames=81
)
QWEN = ModelConstraints(multiple_of=16, max_side_px=2048, max_steps=100)


def params(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "width": 1024,
        "height": 1024,
        "num_inference_steps": 30,
        "num_frames": None,
        "guidance_scale": None,
        "prompt": "a cat",
    }
    base.update(kw)
    return base


# ----------------------------------------------------------------- ladder
def test_ladder_from_config() -> None:
    """Config rungs become levels 1..N above an implicit neutral level 0."""
    assert LADDER.max_level == 3 and LADDER[0].neutral
    assert LADDER[2].max_side_px == 768 and LADDER[2].level == 2
    assert LADDER[99] is LADDER[3]
    assert LADDER.to_config()[1]["max_frames"] == 49


def test_ladder_rejects_looser_rung() -> None:
    """A rung looser than the one below is a ConfigError naming the rung and field."""
    with pytest.raises(ConfigError) as info:
        DegradationLadder.from_config([{"max_side_px": 768}, {"max_side_px": 1024}])
    assert info.value.key == "degradation.levels[1].max_side_px"


def test_ladder_rejects_unknown_setting() -> None:
    """An unknown rung setting is a ConfigError naming it."""
    with pytest.raises(ConfigError) as info:
        DegradationLadder.from_config([{"max_sides": 768}])
    assert info.value.key == "degradation.levels[0].max_sides"


def test_ladder_level_zero_must_be_neutral() -> None:
    """A ladder whose level 0 changes something is refused."""
    with pytest.raises(ConfigError):
        DegradationLadder([DegradationLevel(step_factor=0.5)])


# ------------------------------------------------------------- adjustment
def test_level_two_adjustments_reported() -> None:
    """Level 2 halves steps and caps the side, reporting API.md-shaped changes."""
    new, changes = LADDER.adjust(params(), 2, QWEN)
    assert (new["width"], new["height"], new["num_inference_steps"]) == (768, 768, 15)
    assert new["prompt"] == "a cat"
    assert changes == [
        {"param": "width", "from": 1024, "to": 768, "reason": "degradation level 2"},
        {"param": "height", "from": 1024, "to": 768, "reason": "degradation level 2"},
        {"param": "num_inference_steps", "from": 30, "to": 15, "reason": "degradation level 2"},
    ]
    assert json.loads(json.dumps(changes)) == changes


def test_level_zero_changes_nothing() -> None:
    """A valid request at level 0 comes back unchanged with no changes listed."""
    new, changes = LADDER.adjust(params(), 0, QWEN)
    assert new == params() and changes == []


def test_step_floor_and_never_raise() -> None:
    """Steps never go below min_steps through degradation, and are never raised."""
    assert LADDER.adjust(params(num_inference_steps=12), 2, QWEN)[0]["num_inference_steps"] == 8
    assert LADDER.adjust(params(num_inference_steps=4), 2, QWEN)[0]["num_inference_steps"] == 4


def test_aspect_ratio_kept_and_multiple_respected() -> None:
    """Capping 1280x720 to 512 keeps the aspect ratio, rounded down to multiples of 16."""
    new, _ = LADDER.adjust(params(width=1280, height=720), 3, QWEN)
    assert (new["width"], new["height"]) == (512, 288)


def test_frames_capped_to_4k_plus_1() -> None:
    """Frame caps land on 4k+1 values for 4k+1 models."""
    new, changes = LADDER.adjust(params(num_frames=81, width=832, height=480), 2, WAN)
    assert new["num_frames"] == 49
    custom = DegradationLadder.from_config([{"max_frames": 50}])
    assert (
        custom.adjust(params(num_frames=81, width=832, height=480), 1, WAN)[0]["num_frames"] == 49
    )
    assert {"param": "num_frames", "from": 81, "to": 49, "reason": "degradation level 2"} in changes


def test_constraint_fit_without_level() -> None:
    """With no level, only constraint fixes happen, each with its rule as the reason."""
    new, changes = adjust_parameters(
        params(width=518, height=530, num_inference_steps=150), None, QWEN
    )
    assert (new["width"], new["height"], new["num_inference_steps"]) == (512, 528, 100)
    assert [c["reason"] for c in changes] == [
        "model constraint: multiple of 16",
        "model constraint: multiple of 16",
        "model constraint: max_steps 100",
    ]


def test_fallback_with_smaller_max_side() -> None:
    """Adapting to a fallback with a smaller max side scales down and names the constraint."""
    small = ModelConstraints(multiple_of=16, max_side_px=1024)
    new, changes = adjust_parameters(params(width=2048, height=1152), None, small)
    assert (new["width"], new["height"]) == (1024, 576)
    assert changes[0]["reason"] == "model constraint: max_side_px 1024"


def test_guidance_capped() -> None:
    """Level 3 caps guidance_scale at 1.0; None guidance is left alone."""
    new, changes = LADDER.adjust(params(guidance_scale=4.5), 3, QWEN)
    assert new["guidance_scale"] == 1.0
    assert {
        "param": "guidance_scale",
        "from": 4.5,
        "to": 1.0,
        "reason": "degradation level 3",
    } in changes
    assert LADDER.adjust(params(), 3, QWEN)[0]["guidance_scale"] is None


def test_frames_raised_to_minimum() -> None:
    """Too few frames are raised to the model's minimum (constraints win over degradation)."""
    new, _ = adjust_parameters(params(num_frames=2, width=64, height=64), LADDER[3], WAN)
    assert new["num_frames"] == 5


def test_pixel_frame_budget() -> None:
    """width*height*frames is brought within max_pixel_frames."""
    c = ModelConstraints(
        multiple_of=16,
        max_side_px=1280,
        frames="4k+1",
        max_frames=129,
        max_pixel_frames=832 * 480 * 33,
    )
    new, _ = adjust_parameters(params(width=832, height=480, num_frames=81), None, c)
    assert new["width"] * new["height"] * new["num_frames"] <= c.max_pixel_frames  # type: ignore[operator]
    assert new["width"] % 16 == 0 and (new["num_frames"] - 1) % 4 == 0


def test_constraints_coerced_from_nested_config() -> None:
    """A mapping with a nested frames object (serve_app's layout) is understood."""
    c = ModelConstraints.coerce(
        {
            "multiple_of": 16,
            "min_side_px": 16,
            "max_side_px": 1280,
            "max_steps": 50,
            "frames": {"form": "4k+1", "min_frames": 1, "max_frames": 81},
            "max_pixel_frames": 10**9,
        }
    )
    assert (c.frames, c.max_frames, c.max_steps) == ("4k+1", 81, 50)
    assert ModelConstraints.coerce({"frames": {"form": "any", "max_frames": 10}}).frames is None


def test_impossible_constraints_rejected() -> None:
    """Constraints that admit no valid value are a ConfigError."""
    with pytest.raises(ConfigError):
        ModelConstraints(multiple_of=16, max_side_px=8)
    with pytest.raises(ConfigError):
        ModelConstraints(frames="4k+1", min_frames=50, max_frames=52)


SIDES = st.integers(min_value=1, max_value=4096)
FRAMES = st.one_of(st.none(), st.integers(min_value=0, max_value=300))


@st.composite
def constraints(draw: st.DrawFn) -> ModelConstraints:
    m = draw(st.sampled_from([1, 8, 16, 32, 64]))
    max_side = draw(st.one_of(st.none(), st.integers(min_value=m, max_value=4096)))
    max_side = None if max_side is None else max(max_side, m)
    form = draw(st.sampled_from([None, "4k+1"]))
    min_f = draw(st.integers(min_value=1, max_value=20))
    max_f = draw(st.one_of(st.none(), st.integers(min_value=min_f + 4, max_value=200)))
    budget = draw(st.one_of(st.none(), st.integers(min_value=10**5, max_value=10**8)))
    lo = max(m, 1)
    if budget is not None:
        budget = max(budget, lo * lo * (min_f + 4))
    return ModelConstraints(
        multiple_of=m,
        max_side_px=max_side,
        max_steps=draw(st.one_of(st.none(), st.integers(1, 200))),
        frames=form,
        min_frames=min_f,
        max_frames=max_f,
        max_pixel_frames=budget,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    c=constraints(),
    w=SIDES,
    h=SIDES,
    steps=st.integers(min_value=0, max_value=300),
    frames=FRAMES,
    guidance=st.one_of(st.none(), st.floats(min_value=0, max_value=20)),
    level=st.integers(min_value=-1, max_value=3),
)
def test_adjusted_params_always_within_constraints(
    c: ModelConstraints,
    w: int,
    h: int,
    steps: int,
    frames: int | None,
    guidance: float | None,
    level: int,
) -> None:
    """Whatever the input and level, the output satisfies every constraint and lists each change once."""
    p = params(
        width=w, height=h, num_inference_steps=steps, num_frames=frames, guidance_scale=guidance
    )
    new, changes = adjust_parameters(p, None if level < 0 else LADDER[level], c)
    lo, hi = c.side_bounds()
    for side in (new["width"], new["height"]):
        assert side % c.multiple_of == 0 and side >= lo
        assert hi is None or side <= hi
    assert new["num_inference_steps"] >= 1
    assert c.max_steps is None or new["num_inference_steps"] <= c.max_steps
    if frames is not None:
        flo, fhi = c.frame_bounds()
        assert flo <= new["num_frames"] and (fhi is None or new["num_frames"] <= fhi)
        assert c.frames is None or (new["num_frames"] - 1) % 4 == 0
    if c.max_pixel_frames is not None:
        assert new["width"] * new["height"] * (new["num_frames"] or 1) <= c.max_pixel_frames
    if level > 0 and steps >= 1:
        assert new["num_inference_steps"] <= steps
    changed = [
        k
        for k in ("width", "height", "num_inference_steps", "num_frames", "guidance_scale")
        if new[k] != p[k]
    ]
    assert [ch["param"] for ch in changes] == changed
    assert all(ch["from"] == p[ch["param"]] and ch["to"] == new[ch["param"]] for ch in changes)


# ------------------------------------------------------------- controller
POLICY = DegradationPolicy(
    window_s=60,
    min_samples=10,
    error_rate_threshold=0.2,
    oom_rate_threshold=0.05,
    backpressure_rate_threshold=0.1,
    latency_slo_s=10.0,
    hysteresis_ratio=0.5,
    raise_interval_s=10.0,
    healthy_period_s=60.0,
)


def controller(
    clock: FakeClock, policy: DegradationPolicy = POLICY
) -> tuple[DegradationController, list[LevelChange]]:
    changes: list[LevelChange] = []
    return DegradationController(LADDER, policy, clock=clock, listeners=[changes.append]), changes


def feed(c: DegradationController, n: int, kind: str | None, latency_s: float = 1.0) -> None:
    for _ in range(n):
        c.record(kind, latency_s)


def test_error_rate_raises_one_step() -> None:
    """An error rate at the threshold raises the level by one, naming the signal."""
    clock = FakeClock()
    c, changes = controller(clock)
    feed(c, 8, None)
    feed(c, 2, "replica_failure")
    assert c.evaluate() == 1
    assert changes[0].reason == "error rate 20% >= 20%" and (
        changes[0].from_level,
        changes[0].to_level,
    ) == (0, 1)


def test_too_few_samples_do_not_raise() -> None:
    """Below min_samples no rate signal raises the level."""
    clock = FakeClock()
    c, _ = controller(clock)
    feed(c, 5, "model_error")
    assert c.evaluate() == 0


def test_raise_interval_limits_escalation() -> None:
    """A persistent problem raises at most one step per raise_interval_s."""
    clock = FakeClock()
    c, _ = controller(clock)
    feed(c, 20, "timeout")
    levels = []
    for _ in range(25):
        levels.append(c.evaluate())
        clock.advance(1)
    assert levels[:11] == [1] * 10 + [2] and levels[-1] == 3


@pytest.mark.parametrize(
    ("kind", "latency", "reason"),
    [
        ("out_of_memory", 1.0, "OOM rate"),
        ("backpressure", 1.0, "backpressure rate"),
        (None, 30.0, "p95 latency"),
    ],
)
def test_other_signals_raise(kind: str | None, latency: float, reason: str) -> None:
    """OOM rate, backpressure rate and p95 latency over the SLO each raise the level."""
    clock = FakeClock()
    c, changes = controller(clock)
    feed(c, 18, None, 1.0 if kind else latency)
    feed(c, 2, kind, latency)
    assert c.evaluate() == 1 and reason in changes[0].reason


def test_caller_errors_and_cancellations_ignored() -> None:
    """invalid_request and cancelled outcomes are not counted as samples or errors."""
    clock = FakeClock()
    c, _ = controller(clock)
    feed(c, 50, "invalid_request")
    feed(c, 50, "cancelled")
    assert c.signals().samples == 0 and c.evaluate() == 0


def test_lowers_one_step_per_healthy_period() -> None:
    """After the problem ends, the level drops one step per full healthy period."""
    clock = FakeClock()
    c, changes = controller(clock)
    c.set_override(None)
    for _ in range(3):
        c.evaluate(Signals(samples=100, error_rate=0.5))
        clock.advance(10)
    assert c.level == 3
    times = {}
    for second in range(0, 300):
        before = c.level
        c.evaluate(Signals(samples=100, error_rate=0.0))
        if c.level != before:
            times[c.level] = second
        clock.advance(1)
    assert c.level == 0
    assert times == {2: 60, 1: 120, 0: 180}
    assert [ch.to_level for ch in changes] == [1, 2, 3, 2, 1, 0]


def test_hysteresis_band_holds_level() -> None:
    """A rate under the threshold but above threshold*hysteresis neither raises nor lowers."""
    clock = FakeClock()
    c, _ = controller(clock)
    c.evaluate(Signals(samples=100, error_rate=0.5))
    for _ in range(600):
        clock.advance(1)
        c.evaluate(Signals(samples=100, error_rate=0.15))
    assert c.level == 1


def test_no_flapping_under_noisy_signal() -> None:
    """A signal jittering around the threshold never lowers the level: changes are monotone."""
    clock = FakeClock()
    c, changes = controller(clock)
    rng = random.Random(7)
    for _ in range(3_600):
        c.evaluate(Signals(samples=100, error_rate=rng.uniform(0.12, 0.28)))
        clock.advance(1)
    steps = [ch.to_level - ch.from_level for ch in changes]
    assert steps == [1, 1, 1] and c.level == 3


def test_no_flapping_when_signal_alternates() -> None:
    """A signal alternating between healthy and bad every few seconds never lowers the level."""
    clock = FakeClock()
    c, changes = controller(clock)
    for i in range(3_600):
        bad = (i // 20) % 2 == 0
        c.evaluate(Signals(samples=100, error_rate=0.3 if bad else 0.0))
        clock.advance(1)
    assert all(ch.to_level > ch.from_level for ch in changes) and c.level == 3


def test_breaker_open_raises_and_blocks_lowering() -> None:
    """A breaker opening raises once; while it stays open the level is held; after close it lowers."""
    clock = FakeClock()
    c, changes = controller(clock)
    c.breaker_transition(
        BreakerTransition("wan-t2v", BreakerState.CLOSED, BreakerState.OPEN, clock(), "x")
    )
    assert c.evaluate() == 1 and "breaker opened: wan-t2v" in changes[0].reason
    for _ in range(300):
        clock.advance(1)
        c.evaluate()
    assert c.level == 1
    c.breaker_state("wan-t2v", "closed")
    for _ in range(61):
        clock.advance(1)
        c.evaluate()
    assert c.level == 0


def test_override_and_release() -> None:
    """An admin override pins the level (mode manual); releasing returns to auto."""
    clock = FakeClock()
    c, changes = controller(clock)
    assert c.set_override(7) == 3 and c.status() == {"level": 3, "mode": "manual"}
    c.evaluate(Signals(samples=100, error_rate=0.0))
    assert c.level == 3
    assert c.set_override(None) == 0 and c.mode == "auto"
    assert [(ch.to_level, ch.mode) for ch in changes] == [(3, "manual"), (0, "auto")]


def test_controller_snapshot_round_trip() -> None:
    """A JSON snapshot restores level, override, timers and open breakers."""
    clock = FakeClock()
    c, _ = controller(clock)
    feed(c, 20, "model_error")
    c.evaluate()
    c.breaker_state("qwen-image", "open")
    snap = json.loads(json.dumps(c.snapshot()))
    d, changes = controller(clock)
    d.restore(snap)
    assert (d.level, d.signals().open_breakers, d.signals().samples) == (1, 1, 20) and changes == []


def test_policy_from_mapping_names_key() -> None:
    """Invalid controller settings name degradation.controller.<key>."""
    with pytest.raises(ConfigError) as info:
        DegradationPolicy.from_mapping({"hysteresis_ratio": 1.5})
    assert info.value.key == "degradation.controller.hysteresis_ratio"


class ControllerMachine(RuleBasedStateMachine):
    """Random outcomes, breaker events, signals and time against the controller's invariants."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.policy = DegradationPolicy(
            window_s=30,
            min_samples=5,
            raise_interval_s=5.0,
            healthy_period_s=20.0,
            latency_slo_s=5.0,
        )
        self.changes: list[LevelChange] = []
        self.c = DegradationController(
            LADDER, self.policy, clock=self.clock, listeners=[self.changes.append]
        )

    @rule(dt=st.floats(min_value=0.0, max_value=8.0))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)

    @rule(
        kind=st.sampled_from(
            [
                None,
                None,
                None,
                "model_error",
                "out_of_memory",
                "backpressure",
                "timeout",
                "cancelled",
            ]
        ),
        latency=st.floats(min_value=0.01, max_value=20.0),
        n=st.integers(1, 10),
    )
    def record(self, kind: str | None, latency: float, n: int) -> None:
        feed(self.c, n, kind, latency)

    @rule(key=st.sampled_from(["a", "b"]), state=st.sampled_from(["open", "closed", "half_open"]))
    def breaker(self, key: str, state: str) -> None:
        self.c.breaker_state(key, state)

    @rule()
    def evaluate(self) -> None:
        before = self.c.level
        after = self.c.evaluate()
        assert abs(after - before) <= 1

    @rule(rate=st.floats(min_value=0.0, max_value=1.0))
    def evaluate_signals(self, rate: float) -> None:
        before = self.c.level
        after = self.c.evaluate(Signals(samples=50, error_rate=rate))
        assert abs(after - before) <= 1

    @invariant()
    def level_in_range(self) -> None:
        assert 0 <= self.c.level <= LADDER.max_level

    @invariant()
    def changes_are_single_steps_with_hysteresis(self) -> None:
        last_change: float | None = None
        last_raise: float | None = None
        for ch in self.changes:
            assert abs(ch.to_level - ch.from_level) == 1
            if ch.to_level < ch.from_level and last_change is not None:
                assert ch.at_s - last_change >= self.policy.healthy_period_s - 1e-6
            if ch.to_level > ch.from_level:
                if last_raise is not None:
                    assert ch.at_s - last_raise >= self.policy.raise_interval_s - 1e-6
                last_raise = ch.at_s
            last_change = ch.at_s


TestControllerMachine = ControllerMachine.TestCase
TestControllerMachine.settings = settings(
    max_examples=60,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
