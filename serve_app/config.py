"""genguard's application settings: one pydantic model, validated once at start.

The Serve config file (``configs/<env>.yaml``) holds two kinds of facts, each
in one place only:

* ``applications[].deployments[]``: Serve-native resources and scaling
  (``ray_actor_options``, replicas, autoscaling, queue limits, health checks).
* ``applications[].args``: genguard's own settings, parsed by ``AppConfig``
  below: models (source, dtype, constraints, defaults), workflows and their
  fallback chains, deadlines, request limits, fault injection.

An invalid file fails at start-up with the dotted path of the offending key
(pydantic's error locations), e.g. ``workflows.text-to-image.chain.1: unknown
model 'qwen-imag'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.params import MODEL_KEYS, WORKFLOWS

REPO_ROOT = Path(__file__).resolve().parent.parent

# Which runner family serves which model key. One deployment class per family
# may serve several keys; the deployment is always named after the key.
PIPELINE_CLASSES: dict[str, str] = {
    "hunyuan-video": "HunyuanVideoPipeline",
    "wan-t2v": "WanPipeline",
    "wan-i2v": "WanImageToVideoPipeline",
    "wan-ati": "WanATIPipeline",
    "newbie-image": "Lumina2Pipeline",
    "qwen-image": "QwenImagePipeline",
    "qwen-image-edit": "QwenImageEditPipeline",
}

# What inputs each workflow carries, and what each model can consume. A chain
# step that cannot consume one of its workflow's inputs must declare it in
# ``drops`` (a substitute), otherwise the config is rejected.
WORKFLOW_INPUTS: dict[str, frozenset[str]] = {
    "text-to-image": frozenset({"prompt"}),
    "image-edit": frozenset({"prompt", "image"}),
    "text-to-video": frozenset({"prompt"}),
    "image-to-video": frozenset({"prompt", "image"}),
    "trajectory-to-video": frozenset({"prompt", "image", "trajectories"}),
}
WORKFLOW_OUTPUT: dict[str, Literal["image", "video"]] = {
    "text-to-image": "image",
    "image-edit": "image",
    "text-to-video": "video",
    "image-to-video": "video",
    "trajectory-to-video": "video",
}
MODEL_INPUTS: dict[str, frozenset[str]] = {
    "hunyuan-video": frozenset({"prompt"}),
    "wan-t2v": frozenset({"prompt"}),
    "wan-i2v": frozenset({"prompt", "image"}),
    "wan-ati": frozenset({"prompt", "image", "trajectories"}),
    "newbie-image": frozenset({"prompt"}),
    "qwen-image": frozenset({"prompt"}),
    "qwen-image-edit": frozenset({"prompt", "image"}),
}
MODEL_OUTPUT: dict[str, Literal["image", "video"]] = {
    "hunyuan-video": "video",
    "wan-t2v": "video",
    "wan-i2v": "video",
    "wan-ati": "video",
    "newbie-image": "image",
    "qwen-image": "image",
    "qwen-image-edit": "image",
}
# Inputs a model needs: a step may not serve a workflow that lacks them.
MODEL_REQUIRES: dict[str, frozenset[str]] = {
    "wan-i2v": frozenset({"image"}),
    "wan-ati": frozenset({"image"}),
    "qwen-image-edit": frozenset({"image"}),
}

_Frozen = ConfigDict(extra="forbid", frozen=True)


class FrameConstraints(BaseModel):
    """Frame-count rule of a video model."""

    model_config = _Frozen

    form: Literal["4k+1", "any"] = "4k+1"
    min_frames: int = Field(1, ge=1)
    max_frames: int = Field(129, ge=1)

    @model_validator(mode="after")
    def _range(self) -> FrameConstraints:
        if self.min_frames > self.max_frames:
            raise ValueError("min_frames must not exceed max_frames")
        return self


class Constraints(BaseModel):
    """Input constraints of one model, declared once and checked by
    ``serve_app.validation.check_params`` in the router and the deployment."""

    model_config = _Frozen

    multiple_of: int = Field(16, ge=1)
    min_side_px: int = Field(16, ge=1)
    max_side_px: int = Field(2048, ge=1)
    # Some schedulers degenerate at one step (Qwen-Image's shift_terminal
    # divides by zero: NaN frames), so a model may need more.
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(100, ge=1)
    max_guidance_scale: float = Field(50.0, ge=0, allow_inf_nan=False)
    frames: FrameConstraints | None = None
    # width * height * frames (frames = 1 for images): the compute/memory
    # budget of one request on this model.
    max_pixel_frames: int = Field(4_194_304, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)
    max_tracks: int = Field(16, ge=1)
    max_track_points: int = Field(1024, ge=1)
    # Input images (edit, image-to-video): decoded pixel count and aspect ratio.
    max_image_pixels: int = Field(16_777_216, ge=1)
    max_image_aspect: float = Field(20.0, ge=1, allow_inf_nan=False)

    @model_validator(mode="after")
    def _sides(self) -> Constraints:
        if self.min_side_px > self.max_side_px:
            raise ValueError("min_side_px must not exceed max_side_px")
        if self.max_side_px < self.multiple_of:
            raise ValueError("max_side_px must be at least multiple_of")
        if self.min_steps > self.max_steps:
            raise ValueError("min_steps must not exceed max_steps")
        return self


class Defaults(BaseModel):
    """Parameters used when the request leaves them out."""

    model_config = _Frozen

    width: int = 64
    height: int = 64
    num_inference_steps: int = 4
    guidance_scale: float | None = None
    num_frames: int | None = None
    fps: int = 8


class ModelConfig(BaseModel):
    model_config = _Frozen

    source: str = Field(min_length=1, description="local path or hub repo id for from_pretrained")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    constraints: Constraints = Constraints()
    defaults: Defaults = Defaults()
    # Per-replica sickness threshold: check_health fails after this many
    # consecutive failed generations, so Serve replaces this replica only.
    unhealthy_after_failures: int = Field(5, ge=1)


class ChainStep(BaseModel):
    model_config = _Frozen

    model: str
    drops: tuple[Literal["image", "trajectories"], ...] = ()


def _coerce_step(value: Any) -> Any:
    return {"model": value} if isinstance(value, str) else value


class WorkflowConfig(BaseModel):
    model_config = _Frozen

    chain: tuple[Annotated[ChainStep, Field()], ...] = Field(min_length=1)

    @field_validator("chain", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [_coerce_step(v) for v in value]
        return value

    @property
    def models(self) -> list[str]:
        return [s.model for s in self.chain]


class DeadlineConfig(BaseModel):
    model_config = _Frozen

    default_s: float = Field(120.0, gt=0)
    max_s: float = Field(300.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> DeadlineConfig:
        if self.default_s > self.max_s:
            raise ValueError("default_s must not exceed max_s")
        return self


class FaultInjectionConfig(BaseModel):
    model_config = _Frozen

    enabled: bool = False
    # Seconds between a replica's reads of the fault table (faults are picked
    # up within this period).
    poll_s: float = Field(0.5, gt=0, le=1.0)


class SupervisorConfig(BaseModel):
    """How routers talk to the supervisor (never once per request)."""

    model_config = _Frozen

    # Successes are reported in batches at most this often; a failure is
    # flushed at once (debounced by flush_failure_s) so a breaker trips fast.
    report_interval_s: float = Field(5.0, gt=0)
    flush_failure_s: float = Field(0.05, ge=0)
    # Long-poll timeout of the snapshot refresh.
    refresh_timeout_s: float = Field(10.0, gt=0)
    # A snapshot older than this (supervisor unreachable) makes the router
    # fall back to its local breakers and its own health polling.
    stale_after_s: float = Field(15.0, gt=0)
    health_poll_s: float = Field(1.0, gt=0)
    tick_s: float = Field(0.2, gt=0)

    @model_validator(mode="after")
    def _stale(self) -> SupervisorConfig:
        if self.stale_after_s <= self.refresh_timeout_s:
            raise ValueError("stale_after_s must exceed refresh_timeout_s (a long-poll may take that long)")
        return self


class DegradationConfig(BaseModel):
    model_config = _Frozen

    levels: tuple[dict[str, Any], ...] = (
        {"name": "light", "step_factor": 0.75, "min_steps": 2, "max_frames": 65},
        {"name": "medium", "step_factor": 0.5, "min_steps": 2, "max_side_px": 1024, "max_frames": 49},
        {"name": "heavy", "step_factor": 0.25, "min_steps": 2, "max_side_px": 768, "max_frames": 33},
    )
    policy: dict[str, Any] = Field(default_factory=dict)


class ResilienceConfig(BaseModel):
    """Retry, breaker, budget and degradation policies, validated by the
    ``resilience`` constructors at start-up (errors name the key)."""

    model_config = _Frozen

    retry: dict[str, Any] = Field(
        default_factory=lambda: {
            "max_attempts": 3,
            "initial_backoff_s": 0.2,
            "max_backoff_s": 2.0,
            "multiplier": 2.0,
            "jitter": 0.5,
        }
    )
    max_total_attempts: int = Field(6, ge=1)
    # While later steps remain in the chain, one attempt may use at most this
    # share of the time left, so a hung or restarting replica leaves time for
    # the fallback instead of ending in a 504 (0 disables).
    fallback_reserve_ratio: float = Field(0.5, ge=0.0, lt=1.0)
    retry_budget: dict[str, Any] = Field(default_factory=dict)
    on_budget_exhausted: Literal["next_step", "fail"] = "next_step"
    breaker: dict[str, Any] = Field(default_factory=dict)
    breaker_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    degradation: DegradationConfig = DegradationConfig()
    supervisor: SupervisorConfig = SupervisorConfig()

    @model_validator(mode="after")
    def _policies(self) -> ResilienceConfig:
        from resilience import (
            BreakerConfig,
            DegradationLadder,
            DegradationPolicy,
            RetryBudgetPolicy,
            RetryPolicy,
        )

        RetryPolicy.from_mapping(self.retry, path="resilience.retry")
        RetryBudgetPolicy.from_mapping(self.retry_budget, path="resilience.retry_budget")
        BreakerConfig.from_mapping(self.breaker, path="resilience.breaker")
        for key, over in self.breaker_overrides.items():
            if key not in MODEL_KEYS:
                raise ValueError(f"resilience.breaker_overrides.{key}: unknown model")
            BreakerConfig.from_mapping({**self.breaker, **over}, path=f"resilience.breaker_overrides.{key}")
        DegradationLadder.from_config(list(self.degradation.levels), path="resilience.degradation.levels")
        DegradationPolicy.from_mapping(self.degradation.policy, path="resilience.degradation.policy")
        return self


DEFAULT_CHAINS: dict[str, tuple[str | dict[str, Any], ...]] = {
    "text-to-image": ("qwen-image", "newbie-image"),
    "image-edit": ("qwen-image-edit", {"model": "qwen-image", "drops": ["image"]}),
    "text-to-video": ("hunyuan-video", "wan-t2v"),
    "image-to-video": ("wan-i2v", "wan-ati"),
    "trajectory-to-video": ("wan-ati", {"model": "wan-i2v", "drops": ["trajectories"]}),
}


class AppConfig(BaseModel):
    """genguard's own settings (``applications[].args`` of a Serve config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_root: str | None = Field(
        None, description="relative model sources resolve against this directory"
    )
    models: dict[str, ModelConfig]
    workflows: dict[str, WorkflowConfig] = Field(
        default_factory=lambda: {
            k: WorkflowConfig.model_validate({"chain": list(v)}) for k, v in DEFAULT_CHAINS.items()
        }
    )
    deadline: DeadlineConfig = DeadlineConfig()
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    fault_injection: FaultInjectionConfig = FaultInjectionConfig()
    resilience: ResilienceConfig = ResilienceConfig()

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: dict[str, ModelConfig]) -> dict[str, ModelConfig]:
        for key in value:
            if key not in MODEL_KEYS:
                raise ValueError(f"unknown model key {key!r}; known: {', '.join(MODEL_KEYS)}")
        return value

    @model_validator(mode="after")
    def _chains(self) -> AppConfig:
        problems: list[str] = []
        for wf, wcfg in self.workflows.items():
            if wf not in WORKFLOWS:
                problems.append(f"workflows.{wf}: unknown workflow; known: {', '.join(WORKFLOWS)}")
                continue
            seen: set[str] = set()
            for i, step in enumerate(wcfg.chain):
                where = f"workflows.{wf}.chain.{i}"
                if step.model not in self.models:
                    problems.append(
                        f"{where}: unknown model {step.model!r}; configured: "
                        f"{', '.join(sorted(self.models))}"
                    )
                    continue
                if step.model in seen:
                    problems.append(f"{where}: model {step.model!r} appears twice (a cycle)")
                seen.add(step.model)
                if MODEL_OUTPUT[step.model] != WORKFLOW_OUTPUT[wf]:
                    problems.append(
                        f"{where}: {step.model!r} produces {MODEL_OUTPUT[step.model]}, "
                        f"workflow {wf!r} needs {WORKFLOW_OUTPUT[wf]}"
                    )
                missing = MODEL_REQUIRES.get(step.model, frozenset()) - WORKFLOW_INPUTS[wf]
                if missing:
                    problems.append(
                        f"{where}: {step.model!r} needs {', '.join(sorted(missing))}, "
                        f"which workflow {wf!r} does not carry"
                    )
                unconsumed = WORKFLOW_INPUTS[wf] - MODEL_INPUTS[step.model] - set(step.drops)
                if unconsumed:
                    problems.append(
                        f"{where}: {step.model!r} cannot use {', '.join(sorted(unconsumed))}; "
                        f"declare drops: [{', '.join(sorted(unconsumed))}] to allow it as a substitute"
                    )
        if not self.workflows:
            problems.append("workflows: at least one workflow is needed")
        if self.deadline.max_s <= 0:
            problems.append("deadline.max_s must be positive")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolve_source(self, key: str) -> str:
        """A model's source: a local directory if it exists, else a hub repo id."""
        src = self.models[key].source
        candidates: list[Path] = []
        p = Path(src)
        if p.is_absolute():
            return str(p)
        roots = [Path(self.models_root)] if self.models_root else [Path()]
        for root in roots:
            candidates.append(root / p)
            if not root.is_absolute():
                candidates.append(REPO_ROOT / root / p)
        for c in candidates:
            if c.exists():
                return str(c.resolve())
        looks_like_repo_id = src.count("/") == 1 and not src.startswith((".", "/", "~"))
        if looks_like_repo_id:
            return src  # a hub repo id (org/name): from_pretrained fetches or uses its cache
        # Declared as a local path but absent: hand back the best absolute
        # guess so the load error names a real path.
        return str(candidates[-1].resolve())

    def workflow_models(self, workflow: str) -> list[str]:
        return self.workflows[workflow].models

    def workflows_of(self, key: str) -> list[str]:
        return [wf for wf, w in self.workflows.items() if key in w.models]


def load_app_config(args: dict[str, Any]) -> AppConfig:
    """Validate ``applications[].args``. ``GENGUARD_MODELS_ROOT`` may override
    the models root (deployment-specific path, not a policy)."""
    data = dict(args)
    root = os.environ.get("GENGUARD_MODELS_ROOT")
    if root:
        data["models_root"] = root
    return AppConfig.model_validate(data)
