"""Wan ATI: trajectory-controlled image-to-video on Wan2.1 I2V.

ATI ("Any Trajectory Instruction") steers Wan image-to-video with point
tracks. Each track is a list of ``[x, y]`` or ``[x, y, visible]`` points in
normalized 0..1 image coordinates (x to the right, y down), spread evenly over
the clip. Processing, in order:

1. :func:`validate_trajectories` lists every problem as ``(location,
   message)`` so the router can answer 422 naming the field.
2. :func:`resample_track` stretches a track to the output frame count
   (linear in position, nearest in visibility).
3. :func:`to_latent_grid` maps normalized positions to continuous latent-grid
   coordinates, and :func:`latent_to_pixel_frames` picks the pixel frame each
   latent frame stands for (Wan's VAE compresses time by 4: latent frame ``t``
   is pixel frame ``4t``).
4. :func:`apply_ati_conditioning` copies the first-frame latent feature at each
   track's start to the track's position in every later latent frame of the
   image-conditioning latent, with a Gaussian weight.

:class:`WanATIPipeline` is ``WanImageToVideoPipeline`` with ``prepare_latents``
extended to run step 4 on the condition tensor before denoising, and
:data:`RUNNER` is the family runner the model deployment wraps. No Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.wan.pipeline_wan_i2v import WanImageToVideoPipeline

from serve_app.params import GenerationParams

__all__ = [
    "RUNNER",
    "WAN_TEMPORAL_COMPRESSION",
    "WanATIPipeline",
    "WanATIRunner",
    "apply_ati_conditioning",
    "latent_frame_count",
    "latent_to_pixel_frames",
    "latent_track_positions",
    "resample_track",
    "to_latent_grid",
    "validate_trajectories",
]

#: Wan's VAE encodes 1 + 4k pixel frames into 1 + k latent frames.
WAN_TEMPORAL_COMPRESSION = 4

#: Gaussian weights are cut to exactly 0 beyond this many sigmas, so cells far
#: from every track keep their value bit for bit.
GAUSSIAN_RADIUS_SIGMAS = 3.0

#: validate_trajectories stops after this many problems (bounded 422 bodies).
MAX_REPORTED_PROBLEMS = 20

_FIELD = "trajectories"
_AXES = ("x", "y", "visible")


# --------------------------------------------------------------------------
# 1. validation
# --------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _point_problems(point: Any, loc: str) -> list[tuple[str, str]]:
    if not isinstance(point, (list, tuple)):
        return [(loc, f"a point must be [x, y] or [x, y, visible], got {type(point).__name__}")]
    if len(point) not in (2, 3):
        return [(loc, f"a point must be [x, y] or [x, y, visible], got {len(point)} values")]
    problems: list[tuple[str, str]] = []
    for axis, value in zip(_AXES, point, strict=False):
        if axis == "visible":
            # JSON true/false are accepted as 1/0.
            if not isinstance(value, (int, float)) or value not in (0, 1):
                problems.append((loc, f"visible must be 0 or 1, got {value!r}"))
            continue
        if not _is_number(value):
            problems.append((loc, f"{axis} must be a number, got {type(value).__name__}"))
        elif not math.isfinite(value):
            problems.append((loc, f"{axis} must be a finite number, got {value}"))
        elif not 0.0 <= value <= 1.0:
            problems.append((loc, f"{axis} must be within 0..1, got {value}"))
    return problems


def validate_trajectories(
    tracks: Any, *, max_tracks: int, max_points: int = 1024
) -> list[tuple[str, str]]:
    """Every problem with ``tracks`` as ``(location, message)``; ``[]`` means valid.

    Locations are dotted paths into the request body: ``"trajectories"``,
    ``"trajectories.2"`` (track 2), ``"trajectories.2.5"`` (point 5 of track 2).
    Rules: a list of 1..max_tracks tracks; each track a list of
    1..max_points points; each point ``[x, y]`` or ``[x, y, visible]`` with
    finite x, y in 0..1 and visible 0 or 1. At most
    :data:`MAX_REPORTED_PROBLEMS` problems are reported.
    """
    if not isinstance(tracks, (list, tuple)):
        return [(_FIELD, f"must be a list of tracks, got {type(tracks).__name__}")]
    if len(tracks) == 0:
        return [(_FIELD, "at least one track is required")]
    if len(tracks) > max_tracks:
        return [(_FIELD, f"at most {max_tracks} tracks are allowed, got {len(tracks)}")]

    problems: list[tuple[str, str]] = []
    for ti, track in enumerate(tracks):
        tloc = f"{_FIELD}.{ti}"
        if not isinstance(track, (list, tuple)):
            problems.append((tloc, f"a track must be a list of points, got {type(track).__name__}"))
        elif len(track) == 0:
            problems.append((tloc, "a track needs at least one point"))
        elif len(track) > max_points:
            problems.append((tloc, f"at most {max_points} points per track, got {len(track)}"))
        else:
            for pi, point in enumerate(track):
                problems.extend(_point_problems(point, f"{tloc}.{pi}"))
                if len(problems) >= MAX_REPORTED_PROBLEMS:
                    break
        if len(problems) >= MAX_REPORTED_PROBLEMS:
            return problems[:MAX_REPORTED_PROBLEMS]
    return problems


def _require_valid(tracks: Any) -> None:
    n = len(tracks) if isinstance(tracks, (list, tuple)) else 0
    problems = validate_trajectories(tracks, max_tracks=max(n, 1), max_points=1 << 30)
    if problems:
        detail = "; ".join(f"{loc}: {msg}" for loc, msg in problems)
        raise ValueError(f"invalid trajectories: {detail}")


# --------------------------------------------------------------------------
# 2. resampling and 3. latent mapping
# --------------------------------------------------------------------------


def _track_array(points: Sequence[Sequence[float]]) -> np.ndarray:
    """(N, 3) float64 array of (x, y, visible); visible defaults to 1."""
    if len(points) == 0:
        raise ValueError("a track needs at least one point")
    arr = np.ones((len(points), 3), dtype=np.float64)
    for i, point in enumerate(points):
        if len(point) not in (2, 3):
            raise ValueError(
                f"point {i}: expected [x, y] or [x, y, visible], got {len(point)} values"
            )
        arr[i, : len(point)] = [float(v) for v in point]
    return arr


def resample_track(points: Sequence[Sequence[float]], num_frames: int) -> np.ndarray:
    """The track at each of ``num_frames`` frames, as a (num_frames, 3) array (x, y, visible).

    The N input points sit at normalized times ``i / (N - 1)`` and output
    frame ``f`` at ``f / (num_frames - 1)``. Position is interpolated
    linearly (so the first and last points land exactly on the first and last
    frames); visibility takes the nearest input point (ties go to the later
    one). A single point stays put for the whole clip.
    """
    if (
        isinstance(num_frames, bool)
        or not isinstance(num_frames, (int, np.integer))
        or num_frames < 1
    ):
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    src = _track_array(points)
    n = src.shape[0]
    out = np.empty((num_frames, 3), dtype=np.float64)
    if n == 1:
        out[:] = src[0]
        return out
    # Position of each output frame on the input index axis 0..n-1.
    s = np.linspace(0.0, n - 1, num_frames) if num_frames > 1 else np.zeros(1)
    idx = np.arange(n, dtype=np.float64)
    out[:, 0] = np.interp(s, idx, src[:, 0])
    out[:, 1] = np.interp(s, idx, src[:, 1])
    nearest = np.clip(np.floor(s + 0.5).astype(np.int64), 0, n - 1)
    out[:, 2] = src[nearest, 2]
    return out


def to_latent_grid(resampled: np.ndarray, latent_h: int, latent_w: int) -> np.ndarray:
    """Normalized (x, y, visible) rows to continuous latent-grid (col, row, visible) rows.

    Latent cell ``(r, c)`` covers normalized ``[c/W, (c+1)/W] x [r/H, (r+1)/H]``
    and has its centre at integer coordinate ``(c, r)``; so ``x = 0`` maps to
    ``-0.5`` (the left edge of cell 0) and ``x = 1`` to ``W - 0.5``. This is
    ``torch.nn.functional.grid_sample(..., align_corners=False)``'s convention.
    """
    if latent_h < 1 or latent_w < 1:
        raise ValueError(f"latent grid must be at least 1x1, got {latent_h}x{latent_w}")
    arr = np.asarray(resampled, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"expected an (F, 3) array of (x, y, visible), got shape {arr.shape}")
    out = arr.copy()
    out[:, 0] = arr[:, 0] * latent_w - 0.5
    out[:, 1] = arr[:, 1] * latent_h - 0.5
    return out


def latent_frame_count(
    num_frames: int, temporal_compression: int = WAN_TEMPORAL_COMPRESSION
) -> int:
    """Latent frames Wan's VAE makes from ``num_frames`` pixel frames: ``(num_frames - 1) // 4 + 1``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    return (num_frames - 1) // temporal_compression + 1


