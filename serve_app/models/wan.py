"""Wan 2.1 runners: text-to-video (``WanPipeline``) and image-to-video (``WanImageToVideoPipeline``).

Pure functions around the diffusers pipelines; the Serve deployment runs
``run`` in a worker thread so the replica's event loop stays free.

Load-time fixup: the VAE (and the I2V CLIP image encoder) stay in float32
whatever the pipeline dtype, as the Wan model cards recommend: the Wan VAE
decodes visibly worse in bf16/fp16. The pipelines cast latents to the VAE's
dtype themselves.

Both pipelines accept ``negative_prompt`` and ``guidance_scale`` (classic CFG;
> 1 doubles the transformer work). ``max_sequence_length`` stays at the
pipelines' 512: the Wan2.1-I2V transformer (``added_kv_proj_dim`` set) splits
image from text context assuming exactly 512 text tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from serve_app.models.runners import PipelineRunner, call_kwargs, finish_load
from serve_app.params import GenerationParams

__all__ = ["I2V_RUNNER", "T2V_RUNNER", "WanI2VRunner", "WanT2VRunner"]


def _load(cls_name: str, source: str, device: str, dtype: Any) -> Any:
    import diffusers
    import torch

    cls = getattr(diffusers, cls_name)
    overrides: dict[str, Any] = {}
    if dtype != torch.float32:
        # Loaded on their own in float32 and handed to the pipeline, as the Wan
        # model cards do (casting after the fact is what diffusers warns about).
        overrides["vae"] = diffusers.AutoencoderKLWan.from_pretrained(
            source, subfolder="vae", dtype=torch.float32
        )
        index = cls.load_config(source)
        if (index.get("image_encoder") or [None])[0] is not None:
            import transformers

            encoder_cls = getattr(transformers, index["image_encoder"][1])
            overrides["image_encoder"] = encoder_cls.from_pretrained(
                source, subfolder="image_encoder", dtype=torch.float32
            )
    pipe = cls.from_pretrained(source, dtype=dtype, **overrides)
    return finish_load(pipe, device)


def _video_kwargs(
    params: GenerationParams, callback_on_step_end: Callable[..., Any] | None
) -> dict[str, Any]:
    kwargs = call_kwargs(params, callback_on_step_end)
    if params.num_frames is not None:
        kwargs["num_frames"] = params.num_frames
    if params.negative_prompt is not None:
        kwargs["negative_prompt"] = params.negative_prompt
    if params.guidance_scale is not None:
        kwargs["guidance_scale"] = params.guidance_scale
    return kwargs


class WanT2VRunner(PipelineRunner):
    """Text-to-video on ``WanPipeline`` (key ``wan-t2v``)."""

    pipeline_class_name = "WanPipeline"
    video = True

    def load(self, source: str, device: str, dtype: Any) -> Any:
        return _load(self.pipeline_class_name, source, device, dtype)

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        return _video_kwargs(params, callback_on_step_end)


class WanI2VRunner(WanT2VRunner):
    """Image-to-video on ``WanImageToVideoPipeline`` (key ``wan-i2v``).

    ``params.image`` (PIL RGB) is resized by the pipeline to ``width`` x
    ``height`` and becomes the first frame's conditioning.
    """

    pipeline_class_name = "WanImageToVideoPipeline"

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        """The pipeline arguments for ``params`` (subclasses, e.g. ATI, add to them)."""
        if params.image is None:
            raise ValueError("image-to-video needs params.image (a PIL RGB image)")
        kwargs = _video_kwargs(params, callback_on_step_end)
        kwargs["image"] = params.image
        return kwargs


T2V_RUNNER = WanT2VRunner()
I2V_RUNNER = WanI2VRunner()
