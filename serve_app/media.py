"""Encoding pipeline output (float frames in [0, 1]) into PNG and MP4 bytes."""

from __future__ import annotations

import io

import numpy as np


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) float in [0, 1] -> uint8. NaN must be rejected before this."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_png(frame: np.ndarray) -> bytes:
    """One (H, W, 3) float frame -> PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8(frame[None])[0], mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """(F, H, W, 3) float frames -> H.264 MP4 bytes (yuv420p, single-threaded
    encoder so the same frames always give the same bytes)."""
    import imageio.v3 as iio

    data = to_uint8(frames)
    return bytes(
        iio.imwrite(
            "<bytes>",
            data,
            extension=".mp4",
            plugin="FFMPEG",
            fps=fps,
            codec="libx264",
            macro_block_size=16,
            ffmpeg_params=["-threads", "1", "-preset", "veryfast", "-crf", "18",
                           "-fflags", "+bitexact", "-flags:v", "+bitexact"],
            pixelformat="yuv420p",
        )
    )
