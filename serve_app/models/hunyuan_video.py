"""HunyuanVideo runner: text-to-video on ``HunyuanVideoPipeline``.

HunyuanVideo is guidance-distilled: ``guidance_scale`` is the *embedded*
guidance the transformer is conditioned on (one forward pass per step), not
classic CFG. A ``negative_prompt`` only acts through the pipeline's true CFG,
which doubles the work; it is passed only when ``params.extra`` asks for
``true_cfg_scale`` > 1, otherwise the pipeline would ignore it anyway.

The pipeline's default Llama-3 prompt template (``crop_start=95``) is used
as is, for the real checkpoint and for the tiny one (whose tokenizer is
built so that the template prefix is exactly 95 tokens; see
``serve_app.tiny``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_app.models.runners import PipelineRunner, call_kwargs
from serve_app.params import GenerationParams

__all__ = ["RUNNER", "HunyuanVideoRunner"]


class HunyuanVideoRunner(PipelineRunner):
    """Text-to-video on ``HunyuanVideoPipeline`` (key ``hunyuan-video``)."""

    pipeline_class_name = "HunyuanVideoPipeline"
    video = True

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        kwargs = call_kwargs(params, callback_on_step_end)
        if params.num_frames is not None:
            kwargs["num_frames"] = params.num_frames
        if params.guidance_scale is not None:
            kwargs["guidance_scale"] = params.guidance_scale
        true_cfg = params.extra.get("true_cfg_scale")
        if params.negative_prompt is not None and true_cfg is not None and float(true_cfg) > 1.0:
            kwargs["negative_prompt"] = params.negative_prompt
            kwargs["true_cfg_scale"] = float(true_cfg)
        return kwargs


RUNNER = HunyuanVideoRunner()
