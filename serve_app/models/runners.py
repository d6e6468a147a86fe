"""The runner interface every model family implements, and the key -> runner map.

A runner is a small stateless object with pure functions around one diffusers
pipeline class: ``load`` builds the pipeline, ``run`` makes one generation
from validated ``GenerationParams`` and returns frames as a float32 array
``(F, H, W, 3)`` in [0, 1] (``F == 1`` for images). Runners import neither
Ray nor HTTP code; the Serve deployments wrap them.

``run`` holds a per-pipeline lock for the whole call: a diffusers pipeline
keeps per-run state on its scheduler (the step index), so two overlapping
calls on one pipeline object would corrupt each other. Concurrent callers of
the same pipeline therefore queue; give each worker its own pipeline for
parallelism.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from serve_app.params import GenerationParams

__all__ = [
    "RUNNER_MODULES",
    "PipelineRunner",
    "Runner",
    "call_kwargs",
    "finish_load",
    "frames_array",
    "get_runner",
    "pipeline_lock",
]


@runtime_checkable
class Runner(Protocol):
    """One model family's load and run functions (see the module docstring)."""

    pipeline_class_name: str

    def load(self, source: str, device: str, dtype: Any) -> Any:
        """``from_pretrained(source, dtype=dtype).to(device)`` plus the family's load-time fixups."""
        ...

    def run(
        self,
        pipe: Any,
        params: GenerationParams,
        *,
        generator: Any,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> np.ndarray:
        """One generation; float32 ``(F, H, W, 3)`` in [0, 1], NaN left visible."""
        ...


# model key -> (module, attribute). Imported lazily: the family modules pull in
# diffusers only when a pipeline is loaded, and wan_ati is written separately.
RUNNER_MODULES: dict[str, tuple[str, str]] = {
    "hunyuan-video": ("serve_app.models.hunyuan_video", "RUNNER"),
    "wan-t2v": ("serve_app.models.wan", "T2V_RUNNER"),
    "wan-i2v": ("serve_app.models.wan", "I2V_RUNNER"),
    "wan-ati": ("serve_app.models.wan_ati", "RUNNER"),
    "newbie-image": ("serve_app.models.newbie", "RUNNER"),
    "qwen-image": ("serve_app.models.qwen_image", "GENERATE_RUNNER"),
    "qwen-image-edit": ("serve_app.models.qwen_image", "EDIT_RUNNER"),
}


def get_runner(model_key: str) -> Runner:
    """The runner for ``model_key``; ``KeyError`` for an unknown key."""
    try:
        module_name, attr = RUNNER_MODULES[model_key]
    except KeyError:
        raise KeyError(
            f"unknown model key {model_key!r}; known: {sorted(RUNNER_MODULES)}"
        ) from None
    runner: Runner = getattr(importlib.import_module(module_name), attr)
    return runner


# ---------------------------------------------------------------- helpers

_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def pipeline_lock(pipe: Any) -> threading.Lock:
    """The lock that serializes generations on ``pipe`` (one per pipeline object)."""
    with _locks_guard:
        lock = _locks.get(pipe)
        if lock is None:
            lock = _locks[pipe] = threading.Lock()
        return lock


def finish_load(pipe: Any, device: str) -> Any:
    """Common load tail: quiet progress bars, move to ``device``, register the lock."""
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    pipeline_lock(pipe)
    return pipe


def frames_array(output: Any, *, video: bool) -> np.ndarray:
    """First sample of a pipeline's ``output_type="np"`` result as float32 ``(F, H, W, 3)``.

    No clipping and no NaN replacement: a broken model's NaN must reach the
    caller's output check.
    """
    batch = output.frames if video else output.images
    if hasattr(batch, "detach"):  # a torch tensor, should a pipeline ignore output_type
        batch = batch.detach().float().cpu().numpy()
    first = np.asarray(batch[0], dtype=np.float32)
    if not video:
        first = first[None]
    if first.ndim != 4 or first.shape[-1] != 3:
        raise ValueError(f"unexpected pipeline output shape {first.shape}, wanted (F, H, W, 3)")
    return first


def call_kwargs(
    params: GenerationParams, callback_on_step_end: Callable[..., Any] | None
) -> dict[str, Any]:
    """Arguments every family passes the same way."""
    kwargs: dict[str, Any] = {
        "prompt": params.prompt,
        "height": params.height,
        "width": params.width,
        "num_inference_steps": params.num_inference_steps,
        "output_type": "np",
    }
    if callback_on_step_end is not None:
        kwargs["callback_on_step_end"] = callback_on_step_end
    return kwargs


class PipelineRunner:
    """The common runner: load ``pipeline_class_name`` with ``from_pretrained``,
    call it under the pipeline's lock with ``call_kwargs(params)``, return
    the first sample's frames. Families override ``call_kwargs`` (and ``load``
    for load-time fixups)."""

    pipeline_class_name: str = ""
    video: bool = False

    def load(self, source: str, device: str, dtype: Any) -> Any:
        import diffusers

        cls = getattr(diffusers, self.pipeline_class_name)
        return finish_load(cls.from_pretrained(source, dtype=dtype), device)

    def call_kwargs(
        self, params: GenerationParams, callback_on_step_end: Callable[..., Any] | None = None
    ) -> dict[str, Any]:
        return call_kwargs(params, callback_on_step_end)

    def run(
        self,
        pipe: Any,
        params: GenerationParams,
        *,
        generator: Any,
        callback_on_step_end: Callable[..., Any] | None = None,
    ) -> np.ndarray:
        kwargs = self.call_kwargs(params, callback_on_step_end)
        with pipeline_lock(pipe):
            out = pipe(generator=generator, **kwargs)
        return frames_array(out, video=self.video)
