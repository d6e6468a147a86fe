"""Graceful degradation: a ladder of levels, parameter adjustment, a controller.

- :class:`DegradationLadder`: levels 0 (normal) .. N from config; each
  :class:`DegradationLevel` scales steps (``step_factor``, floored at
  ``min_steps``), caps the longer side (``max_side_px``), frames
  (``max_frames``) and guidance (``max_guidance_scale``). A smaller model is
  a fallback step, not a rung.
- :func:`adjust_parameters` applies a level to request parameters and then
  fits them to a model's :class:`ModelConstraints` (multiples, ``4k+1``
  frames, side, step and pixel-frame caps), returning the new parameters and
  the list of changes (the ``X-Adjustments`` entries). With ``level=None``
  it only fits the constraints (adapting to a fallback step).
- :class:`DegradationController`: raises the cluster level on signals
  (a breaker opening, error rate, OOM rate, backpressure rate, p95 latency
  over an SLO) and lowers it one step at a time after a healthy period, with
  hysteresis (healthy means well below the thresholds), so a noisy signal
  near a threshold never makes it flap.

Parameters are a plain mapping with the keys ``width``, ``height``,
``num_inference_steps``, ``num_frames`` (None for images) and
``guidance_scale`` (may be None); other keys pass through untouched.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypedDict

from ._util import (
    LATENCY_BINS,
    Clock,
    RollingCounts,
    build_policy,
    latency_bin,
    quantile_from_bins,
    require,
)
from .breaker import BreakerState, BreakerTransition
from .errors import ConfigError

__all__ = [
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
]

log = logging.getLogger(__name__)

Adjustment = TypedDict("Adjustment", {"param": str, "from": Any, "to": Any, "reason": str})
"""One changed parameter: ``{"param", "from", "to", "reason"}`` (API.md ``X-Adjustments``)."""


# ----------------------------------------------------------------- constraints
@dataclass(frozen=True, slots=True)
class ModelConstraints:
    """What a model accepts (API.md ``constraints``).

    - ``multiple_of``: width and height must be multiples of it;
    - ``min_side_px`` / ``max_side_px``: bounds on each side (min defaults to
      ``multiple_of``);
    - ``max_steps``: cap on ``num_inference_steps``;
    - ``frames``: ``"4k+1"`` (frame counts of the form 4k+1) or None (any);
    - ``min_frames`` / ``max_frames``: bounds on ``num_frames``;
    - ``max_pixel_frames``: cap on ``width * height * frames`` (frames = 1
      for images).

    :meth:`coerce` accepts this class, a mapping, or any object with these
    attributes (such as a pydantic model; a nested ``frames`` object with
    ``form`` / ``min_frames`` / ``max_frames`` is understood).
    """

    multiple_of: int = 1
    min_side_px: int | None = None
    max_side_px: int | None = None
    max_steps: int | None = None
    frames: Literal["4k+1"] | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    max_pixel_frames: int | None = None

    def __post_init__(self) -> None:
        require(self.multiple_of >= 1, "multiple_of", "must be >= 1")
        require(self.frames in (None, "4k+1"), "frames", "must be '4k+1' or null")
        lo, hi = self.side_bounds()
        require(
            hi is None or lo <= hi,
            "max_side_px",
            f"admits no multiple of {self.multiple_of} at or above min_side_px",
        )
        require(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        flo, fhi = self.frame_bounds()
        require(fhi is None or flo <= fhi, "max_frames", "admits no valid frame count")
        if self.max_pixel_frames is not None:
            require(
                self.max_pixel_frames >= lo * lo * flo,
                "max_pixel_frames",
                "is below the smallest valid request",
            )

    @classmethod
    def coerce(cls, obj: Any) -> ModelConstraints:
        """Build from this class, a mapping, or an object with the same attributes."""
        if isinstance(obj, ModelConstraints):
            return obj
        if obj is None:
            return cls()

        def get(name: str) -> Any:
            if isinstance(obj, Mapping):
                return obj.get(name)
            return getattr(obj, name, None)

        frames = get("frames")
        form: Any = frames
        min_frames = get("min_frames")
        max_frames = get("max_frames")
        if frames is not None and not isinstance(frames, str):
            sub: Any = frames

            def fget(name: str) -> Any:
                if isinstance(sub, Mapping):
                    return sub.get(name)
                return getattr(sub, name, None)

            form = fget("form") or "4k+1"
            min_frames = fget("min_frames") if min_frames is None else min_frames
            max_frames = fget("max_frames") if max_frames is None else max_frames
        if form == "any":
            form = None
        known = {f.name for f in fields(cls)}
        values = {
            "multiple_of": get("multiple_of") or 1,
            "min_side_px": get("min_side_px"),
            "max_side_px": get("max_side_px"),
            "max_steps": get("max_steps"),
            "frames": form,
            "min_frames": min_frames,
            "max_frames": max_frames,
            "max_pixel_frames": get("max_pixel_frames"),
        }
        return cls(**{k: v for k, v in values.items() if k in known})

    def side_bounds(self) -> tuple[int, int | None]:
        """Smallest and largest valid side (multiples of ``multiple_of``)."""
        m = self.multiple_of
        lo = max(m, _ceil_to(self.min_side_px or m, m))
        hi = None if self.max_side_px is None else _floor_to(self.max_side_px, m)
        return lo, hi

    def frame_bounds(self) -> tuple[int, int | None]:
        """Smallest and largest valid frame count."""
        lo = max(1, self.min_frames or 1)
        hi = self.max_frames
        if self.frames == "4k+1":
            lo = _up_4k1(lo)
            hi = None if hi is None else _down_4k1(hi)
        return lo, hi

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _floor_to(x: float, m: int) -> int:
    return int(math.floor(x / m + 1e-9)) * m


def _ceil_to(x: float, m: int) -> int:
    return int(math.ceil(x / m - 1e-9)) * m


def _nearest_to(x: float, m: int) -> int:
    return int(math.floor(x / m + 0.5)) * m


def _down_4k1(f: int) -> int:
    return 1 if f < 1 else ((f - 1) // 4) * 4 + 1


def _up_4k1(f: int) -> int:
    return 1 if f <= 1 else ((f - 1 + 3) // 4) * 4 + 1


# ---------------------------------------------------------------------- ladder
@dataclass(frozen=True, slots=True)
class DegradationLevel:
    """One rung. Level 0 is normal (no field set)."""

    level: int = 0
    name: str = ""
    step_factor: float = 1.0
    min_steps: int = 1
    max_side_px: int | None = None
    max_frames: int | None = None
    max_guidance_scale: float | None = None

    def __post_init__(self) -> None:
        require(self.level >= 0, "level", "must be >= 0")
        require(0.0 < self.step_factor <= 1.0, "step_factor", "must be within (0, 1]")
        require(self.min_steps >= 1, "min_steps", "must be >= 1")
        require(self.max_side_px is None or self.max_side_px >= 1, "max_side_px", "must be >= 1")
        require(self.max_frames is None or self.max_frames >= 1, "max_frames", "must be >= 1")
        require(
            self.max_guidance_scale is None or self.max_guidance_scale >= 0,
            "max_guidance_scale",
            "must be >= 0",
        )

    @property
    def neutral(self) -> bool:
        """True when the rung changes nothing."""
        return (
            self.step_factor == 1.0
            and self.max_side_px is None
            and self.max_frames is None
            and self.max_guidance_scale is None
        )

    @property
    def reason(self) -> str:
        """The ``X-Adjustments`` reason for this rung."""
        return f"degradation level {self.level}"


def _cap_le(a: float | None, b: float | None) -> bool:
    """Is cap ``a`` at least as strict as cap ``b`` (None = no cap)?"""
    if a is None:
        return b is None
    return b is None or a <= b


class DegradationLadder:
    """Levels 0..N. ``levels[0]`` must be neutral; each rung at least as
    strict as the one before (config errors name the offending rung)."""

    def __init__(
        self,
        levels: Sequence[DegradationLevel] = (),
        *,
        path: str = "levels",
        index_offset: int = 0,
    ) -> None:
        rungs = list(levels) or [DegradationLevel()]
        fixed: list[DegradationLevel] = []
        for i, rung in enumerate(rungs):
            fixed.append(rung if rung.level == i else _replace_level(rung, i))
        if not fixed[0].neutral:
            raise ConfigError(f"{path}[0]: level 0 must change nothing", key=f"{path}[0]")
        for i in range(1, len(fixed)):
            prev, cur = fixed[i - 1], fixed[i]
            where = f"{path}[{i - index_offset}]"
            for attr in ("step_factor", "max_side_px", "max_frames", "max_guidance_scale"):
                if not _cap_le(getattr(cur, attr), getattr(prev, attr)):
                    raise ConfigError(
                        f"{where}.{attr} ({getattr(cur, attr)}) is looser than level "
                        f"{i - 1}'s ({getattr(prev, attr)}); each level must be at least "
                        "as strict as the one below",
                        key=f"{where}.{attr}",
                    )
        self.levels: tuple[DegradationLevel, ...] = tuple(fixed)

    @classmethod
    def from_config(
        cls,
        rungs: Sequence[Mapping[str, Any] | DegradationLevel | object],
        path: str = "degradation.levels",
    ) -> DegradationLadder:
        """Build from config: ``rungs`` are levels 1..N (level 0 is implicit)."""
        built = [DegradationLevel()]
        for i, rung in enumerate(rungs, start=1):
            if isinstance(rung, DegradationLevel):
                built.append(_replace_level(rung, i))
                continue
            raw = rung.model_dump() if hasattr(rung, "model_dump") else rung
            if not isinstance(raw, Mapping):
                raise ConfigError(f"{path}[{i - 1}]: expected a mapping", key=f"{path}[{i - 1}]")
            data = {k: v for k, v in raw.items() if k != "level"}
            built.append(build_policy(DegradationLevel, {**data, "level": i}, f"{path}[{i - 1}]"))
        return cls(built, path=path, index_offset=1)

    @property
    def max_level(self) -> int:
        """The highest level N."""
        return len(self.levels) - 1

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, level: int) -> DegradationLevel:
        """Rung ``level``, clamped into 0..N."""
        return self.levels[max(0, min(level, self.max_level))]

    def adjust(
        self, params: Mapping[str, Any], level: int, constraints: Any
    ) -> tuple[dict[str, Any], list[Adjustment]]:
        """:func:`adjust_parameters` at rung ``level`` of this ladder."""
        return adjust_parameters(params, self[level], constraints)

    def to_config(self) -> list[dict[str, Any]]:
        """Rungs 1..N as config dicts (inverse of :meth:`from_config`)."""
        return [{k: v for k, v in asdict(r).items() if k != "level"} for r in self.levels[1:]]


def _replace_level(rung: DegradationLevel, level: int) -> DegradationLevel:
    data = asdict(rung)
    data["level"] = level
    return DegradationLevel(**data)


# ------------------------------------------------------------------ adjustment
class _Changes:
    def __init__(self, params: Mapping[str, Any]) -> None:
        self.orig = dict(params)
        self.out = dict(params)
        self.reasons: dict[str, list[str]] = {}

    def set(self, param: str, value: Any, reason: str) -> None:
        if self.out.get(param) == value:
            return
        self.out[param] = value
        rs = self.reasons.setdefault(param, [])
        if reason not in rs:
            rs.append(reason)

    def result(self) -> tuple[dict[str, Any], list[Adjustment]]:
        changes: list[Adjustment] = []
        for param in ("width", "height", "num_inference_steps", "num_frames", "guidance_scale"):
            if param in self.reasons and self.out.get(param) != self.orig.get(param):
                changes.append(
                    {
                        "param": param,
                        "from": self.orig.get(param),
                        "to": self.out[param],
                        "reason": "; ".join(self.reasons[param]),
                    }
                )
        return self.out, changes


def _min_cap(*caps: tuple[int | None, str]) -> tuple[int | None, str]:
    best: tuple[int | None, str] = (None, "")
    for cap, why in caps:
        if cap is not None and (best[0] is None or cap < best[0]):
            best = (cap, why)
    return best


def adjust_parameters(
    params: Mapping[str, Any],
    level: DegradationLevel | None,
    constraints: ModelConstraints | Mapping[str, Any] | Any,
) -> tuple[dict[str, Any], list[Adjustment]]:
    """Apply ``level`` (None: none) to ``params``, then fit ``constraints``.

    Returns ``(new_params, changes)``; ``changes`` lists each changed
    parameter once (``{"param", "from", "to", "reason"}``). The result always
    satisfies the constraints: sides are multiples of ``multiple_of`` within
    the side bounds, frames within bounds (and ``4k+1`` when required), steps
    within ``1..max_steps``, ``width * height * frames`` within
    ``max_pixel_frames``. Degradation never raises a parameter.
    """
    c = ModelConstraints.coerce(constraints)
    ch = _Changes(params)
    lvl = level if level is not None and not level.neutral else None
    lvl_why = lvl.reason if lvl is not None else ""

    # steps
    steps = params.get("num_inference_steps")
    if steps is not None:
        s = int(steps)
        if lvl is not None and lvl.step_factor < 1.0:
            target = max(lvl.min_steps, int(round(s * lvl.step_factor)))
            if target < s:
                ch.set("num_inference_steps", target, lvl_why)
                s = target
        if c.max_steps is not None and s > c.max_steps:
            s = c.max_steps
            ch.set("num_inference_steps", s, f"model constraint: max_steps {c.max_steps}")
        if s < 1:
            s = 1
            ch.set("num_inference_steps", s, "model constraint: at least 1 step")

    # frames
    frames = params.get("num_frames")
    f_final: int | None = None
    if frames is not None:
        f = int(frames)
        flo, fhi = c.frame_bounds()
        cap, why = _min_cap(
            (lvl.max_frames if lvl is not None else None, lvl_why),
            (fhi, f"model constraint: max_frames {c.max_frames}"),
        )
        if cap is not None and f > cap:
            f = cap
            ch.set("num_frames", f, why)
        if c.frames == "4k+1" and (f - 1) % 4 != 0:
            f = _down_4k1(f) if f > flo else flo
            ch.set("num_frames", f, "model constraint: frames of the form 4k+1")
        if f < flo:
            f = flo
            ch.set("num_frames", f, f"model constraint: at least {flo} frames")
        f_final = f

    # sides
    w0, h0 = params.get("width"), params.get("height")
    if w0 is not None and h0 is not None:
        m = c.multiple_of
        lo, _ = c.side_bounds()
        cap, why = _min_cap(
            (lvl.max_side_px if lvl is not None else None, lvl_why),
            (c.max_side_px, f"model constraint: max_side_px {c.max_side_px}"),
        )
        top = None if cap is None else max(lo, _floor_to(cap, m))
        capped = cap is not None and max(float(w0), float(h0)) > cap
        scale = cap / max(float(w0), float(h0)) if capped and cap is not None else 1.0
        sides: list[int] = []
        for param, raw in (("width", w0), ("height", h0)):
            x = float(raw) * scale
            v = _floor_to(x, m) if capped else _nearest_to(x, m)
            if v < lo:
                v, reason = lo, f"model constraint: min side {lo}px"
            elif top is not None and v > top:
                v, reason = top, why
            else:
                reason = why if capped else f"model constraint: multiple of {m}"
            if v != raw:
                ch.set(param, v, reason)
            sides.append(v)
        wi, hi_ = sides

        # pixel-frame budget: shrink sides first, then frames
        budget = c.max_pixel_frames
        if budget is not None:
            nf = f_final or 1
            if wi * hi_ * nf > budget:
                why_b = f"model constraint: max_pixel_frames {budget}"
                scale = math.sqrt(budget / (wi * hi_ * nf))
                wi = max(lo, _floor_to(wi * scale, m))
                hi_ = max(lo, _floor_to(hi_ * scale, m))
                while wi * hi_ * nf > budget and (wi > lo or hi_ > lo):
                    if wi >= hi_ and wi > lo:
                        wi -= m
                    else:
                        hi_ -= m
                ch.set("width", wi, why_b)
                ch.set("height", hi_, why_b)
                if f_final is not None and wi * hi_ * f_final > budget:
                    flo, _ = c.frame_bounds()
                    nf = max(flo, budget // (wi * hi_))
                    if c.frames == "4k+1":
                        nf = max(flo, _down_4k1(nf))
                    ch.set("num_frames", nf, why_b)

    # guidance
    g = params.get("guidance_scale")
    if g is not None and lvl is not None and lvl.max_guidance_scale is not None:
        if float(g) > lvl.max_guidance_scale:
            ch.set("guidance_scale", lvl.max_guidance_scale, lvl_why)

    return ch.result()


# ------------------------------------------------------------------ controller
@dataclass(frozen=True, slots=True)
class DegradationPolicy:
    """When the controller moves the level (rates are fractions 0..1).

    Raise (one step, at most every ``raise_interval_s``) when, over the last
    ``window_s`` with at least ``min_samples`` requests, the error, OOM or
    backpressure rate reaches its threshold, or p95 latency exceeds
    ``latency_slo_s``; or when a breaker opens (``raise_on_breaker_open``).
    Lower one step after ``healthy_period_s`` of continuous health: no open
    breaker, every rate below ``threshold * hysteresis_ratio`` and p95 at most
    ``latency_slo_s * latency_recover_ratio`` (too few samples counts as
    healthy). Anything in between holds the level and restarts the period.
    """

    window_s: float = 60.0
    min_samples: int = 20
    error_rate_threshold: float = 0.25
    oom_rate_threshold: float = 0.05
    backpressure_rate_threshold: float = 0.10
    latency_slo_s: float | None = None
    hysteresis_ratio: float = 0.5
    latency_recover_ratio: float = 0.8
    raise_interval_s: float = 15.0
    healthy_period_s: float = 120.0
    raise_on_breaker_open: bool = True

    def __post_init__(self) -> None:
        require(self.window_s > 0, "window_s", "must be > 0")
        require(self.min_samples >= 1, "min_samples", "must be >= 1")
        for name in ("error_rate_threshold", "oom_rate_threshold", "backpressure_rate_threshold"):
            value = getattr(self, name)
            require(0.0 < value <= 1.0, name, "must be within (0, 1]")
        require(
            self.latency_slo_s is None or self.latency_slo_s > 0, "latency_slo_s", "must be > 0"
        )
        require(0.0 < self.hysteresis_ratio < 1.0, "hysteresis_ratio", "must be within (0, 1)")
        require(
            0.0 < self.latency_recover_ratio <= 1.0,
            "latency_recover_ratio",
            "must be within (0, 1]",
        )
        require(self.raise_interval_s >= 0, "raise_interval_s", "must be >= 0")
        require(self.healthy_period_s > 0, "healthy_period_s", "must be > 0")

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any] | object | None, path: str = "degradation.controller"
    ) -> DegradationPolicy:
        """Build from a config mapping; errors name ``path.key``."""
        return build_policy(cls, data, path)


@dataclass(frozen=True, slots=True)
class Signals:
    """The controller's inputs over its window."""

    samples: int = 0
    error_rate: float = 0.0
    oom_rate: float = 0.0
    backpressure_rate: float = 0.0
    p95_latency_s: float | None = None
    open_breakers: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class LevelChange:
    """The effective level moved."""

    from_level: int
    to_level: int
    at_s: float
    reason: str
    mode: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "from": self.from_level,
            "to": self.to_level,
            "at": self.at_s,
            "reason": self.reason,
            "mode": self.mode,
        }