def latent_to_pixel_frames(
    num_frames: int, temporal_compression: int = WAN_TEMPORAL_COMPRESSION
) -> np.ndarray:
    """Pixel frame index each latent frame stands for: ``[0, 4, 8, ...]``.

    Latent frame 0 encodes pixel frame 0 alone, latent frame ``t`` the four
    frames ``4t-3 .. 4t``; the track position used for it is pixel frame
    ``4t`` (clipped to the last frame for counts not of the form 4k+1).
    """
    t = np.arange(latent_frame_count(num_frames, temporal_compression), dtype=np.int64)
    return np.minimum(t * temporal_compression, num_frames - 1)


def latent_track_positions(
    points: Sequence[Sequence[float]],
    *,
    num_frames: int,
    latent_h: int,
    latent_w: int,
    temporal_compression: int = WAN_TEMPORAL_COMPRESSION,
) -> np.ndarray:
    """(T_lat, 3) latent-grid (col, row, visible) of one track at each latent frame."""
    resampled = resample_track(points, num_frames)
    grid = to_latent_grid(resampled, latent_h, latent_w)
    picked: np.ndarray = grid[latent_to_pixel_frames(num_frames, temporal_compression)]
    return picked


# --------------------------------------------------------------------------
# 4. conditioning
# --------------------------------------------------------------------------


