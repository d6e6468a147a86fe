"""Qwen Image Suite runners: ``QwenImagePipeline`` (generate) and ``QwenImageEditPipeline`` (edit).

Guidance: Qwen-Image is not guidance-distilled; its classifier-free guidance
is ``true_cfg_scale`` and only acts when a negative prompt is given. So
``params.guidance_scale`` maps to ``true_cfg_scale``; when it is > 1 and no
negative prompt is given, ``" "`` is passed as the negative prompt (what the
model card does), so the requested guidance actually applies. Without a
guidance scale or negative prompt, CFG is off (``true_cfg_scale=1``) rather
than the pipeline warning that its default 4.0 is ignored.

Edit: the pipeline resizes the input image to about 1024x1024 (by area)
before VAE-encoding it and before the Qwen2.5-VL processor sees it, whatever
the output size. That is inherent to the pipeline: even with tiny weights a
call costs about a second and ~1 GiB of activations on CPU.

Load-time fixup (edit): transformers' ``Qwen2VLProcessor`` lists a video
processor among its sub-processors, and that class needs torchvision. Where
torchvision does not import, ``ensure_qwen2vl_processor_loadable`` drops the
video processor from the processor's attributes (images only are used here),
so the processor builds and reloads. ``EDIT_RUNNER.load`` applies it; so
does the tiny builder. It patches the transformers class process-wide.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from serve_app.models.runners import PipelineRunner, call_kwargs
from serve_app.params import GenerationParams

__all__ = [
    "EDIT_RUNNER",
    "GENERATE_RUNNER",
    "QwenImageEditRunner",
    "QwenImageRunner",
    "ensure_qwen2vl_processor_loadable",
    "torchvision_importable",
]

_patch_lock = threading.Lock()


def torchvision_importable() -> bool:
    """Whether ``import torchvision`` works here (a wheel that mismatches torch counts as no)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # ImportError, or the RuntimeError/OSError of a mismatched wheel
        return False
    return True


def ensure_qwen2vl_processor_loadable() -> bool:
    """Make ``Qwen2VLProcessor`` build and load without torchvision; True if it patched.

    Idempotent and thread-safe. A no-op where torchvision imports.
    """
    from transformers import Qwen2VLProcessor

    with _patch_lock:
        if getattr(Qwen2VLProcessor, "_genguard_without_video", False):
            return True
        if torchvision_importable():
            return False
        original = Qwen2VLProcessor.get_attributes.__func__  # type: ignore[attr-defined]

        def get_attributes(cls: type) -> list[str]:
            return [a for a in original(cls) if a != "video_processor"]

        Qwen2VLProcessor.get_attributes = classmethod(get_attributes)  # type: ignore[method-assign,assignment]
        Qwen2VLProcessor._genguard_without_video = True  # type: ignore[attr-defined]
        return True


def _guidance_kwargs(params: GenerationParams) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    negative = params.negative_prompt
    scale = params.guidance_scale
    if scale is not None:
        kwargs["true_cfg_scale"] = scale
        if scale > 1.0 and negative is None:
            negative = " "
    elif negative is None:
        kwargs["true_cfg_scale"] = 1.0
    if negative is not None:
        kwargs["negative_prompt"] = negative
    return kwargs


class QwenImageRunner(PipelineRunner):
    """Text-to-image on ``QwenImagePipeline`` (key ``qwen-image``)."""

    pipeline_class_name = "QwenImagePipeline"

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        return call_kwargs(params, callback_on_step_end) | _guidance_kwargs(params)


class QwenImageEditRunner(QwenImageRunner):
    """Image edit on ``QwenImageEditPipeline`` (key ``qwen-image-edit``); ``params.image`` is the PIL input."""

    pipeline_class_name = "QwenImageEditPipeline"

    def load(self, source: str, device: str, dtype: Any) -> Any:
        ensure_qwen2vl_processor_loadable()
        return super().load(source, device, dtype)

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        if params.image is None:
            raise ValueError("image edit needs params.image (a PIL RGB image)")
        kwargs = super().call_kwargs(params, callback_on_step_end)
        kwargs["image"] = params.image
        return kwargs


GENERATE_RUNNER = QwenImageRunner()
EDIT_RUNNER = QwenImageEditRunner()