LevelListener = Callable[[LevelChange], None]

_SAMPLES, _ERRORS, _OOMS, _BACKPRESSURE = 0, 1, 2, 3
_IGNORED_KINDS = frozenset({"invalid_request", "cancelled", "invalid_config"})


class DegradationController:
    """Holds the cluster-wide degradation level (see :class:`DegradationPolicy`).

    Feed it with :meth:`record` (each request's final outcome) and
    :meth:`breaker_transition` (as a breaker listener), call
    :meth:`evaluate` periodically (or pass externally computed
    :class:`Signals`). :meth:`set_override` pins a level (admin), ``None``
    returns to ``auto``.
    """

    def __init__(
        self,
        ladder: DegradationLadder | int,
        policy: DegradationPolicy | Mapping[str, Any] | object | None = None,
        *,
        clock: Clock = time.time,
        listeners: Iterable[LevelListener] = (),
    ) -> None:
        self.max_level = ladder if isinstance(ladder, int) else ladder.max_level
        self.ladder = None if isinstance(ladder, int) else ladder
        self.policy = (
            policy
            if isinstance(policy, DegradationPolicy)
            else DegradationPolicy.from_mapping(policy)
        )
        self._clock = clock
        self._listeners: list[LevelListener] = list(listeners)
        self._counts = RollingCounts(self.policy.window_s, 4, clock, n_buckets=12)
        self._lat = RollingCounts(self.policy.window_s, LATENCY_BINS, clock, n_buckets=12)
        self._auto = 0
        self._override: int | None = None
        self._last_raise_at: float | None = None
        self._last_change_at: float | None = None
        self._healthy_since: float | None = None
        self._open: set[str] = set()
        self._pending_open: list[str] = []
        self.history: list[LevelChange] = []
        self._max_history = 100

    # ---------------------------------------------------------------- state
    @property
    def level(self) -> int:
        """The effective level (the override if set, else the automatic one)."""
        return self._override if self._override is not None else self._auto

    @property
    def auto_level(self) -> int:
        """The level the controller itself chose."""
        return self._auto

    @property
    def mode(self) -> str:
        """``"manual"`` while an override is set, else ``"auto"``."""
        return "manual" if self._override is not None else "auto"

    @property
    def current(self) -> DegradationLevel:
        """The rung of the effective level (needs a ladder)."""
        if self.ladder is None:
            return DegradationLevel(level=self.level)
        return self.ladder[self.level]

    def status(self) -> dict[str, Any]:
        """``{"level", "mode"}`` as in API.md ``GET /v1/status``."""
        return {"level": self.level, "mode": self.mode}

    def add_listener(self, listener: LevelListener) -> None:
        """Call ``listener(LevelChange)`` whenever the effective level moves."""
        self._listeners.append(listener)

    def remove_listener(self, listener: LevelListener) -> None:
        """Stop calling ``listener``."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _emit(self, before: int, reason: str) -> None:
        after = self.level
        if after == before:
            return
        event = LevelChange(before, after, self._clock(), reason, self.mode)
        self.history.append(event)
        if len(self.history) > self._max_history:
            del self.history[0]
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("degradation listener failed")

    # --------------------------------------------------------------- inputs
    def record(self, kind: str | None, latency_s: float | None = None) -> None:
        """One request's final outcome (``kind`` None = success)."""
        if kind in _IGNORED_KINDS:
            return
        self._counts.add(_SAMPLES)
        if kind is not None:
            if kind == "backpressure":
                self._counts.add(_BACKPRESSURE)
            else:
                self._counts.add(_ERRORS)
                if kind == "out_of_memory":
                    self._counts.add(_OOMS)
        if latency_s is not None and kind is None:
            self._lat.add(latency_bin(latency_s))

    def breaker_transition(self, event: BreakerTransition) -> None:
        """Breaker listener: an opening raises the level on the next evaluation."""
        self.breaker_state(event.key, event.to_state)

    def breaker_state(self, key: str, state: BreakerState | str) -> None:
        """Tell the controller a breaker's state; OPEN blocks lowering."""
        st = BreakerState(state)
        if st is BreakerState.OPEN:
            if key not in self._open:
                self._pending_open.append(key)
            self._open.add(key)
        elif st is BreakerState.CLOSED:
            self._open.discard(key)

    def signals(self) -> Signals:
        """Signals from the controller's own window."""
        samples, errors, ooms, bp = self._counts.totals()
        p95 = quantile_from_bins(self._lat.totals(), 0.95)
        if samples == 0:
            return Signals(0, 0.0, 0.0, 0.0, p95, len(self._open))
        return Signals(
            samples, errors / samples, ooms / samples, bp / samples, p95, len(self._open)
        )

    # ------------------------------------------------------------- decision
    def evaluate(self, signals: Signals | None = None) -> int:
        """Apply the policy now; returns the effective level."""
        pol = self.policy
        now = self._clock()
        sig = signals if signals is not None else self.signals()
        before = self.level
        problems: list[str] = []
        enough = sig.samples >= pol.min_samples
        if enough:
            if sig.error_rate >= pol.error_rate_threshold:
                problems.append(
                    f"error rate {sig.error_rate:.0%} >= {pol.error_rate_threshold:.0%}"
                )
            if sig.oom_rate >= pol.oom_rate_threshold:
                problems.append(f"OOM rate {sig.oom_rate:.0%} >= {pol.oom_rate_threshold:.0%}")
            if sig.backpressure_rate >= pol.backpressure_rate_threshold:
                problems.append(
                    f"backpressure rate {sig.backpressure_rate:.0%} >= "
                    f"{pol.backpressure_rate_threshold:.0%}"
                )
            if (
                pol.latency_slo_s is not None
                and sig.p95_latency_s is not None
                and sig.p95_latency_s > pol.latency_slo_s
            ):
                problems.append(
                    f"p95 latency {sig.p95_latency_s:.3g}s > SLO {pol.latency_slo_s:g}s"
                )
        if self._pending_open and pol.raise_on_breaker_open:
            problems.append("breaker opened: " + ", ".join(self._pending_open))
        self._pending_open = []

        r = pol.hysteresis_ratio
        healthy = sig.open_breakers == 0 and (
            not enough
            or (
                sig.error_rate < pol.error_rate_threshold * r
                and sig.oom_rate < pol.oom_rate_threshold * r
                and sig.backpressure_rate < pol.backpressure_rate_threshold * r
                and (
                    pol.latency_slo_s is None
                    or sig.p95_latency_s is None
                    or sig.p95_latency_s <= pol.latency_slo_s * pol.latency_recover_ratio
                )
            )
        )
        if problems:
            self._healthy_since = None
            due = self._last_raise_at is None or now - self._last_raise_at >= pol.raise_interval_s
            if due and self._auto < self.max_level:
                self._auto += 1
                self._last_raise_at = now
                self._last_change_at = now
                self._emit(before, "; ".join(problems))
        elif healthy:
            if self._healthy_since is None:
                self._healthy_since = now
            elif self._auto > 0 and now - self._healthy_since >= pol.healthy_period_s:
                self._auto -= 1
                self._healthy_since = now
                self._last_change_at = now
                self._emit(before, f"healthy for {pol.healthy_period_s:g}s")
        else:
            self._healthy_since = None
        return self.level

    def set_override(self, level: int | None, reason: str = "admin override") -> int:
        """Pin the effective level (clamped to 0..N), or ``None`` for auto."""
        before = self.level
        if level is None:
            self._override = None
            self._emit(before, "override released")
        else:
            self._override = max(0, min(int(level), self.max_level))
            self._emit(before, reason)
        return self.level

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> dict[str, Any]:
        """JSON-able state (level, override, timers, open breakers, windows)."""
        return {
            "version": 1,
            "auto_level": self._auto,
            "override": self._override,
            "last_raise_at": self._last_raise_at,
            "last_change_at": self._last_change_at,
            "healthy_since": self._healthy_since,
            "open_breakers": sorted(self._open),
            "counts": self._counts.to_dict(),
            "latency": self._lat.to_dict(),
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        """Load :meth:`snapshot` output (emits no events)."""
        self._auto = max(0, min(int(snap.get("auto_level", 0)), self.max_level))
        ov = snap.get("override")
        self._override = None if ov is None else max(0, min(int(ov), self.max_level))
        self._last_raise_at = snap.get("last_raise_at")
        self._last_change_at = snap.get("last_change_at")
        self._healthy_since = snap.get("healthy_since")
        self._open = {str(k) for k in snap.get("open_breakers", [])}
        self._counts.load(snap.get("counts") or {})
        self._lat.load(snap.get("latency") or {})
