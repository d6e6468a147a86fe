"""HTTP request bodies (pydantic). Types are checked here; model-specific
rules (multiples, frame forms, budgets) are checked by
``serve_app.validation.check_params`` against the target model."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="what to generate")
    negative_prompt: str | None = None
    width: int | None = Field(None, description="pixels; default from the model's config")
    height: int | None = Field(None, description="pixels; default from the model's config")
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="drawn and echoed in X-Seed when absent")
    model: str | None = Field(None, description="pin the first step of the chain to this model key")
    fallback: Literal["allow", "strict"] = "allow"
    degradation: Literal["allow", "strict"] = "allow"
    deadline_s: float | None = Field(None, gt=0, description="request deadline; capped by config")


class ImageRequest(GenerationRequest):
    """`POST /v1/images`: text-to-image."""


class EditRequest(GenerationRequest):
    """`POST /v1/images/edits`: image edit."""

    image: str = Field(description="input image, base64 (optionally a data: URL)")


class VideoRequest(GenerationRequest):
    """`POST /v1/videos`: text-to-video, image-to-video (with `image`) or
    trajectory-to-video (with `image` and `trajectories`)."""

    num_frames: int | None = None
    fps: int | None = Field(None, ge=1, le=120)
    image: str | None = Field(None, description="first frame, base64 (optionally a data: URL)")
    trajectories: list[list[list[float]]] | None = Field(
        None,
        description="tracks of [x, y] or [x, y, visible] points, x and y normalized to 0..1",
    )
