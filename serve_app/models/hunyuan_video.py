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

import numpy as np

from serve_app.models.runners import call_kwargs, finish_load, frames_array, pipeline_lock
from serve_app.params import GenerationParams

__all__ = ["RUNNER", "HunyuanVideoRunner"]


class HunyuanVideoRunner:
    """Text-to-video on ``HunyuanVideoPipeline`` (key ``hunyuan-video``)."""

    pipeline_class_name = "HunyuanVideoPipeline"

    def load(self, source: str, device: str, dtype: Any) -> Any:
        from diffusers import HunyuanVideoPipeline

        return finish_load(HunyuanVideoPipeline.from_pretrained(source, dtype=dtype), device)

    def run(
        self,
        pipe: Any,
        params: GenerationParams,
        *,
        generator: Any,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> np.ndarray:
        kwargs = call_kwargs(params, callback_on_step_end)
        if params.num_frames is not None:
            kwargs["num_frames"] = params.num_frames
        if params.guidance_scale is not None:
            kwargs["guidance_scale"] = params.guidance_scale
        true_cfg = params.extra.get("true_cfg_scale")
        if params.negative_prompt is not None and true_cfg is not None and float(true_cfg) > 1.0:
            kwargs["negative_prompt"] = params.negative_prompt
            kwargs["true_cfg_scale"] = float(true_cfg)
        with pipeline_lock(pipe):
            out = pipe(generator=generator, **kwargs)
        return frames_array(out, video=True)


RUNNER = HunyuanVideoRunner()