def _gaussian_weight(
    col: float, row: float, h: int, w: int, sigma: float, device: torch.device
) -> torch.Tensor:
    rows = torch.arange(h, dtype=torch.float32, device=device).view(h, 1)
    cols = torch.arange(w, dtype=torch.float32, device=device).view(1, w)
    d2 = (rows - row) ** 2 + (cols - col) ** 2
    weight = torch.exp(-d2 / (2.0 * sigma * sigma))
    return torch.where(
        d2 <= (GAUSSIAN_RADIUS_SIGMAS * sigma) ** 2, weight, torch.zeros_like(weight)
    )


def apply_ati_conditioning(
    latent_condition: torch.Tensor,
    tracks: Sequence[Sequence[Sequence[float]]] | None,
    *,
    num_frames: int,
    sigma: float = 1.0,
    temporal_compression: int = WAN_TEMPORAL_COMPRESSION,
) -> torch.Tensor:
    """ATI-condition a (B, C, T_lat, H_lat, W_lat) image-conditioning latent; returns a new tensor.

    For each track, its start feature is the bilinear sample of
    ``latent_condition[:, :, 0]`` at the track's first point (per batch
    item). In every later latent frame ``t >= 1`` where the track is visible,
    that feature is blended in around the track's position with a Gaussian
    weight ``w`` (``sigma`` in latent cells, cut to 0 beyond 3 sigma):
    ``cond = cond * (1 - w) + feature * w``. Tracks are applied in order.
    Frame 0 is never changed; ``tracks`` None or empty returns an unchanged
    copy. The input tensor is left untouched.
    """
    if latent_condition.ndim != 5:
        raise ValueError(
            f"latent_condition must be (B, C, T, H, W), got shape {tuple(latent_condition.shape)}"
        )
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    out = latent_condition.clone()
    if not tracks:
        return out
    _require_valid(tracks)
    _, _, t_lat, h, w = out.shape
    expected = latent_frame_count(num_frames, temporal_compression)
    if t_lat != expected:
        raise ValueError(
            f"latent_condition has {t_lat} latent frames but num_frames={num_frames} "
            f"gives {expected} (temporal compression {temporal_compression})"
        )

    positions = [
        latent_track_positions(
            track,
            num_frames=num_frames,
            latent_h=h,
            latent_w=w,
            temporal_compression=temporal_compression,
        )
        for track in tracks
    ]

    # Start features: bilinear sample of frame 0 at each track's first point.
    starts = torch.tensor(
        [[_track_array(track)[0, 0], _track_array(track)[0, 1]] for track in tracks],
        dtype=torch.float32,
        device=out.device,
    )  # (N, 2) normalized x, y
    frame0 = latent_condition[:, :, 0].to(torch.float32)  # (B, C, H, W)
    grid = (starts * 2.0 - 1.0).view(1, 1, -1, 2).expand(frame0.shape[0], -1, -1, -1)
    features = F.grid_sample(
        frame0, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    features = features[:, :, 0, :]  # (B, C, N)

    work = out.to(torch.float32)
    for k, pos in enumerate(positions):
        feature = features[:, :, k].view(features.shape[0], features.shape[1], 1, 1)
        for t in range(1, t_lat):
            col, row, visible = pos[t]
            if visible < 0.5:
                continue
            weight = _gaussian_weight(float(col), float(row), h, w, sigma, out.device)
            work[:, :, t] = work[:, :, t] * (1.0 - weight) + feature * weight
    return work.to(latent_condition.dtype)


# --------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------


class WanATIPipeline(WanImageToVideoPipeline):
    """``WanImageToVideoPipeline`` whose image-conditioning latent follows point tracks.

    Set the tracks for one call with :meth:`ati_trajectories` (a context
    manager that always resets them); inside it, ``prepare_latents`` splits
    the condition tensor ``[mask ; latent_condition]`` and runs
    :func:`apply_ati_conditioning` on the latent part before denoising.
    Loads any ``WanImageToVideoPipeline`` directory with ``from_pretrained``.
    """

    _ati_tracks: list[Any] | None = None
    _ati_sigma: float = 1.0
    _ati_active: bool = False

    def _expand_timesteps(self) -> bool:
        # Wan2.2 TI2V layout: the condition is the first latent frame only.
        return bool(getattr(self.config, "expand_timesteps", False))

    @contextmanager
    def ati_trajectories(
        self, tracks: Sequence[Any] | None, *, sigma: float = 1.0
    ) -> Iterator[None]:
        """Use ``tracks`` (None/empty: plain I2V) for the pipeline call made inside the block."""
        if self._ati_active:
            raise RuntimeError(
                "WanATIPipeline is already inside a call; calls on one pipeline must be serialized"
            )
        if tracks:
            if self._expand_timesteps():
                raise NotImplementedError(
                    "ATI trajectories are not supported with expand_timesteps=True (Wan2.2 TI2V): "
                    "its condition holds the first latent frame only, so there are no later "
                    "frames to condition"
                )
            _require_valid(tracks)
            if not (sigma > 0 and math.isfinite(sigma)):
                raise ValueError(f"sigma must be a positive finite number, got {sigma}")
        self._ati_active = True
        self._ati_tracks = [list(t) for t in tracks] if tracks else None
        self._ati_sigma = float(sigma)
        try:
            yield
        finally:
            self._ati_tracks = None
            self._ati_sigma = 1.0
            self._ati_active = False

    def prepare_latents(  # type: ignore[override]
        self,
        image: Any,
        batch_size: int,
        num_channels_latents: int = 16,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        last_image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        outputs = super().prepare_latents(
            image,
            batch_size,
            num_channels_latents,
            height,
            width,
            num_frames,
            dtype,
            device,
            generator,
            latents,
            last_image,
        )
        tracks = self._ati_tracks
        if not tracks:
            return tuple(outputs)
        if self._expand_timesteps():
            raise NotImplementedError(
                "ATI trajectories are not supported with expand_timesteps=True"
            )
        latents_out, condition = outputs
        # condition = cat([mask (vae_scale_factor_temporal channels), latent_condition (z_dim)], dim=1)
        z_dim = int(self.vae.config.z_dim)
        n_mask = condition.shape[1] - z_dim
        mask, latent_condition = condition[:, :n_mask], condition[:, n_mask:]
        latent_condition = apply_ati_conditioning(
            latent_condition,
            tracks,
            num_frames=num_frames,
            sigma=self._ati_sigma,
            temporal_compression=self.vae_scale_factor_temporal,
        )
        return latents_out, torch.cat([mask, latent_condition], dim=1)


# --------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------


class WanATIRunner:
    """Family runner for ``wan-ati``: load a pipeline, run one ``GenerationParams``."""

    pipeline_class_name: str = "WanATIPipeline"

    def load(self, source: str, device: str, dtype: torch.dtype) -> Any:
        """``WanATIPipeline.from_pretrained(source, dtype=dtype).to(device)``.

        ``dtype=`` is diffusers 0.42's name for ``torch_dtype`` (deprecated there).
        """
        return WanATIPipeline.from_pretrained(source, dtype=dtype).to(device)

    def run(
        self,
        pipe: Any,
        params: GenerationParams,
        *,
        generator: torch.Generator,
        callback_on_step_end: Any = None,
    ) -> np.ndarray:
        """Generate one video: float32 (F, H, W, 3) in [0, 1] (NaN passes through)."""
        if params.image is None:
            raise ValueError("wan-ati needs an input image")
        tracks = params.trajectories or None
        if tracks and not isinstance(pipe, WanATIPipeline):
            raise TypeError(
                f"trajectories need a WanATIPipeline, got {type(pipe).__name__}; "
                "load it with WanATIRunner.load"
            )
        image = params.image
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")

        kwargs: dict[str, Any] = {
            "image": image,
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "height": params.height,
            "width": params.width,
            "num_inference_steps": params.num_inference_steps,
            "generator": generator,
            "output_type": "np",
            "callback_on_step_end": callback_on_step_end,
        }
        if params.num_frames is not None:
            kwargs["num_frames"] = params.num_frames
        if params.guidance_scale is not None:
            kwargs["guidance_scale"] = params.guidance_scale
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None and getattr(transformer.config, "added_kv_proj_dim", None):
            # The image/text split in Wan2.1-I2V's attention assumes 512 text tokens.
            kwargs["max_sequence_length"] = 512
        elif "max_sequence_length" in params.extra:
            kwargs["max_sequence_length"] = int(params.extra["max_sequence_length"])
        sigma = float(params.extra.get("ati_sigma", 1.0))

        if isinstance(pipe, WanATIPipeline):
            with pipe.ati_trajectories(tracks, sigma=sigma):
                result = pipe(**kwargs)
        else:
            result = pipe(**kwargs)
        frames = np.asarray(result.frames[0], dtype=np.float32)
        return frames


RUNNER = WanATIRunner()
