"""WanATIPipeline and the wan-ati runner on the tiny WanImageToVideoPipeline (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from serve_app.models.wan_ati import RUNNER, WanATIPipeline
from serve_app.params import GenerationParams

pytestmark = pytest.mark.integration

TRACKS_A = [[[0.2, 0.2], [0.5, 0.5], [0.8, 0.8]], [[0.8, 0.2, 1], [0.2, 0.8, 1]]]
TRACKS_B = [[[0.2, 0.2], [0.2, 0.8]], [[0.8, 0.2, 1], [0.8, 0.8, 0]]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny wan-ati pipeline directory, built by the project's one builder."""
    from serve_app import tiny

    built = tiny.build(tmp_path_factory.mktemp("tiny-models"), keys=["wan-ati"])
    return Path(built["wan-ati"])


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> Any:
    """The tiny pipeline loaded through the runner, on CPU in float32."""
    loaded = RUNNER.load(str(tiny_dir), "cpu", torch.float32)
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def params() -> GenerationParams:
    """64x64, 9 frames, 2 steps, with a structured input image."""
    yy, xx = np.mgrid[0:64, 0:64]
    rgb = np.stack([xx * 4, yy * 4, ((xx // 8 + yy // 8) % 2) * 255], axis=-1).astype(np.uint8)
    return GenerationParams(
        prompt="a red fox running",
        width=64,
        height=64,
        num_inference_steps=2,
        seed=0,
        num_frames=9,
        image=Image.fromarray(rgb, "RGB"),
    )


def run(pipe: Any, params: GenerationParams, tracks: Any = None, **kw: Any) -> np.ndarray:
    """One runner call with a fresh seed-0 generator."""
    return RUNNER.run(
        pipe,
        params.with_changes(trajectories=tracks),
        generator=torch.Generator("cpu").manual_seed(params.seed),
        **kw,
    )


def assert_no_call_state(pipe: Any) -> None:
    """The per-call ATI state is back at rest."""
    assert pipe._ati_tracks is None
    assert pipe._ati_active is False


def test_runner_loads_wan_ati_pipeline(pipe: Any) -> None:
    """load() gives a WanATIPipeline, matching pipeline_class_name."""
    assert isinstance(pipe, WanATIPipeline)
    assert type(pipe).__name__ == RUNNER.pipeline_class_name == "WanATIPipeline"


def test_plain_i2v_output(pipe: Any, params: GenerationParams) -> None:
    """Without trajectories the runner returns finite float32 (9, 64, 64, 3) frames in [0, 1]."""
    out = run(pipe, params)
    assert out.shape == (9, 64, 64, 3)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert_no_call_state(pipe)


def test_trajectories_change_output_reproducibly(pipe: Any, params: GenerationParams) -> None:
    """Tracks change the video; the same seed and tracks give identical frames; other tracks differ."""
    plain = run(pipe, params)
    a1 = run(pipe, params, TRACKS_A)
    a2 = run(pipe, params, TRACKS_A)
    b = run(pipe, params, TRACKS_B)
    for out in (a1, b):
        assert out.shape == (9, 64, 64, 3)
        assert np.isfinite(out).all()
    np.testing.assert_array_equal(a1, a2)
    assert np.abs(a1 - plain).max() > 1e-4
    assert np.abs(a1 - b).max() > 1e-4
    assert_no_call_state(pipe)


def test_empty_trajectories_is_plain_i2v(pipe: Any, params: GenerationParams) -> None:
    """An empty track list gives exactly the plain image-to-video output."""
    np.testing.assert_array_equal(run(pipe, params, []), run(pipe, params, None))


def test_prepare_latents_conditions_only_later_latent_frames(
    pipe: Any, params: GenerationParams
) -> None:
    """With tracks set, only latent_condition frames t>=1 change; noise and mask are untouched."""
    image = pipe.video_processor.preprocess(params.image, height=64, width=64)
    z_dim = pipe.vae.config.z_dim

    def prepare() -> tuple[torch.Tensor, torch.Tensor]:
        latents, condition = pipe.prepare_latents(
            image, 1, z_dim, 64, 64, 9, torch.float32, torch.device("cpu"),
            torch.Generator("cpu").manual_seed(0),
        )  # fmt: skip
        return latents, condition

    lat0, cond0 = prepare()
    with pipe.ati_trajectories(TRACKS_A):
        lat1, cond1 = prepare()
    assert_no_call_state(pipe)

    n_mask = pipe.vae_scale_factor_temporal
    assert cond0.shape == (1, n_mask + z_dim, 3, 8, 8)
    torch.testing.assert_close(lat1, lat0, rtol=0, atol=0)
    torch.testing.assert_close(cond1[:, :n_mask], cond0[:, :n_mask], rtol=0, atol=0)
    torch.testing.assert_close(cond1[:, n_mask:, 0], cond0[:, n_mask:, 0], rtol=0, atol=0)
    assert not torch.equal(cond1[:, n_mask:, 1:], cond0[:, n_mask:, 1:])


def test_call_state_reset_after_error(pipe: Any, params: GenerationParams) -> None:
    """A call that fails mid-denoising leaves no trajectories behind for the next call."""
    plain = run(pipe, params)

    def boom(*_: Any) -> dict[str, Any]:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="cancelled"):
        run(pipe, params, TRACKS_A, callback_on_step_end=boom)
    assert_no_call_state(pipe)
    np.testing.assert_array_equal(run(pipe, params), plain)


def test_callback_is_called_each_step(pipe: Any, params: GenerationParams) -> None:
    """callback_on_step_end reaches the pipeline and sees every step."""
    steps: list[int] = []

    def record(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(i)
        return kwargs

    run(pipe, params, TRACKS_A, callback_on_step_end=record)
    assert steps == [0, 1]


def test_overlapping_calls_refused(pipe: Any) -> None:
    """Entering a second call on a pipeline already in a call raises, and the first is undisturbed."""
    with pipe.ati_trajectories(TRACKS_A):
        with pytest.raises(RuntimeError, match="serialized"):
            with pipe.ati_trajectories(TRACKS_B):
                pass
        assert pipe._ati_tracks == [list(t) for t in TRACKS_A]
    assert_no_call_state(pipe)


def test_invalid_trajectories_rejected_before_running(pipe: Any, params: GenerationParams) -> None:
    """Out-of-range tracks raise ValueError naming the point, and leave no state."""
    with pytest.raises(ValueError, match=r"trajectories\.0\.1: x must be within 0\.\.1"):
        run(pipe, params, [[[0.5, 0.5], [1.5, 0.5]]])
    assert_no_call_state(pipe)


def test_expand_timesteps_not_supported(pipe: Any) -> None:
    """A Wan2.2-TI2V-style (expand_timesteps) pipeline refuses trajectories clearly."""
    ti2v = WanATIPipeline(**pipe.components, expand_timesteps=True)
    with pytest.raises(NotImplementedError, match="expand_timesteps"):
        with ti2v.ati_trajectories(TRACKS_A):
            pass


def test_trajectories_need_ati_pipeline(pipe: Any, params: GenerationParams) -> None:
    """A plain WanImageToVideoPipeline cannot take trajectories silently."""
    plain = WanImageToVideoPipeline(**pipe.components)
    with pytest.raises(TypeError, match="WanATIPipeline"):
        run(plain, params, TRACKS_A)


def test_max_sequence_length(
    pipe: Any, params: GenerationParams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """512 text tokens when the transformer has added_kv_proj_dim; otherwise extra's value."""
    seen: list[int] = []
    original = pipe.encode_prompt

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["max_sequence_length"])
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode_prompt", spy)
    run(pipe, params.with_changes(extra={"max_sequence_length": 64}))
    expected = 512 if pipe.transformer.config.added_kv_proj_dim else 64
    assert seen == [expected]
