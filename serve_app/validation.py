"""The one function that checks a request against a model's constraints.

The router calls ``check_params`` before dispatch (a violation becomes a 422
naming the field and the rule); the model deployment calls it again as a
guard before the pipeline runs, because the diffusers pipelines silently
round sizes and frame counts or return noise for bad values (see DESIGN).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from serve_app.config import Constraints


@dataclass(frozen=True)
class Violation:
    """One broken rule: FastAPI's 422 item shape (loc, msg, type)."""

    loc: tuple[str | int, ...]
    msg: str
    type: str

    def as_detail(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


def _nearest_multiples(value: int, m: int, lo: int, hi: int) -> list[int]:
    down = (value // m) * m
    out = [v for v in (down, down + m) if lo <= v <= hi]
    return out or [max(lo, min(hi, m * max(1, round(value / m))))]


def nearest_4k1(value: int, lo: int, hi: int) -> list[int]:
    """Valid 4k+1 frame counts around ``value`` within [lo, hi]."""
    down = ((value - 1) // 4) * 4 + 1
    out = [v for v in (down, down + 4) if lo <= v <= hi and v >= 1]
    if not out:
        first = ((max(lo, 1) - 1 + 3) // 4) * 4 + 1
        last = ((hi - 1) // 4) * 4 + 1
        out = [first if value < first else last]
    return out


def _or(values: list[int]) -> str:
    return " or ".join(str(v) for v in values)


def check_params(
    params: dict[str, Any],
    constraints: Constraints,
    *,
    video: bool,
    prefix: tuple[str | int, ...] = ("body",),
) -> list[Violation]:
    """Every constraint violation of ``params`` for a model with ``constraints``.

    ``params`` holds width, height, num_inference_steps, prompt, optional
    num_frames, trajectories. Empty list = the model may run it.
    """
    c = constraints
    out: list[Violation] = []

    def bad(field: str | tuple[str | int, ...], msg: str, kind: str) -> None:
        loc = (field,) if isinstance(field, str) else field
        out.append(Violation(prefix + loc, msg, f"value_error.{kind}"))

    for side in ("width", "height"):
        v = params.get(side)
        if not isinstance(v, int) or isinstance(v, bool):
            bad(side, f"{side} must be an integer", "type")
            continue
        if v < c.min_side_px or v > c.max_side_px:
            bad(side, f"{side} must be between {c.min_side_px} and {c.max_side_px} px, got {v}", "range")
        elif v % c.multiple_of:
            near = _nearest_multiples(v, c.multiple_of, c.min_side_px, c.max_side_px)
            bad(side, f"{side} must be a multiple of {c.multiple_of}: {_or(near)}", "multiple_of")

    steps = params.get("num_inference_steps")
    if not isinstance(steps, int) or isinstance(steps, bool):
        bad("num_inference_steps", "num_inference_steps must be an integer", "type")
    elif not c.min_steps <= steps <= c.max_steps:
        bad(
            "num_inference_steps",
            f"num_inference_steps must be between {c.min_steps} and {c.max_steps}, got {steps}",
            "range",
        )

    frames = params.get("num_frames")
    if video:
        fc = c.frames
        if fc is not None:
            if not isinstance(frames, int) or isinstance(frames, bool):
                bad("num_frames", "num_frames must be an integer", "type")
            elif not fc.min_frames <= frames <= fc.max_frames:
                bad(
                    "num_frames",
                    f"num_frames must be between {fc.min_frames} and {fc.max_frames}, got {frames}",
                    "range",
                )
            elif fc.form == "4k+1" and (frames - 1) % 4:
                near = nearest_4k1(frames, fc.min_frames, fc.max_frames)
                bad(
                    "num_frames",
                    f"num_frames must be of the form 4k+1 (1, 5, 9, 13, ...): {_or(near)}",
                    "frames_4k1",
                )
    elif frames not in (None, 1):
        bad("num_frames", "num_frames is only accepted by video models", "not_video")

    w, h = params.get("width"), params.get("height")
    if not out and isinstance(w, int) and isinstance(h, int):
        f = frames if video and isinstance(frames, int) else 1
        budget = w * h * f
        if budget > c.max_pixel_frames:
            what = "width*height*num_frames" if video else "width*height"
            bad(
                ("width",) if not video else ("num_frames",),
                f"{what} = {budget} exceeds this model's budget of {c.max_pixel_frames} "
                "pixel-frames; lower the size" + (" or the frame count" if video else ""),
                "budget",
            )

    prompt = params.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        bad("prompt", "prompt must be a non-empty string", "prompt")
    elif not _is_utf8(prompt):
        bad("prompt", "prompt must be valid Unicode text (it holds a lone surrogate)", "prompt")
    elif len(prompt) > c.max_prompt_chars:
        bad(
            "prompt",
            f"prompt must be at most {c.max_prompt_chars} characters, got {len(prompt)}",
            "prompt_length",
        )
    neg = params.get("negative_prompt")
    if isinstance(neg, str) and not _is_utf8(neg):
        bad("negative_prompt", "negative_prompt must be valid Unicode text (it holds a lone surrogate)", "prompt")
    elif isinstance(neg, str) and len(neg) > c.max_prompt_chars:
        bad(
            "negative_prompt",
            f"negative_prompt must be at most {c.max_prompt_chars} characters, got {len(neg)}",
            "prompt_length",
        )

    gs = params.get("guidance_scale")
    if gs is not None and (
        not isinstance(gs, int | float) or not math.isfinite(gs) or not 0 <= gs <= c.max_guidance_scale
    ):
        bad("guidance_scale", f"guidance_scale must be between 0 and {c.max_guidance_scale:g}", "range")

    tracks = params.get("trajectories")
    if tracks:
        from serve_app.models.wan_ati import validate_trajectories

        for loc, msg in validate_trajectories(
            tracks, max_tracks=c.max_tracks, max_points=c.max_track_points
        ):
            parts: tuple[str | int, ...] = tuple(
                int(p) if p.isdigit() else p for p in str(loc).split(".")
            )
            bad(parts, msg, "trajectory")
    return out


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_image(data: bytes, *, max_pixels: int = 16_777_216, max_aspect: float = 20.0) -> Any:
    """Decode image bytes to an RGB PIL image, or raise ValueError saying why.

    The size is checked from the header before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w < 1 or h < 1:
            raise ValueError("image has no pixels")
        if w * h > max_pixels:
            raise ValueError(f"image is {w}x{h}: more than {max_pixels} pixels")
        if max(w, h) / min(w, h) > max_aspect:
            raise ValueError(f"image is {w}x{h}: aspect ratio over {max_aspect:g}:1")
        img.load()
    except UnidentifiedImageError as exc:
        raise ValueError(
            "image could not be decoded: not a recognised image format (PNG, JPEG, WebP, ...)"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"image could not be decoded: too many pixels ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"image could not be decoded: {exc}") from exc
    return img.convert("RGB")
