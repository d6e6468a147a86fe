"""NewBie Image runner: text-to-image on the Next-DiT ``Lumina2Pipeline``.

``negative_prompt`` and ``guidance_scale`` (classic CFG, > 1 doubles the
work) are passed through. The pipeline's own system prompt is kept (the tiny
tokenizer has its words, so it costs ~30 tokens of the 256).

``Lumina2Pipeline`` has no ``interrupt`` flag: to stop a generation, raise
from ``callback_on_step_end``; the exception propagates out of ``run``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_app.models.runners import PipelineRunner, call_kwargs
from serve_app.params import GenerationParams

__all__ = ["RUNNER", "NewbieImageRunner"]


class NewbieImageRunner(PipelineRunner):
    """Text-to-image on ``Lumina2Pipeline`` (key ``newbie-image``)."""

    pipeline_class_name = "Lumina2Pipeline"

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        kwargs = call_kwargs(params, callback_on_step_end)
        if params.negative_prompt is not None:
            kwargs["negative_prompt"] = params.negative_prompt
        if params.guidance_scale is not None:
            kwargs["guidance_scale"] = params.guidance_scale
        return kwargs


RUNNER = NewbieImageRunner()
