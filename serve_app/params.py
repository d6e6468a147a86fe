"""The one request shape every model family runner receives.

The router validates HTTP JSON into pydantic request models, checks them
against the target model's constraints, and hands the runner a
``GenerationParams``. Runners never see HTTP or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

MODEL_KEYS: tuple[str, ...] = (
    "hunyuan-video",
    "wan-t2v",
    "wan-i2v",
    "wan-ati",
    "newbie-image",
    "qwen-image",
    "qwen-image-edit",
)

WORKFLOWS: tuple[str, ...] = (
    "text-to-image",
    "image-edit",
    "text-to-video",
    "image-to-video",
    "trajectory-to-video",
)

# A track is a list of points; a point is [x, y] or [x, y, visible] with x, y
# normalized to 0..1 image coordinates and visible in {0, 1}.
Track = list[list[float]]


@dataclass(frozen=True)
class GenerationParams:
    """Validated generation parameters for one model call."""

    prompt: str
    width: int
    height: int
    num_inference_steps: int
    seed: int
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    num_frames: int | None = None  # video models only
    fps: int | None = None  # video models only (encoding)
    image: Any = None  # a decoded PIL.Image.Image (RGB) for i2v / edit / ATI
    trajectories: list[Track] | None = None  # wan-ati only
    extra: dict[str, Any] = field(default_factory=dict)

    def with_changes(self, **changes: Any) -> GenerationParams:
        return replace(self, **changes)
