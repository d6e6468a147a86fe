"""Tiny pipelines: build, reload, and run every model key through its runner.

Slow-ish (a few seconds of building plus ~40 CPU pipeline calls), so marked
``integration``; no Ray. Builds every key into a session temp dir, or reuses
(building what is missing) the directory named by ``GENGUARD_TINY_DIR``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

from serve_app import tiny  # noqa: E402
from serve_app.models.runners import RUNNER_MODULES, get_runner  # noqa: E402
from serve_app.params import MODEL_KEYS, GenerationParams  # noqa: E402

pytestmark = pytest.mark.integration

PROMPT = "a red fox running through the snow"
OTHER_PROMPT = "a blue whale swimming in the ocean"
STEPS = 2
IMAGE_INPUT_KEYS = {"wan-i2v", "wan-ati", "qwen-image-edit"}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Overrides conftest's fixture (which defaults to .models/tiny): without
    # GENGUARD_TINY_DIR this module proves a fresh offline build from scratch.
    env = os.environ.get("GENGUARD_TINY_DIR")
    out = Path(env) if env else tmp_path_factory.mktemp("tiny")
    tiny.build(out)
    return out


@pytest.fixture(scope="session")
def pipes(tiny_dir: Path) -> dict[str, Any]:
    """Each key's pipeline, loaded once through its runner (CPU, float32)."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    return {
        key: get_runner(key).load(str(tiny_dir / key), "cpu", torch.float32) for key in MODEL_KEYS
    }


def input_image(width: int = 64, height: int = 64) -> Image.Image:
    """A fixed, non-constant RGB picture."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x ^ y) & 255], axis=-1
    )
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def params_for(key: str, **changes: Any) -> GenerationParams:
    spec = tiny.SPECS[key]
    base = GenerationParams(
        prompt=PROMPT,
        width=spec.width,
        height=spec.height,
        num_inference_steps=STEPS,
        seed=7,
        num_frames=spec.num_frames,
        image=input_image() if key in IMAGE_INPUT_KEYS else None,
    )
    return base.with_changes(**changes)


def run(pipes: dict[str, Any], key: str, params: GenerationParams) -> np.ndarray:
    generator = torch.Generator(device="cpu").manual_seed(params.seed)
    return get_runner(key).run(pipes[key], params, generator=generator)


@pytest.fixture(scope="session")
def baseline(pipes: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each key's output at its default tiny size, computed once."""
    return {key: run(pipes, key, params_for(key)) for key in MODEL_KEYS}


def as_uint8(frames: np.ndarray) -> np.ndarray:
    return np.round(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)


# ---------------------------------------------------------------- build


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_manifest_names_the_tiny_model(tiny_dir: Path, key: str) -> None:
    """Each model dir has a manifest naming its key, real class, seed and default size."""
    manifest = json.loads((tiny_dir / key / tiny.MANIFEST_NAME).read_text())
    index = json.loads((tiny_dir / key / "model_index.json").read_text())
    spec = tiny.SPECS[key]
    assert manifest["genguard_tiny"] is True
    assert (manifest["key"], manifest["class"], manifest["seed"]) == (
        key,
        spec.pipeline_class,
        spec.seed,
    )
    assert manifest["default"] == spec.default_size()
    assert index["_class_name"] == spec.pipeline_class


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_diffusion_pipeline_reloads_the_dir(tiny_dir: Path, key: str) -> None:
    """``DiffusionPipeline.from_pretrained`` rebuilds the real pipeline class from the dir."""
    from diffusers import DiffusionPipeline

    from serve_app.models.qwen_image import ensure_qwen2vl_processor_loadable

    ensure_qwen2vl_processor_loadable()  # needed for the edit processor without torchvision
    pipe = DiffusionPipeline.from_pretrained(str(tiny_dir / key))
    assert type(pipe).__name__ == tiny.SPECS[key].pipeline_class


def test_second_build_is_a_no_op(tiny_dir: Path) -> None:
    """Building again over complete dirs rewrites nothing (mtimes unchanged)."""
    before = {
        k: (
            (tiny_dir / k).stat().st_mtime_ns,
            (tiny_dir / k / tiny.MANIFEST_NAME).stat().st_mtime_ns,
        )
        for k in MODEL_KEYS
    }
    paths = tiny.build(tiny_dir)
    after = {
        k: (
            (tiny_dir / k).stat().st_mtime_ns,
            (tiny_dir / k / tiny.MANIFEST_NAME).stat().st_mtime_ns,
        )
        for k in MODEL_KEYS
    }
    assert paths == {k: tiny_dir / k for k in MODEL_KEYS}
    assert after == before


def test_cli_builds_then_skips(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI reports 'built' the first time and 'skipped' the second."""
    assert tiny.main(["build", "--out", str(tmp_path), "--only", "newbie-image"]) == 0
    assert "built: newbie-image" in capsys.readouterr().out
    assert tiny.main(["build", "--out", str(tmp_path), "--only", "newbie-image"]) == 0
    assert "skipped (complete): newbie-image" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_dir_without_manifest_is_not_taken_as_complete(tmp_path: Path) -> None:
    """A model dir lacking the manifest is neither reused nor silently overwritten."""
    (tmp_path / "newbie-image").mkdir()
    assert not tiny.is_complete(tmp_path / "newbie-image", "newbie-image")
    with pytest.raises(FileExistsError, match="not a genguard tiny model"):
        tiny.build(tmp_path, ["newbie-image"])


def test_older_builder_version_is_rebuilt(tmp_path: Path) -> None:
    """A dir built by another builder version is replaced by a fresh build."""
    target = tiny.build(tmp_path, ["newbie-image"])["newbie-image"]
    manifest_path = target / tiny.MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "builder_version": -1}))
    assert not tiny.is_complete(target, "newbie-image")
    tiny.build(tmp_path, ["newbie-image"])
    assert tiny.is_complete(target, "newbie-image")


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    """``build`` names an unknown key instead of skipping it."""
    with pytest.raises(ValueError, match="nope"):
        tiny.build(tmp_path, ["nope"])


@pytest.mark.parametrize("key", ["hunyuan-video", "qwen-image", "qwen-image-edit"])
def test_template_prefix_is_exactly_what_the_pipeline_drops(
    tiny_dir: Path, pipes: dict[str, Any], key: str
) -> None:
    """The reloaded tiny tokenizer turns the pipeline's own template prefix into exactly the tokens it drops."""
    counts = tiny.template_prefix_tokens(pipes[key])
    assert counts is not None
    n, dropped = counts
    assert n == dropped == {"hunyuan-video": 95, "qwen-image": 34, "qwen-image-edit": 64}[key]
    manifest = json.loads((tiny_dir / key / tiny.MANIFEST_NAME).read_text())
    assert manifest["template_prefix_tokens"] == dropped
    assert pipes[key].tokenizer.padding_side == "right"


# ---------------------------------------------------------------- runners


def test_every_key_has_a_runner() -> None:
    """``get_runner`` maps all seven keys, each runner naming its pipeline class."""
    assert set(RUNNER_MODULES) == set(MODEL_KEYS)
    for key in MODEL_KEYS:
        runner = get_runner(key)
        expected = "WanATIPipeline" if key == "wan-ati" else tiny.SPECS[key].pipeline_class
        assert runner.pipeline_class_name == expected
    with pytest.raises(KeyError, match="unknown model key"):
        get_runner("nope")


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_default_size_output_shape_and_range(baseline: dict[str, np.ndarray], key: str) -> None:
    """At its default tiny size each model returns finite float32 (F, 64, 64, 3) frames in [0, 1]."""
    spec = tiny.SPECS[key]
    out = baseline[key]
    assert out.dtype == np.float32
    assert out.shape == (spec.num_frames or 1, spec.height, spec.width, 3)
    assert np.isfinite(out).all()
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0
    assert float(out.std()) > 1e-3  # not a flat image


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_same_seed_gives_identical_output(
    pipes: dict[str, Any], baseline: dict[str, np.ndarray], key: str
) -> None:
    """Two calls with the same seed and parameters return identical arrays."""
    np.testing.assert_array_equal(run(pipes, key, params_for(key)), baseline[key])


@pytest.mark.parametrize("key", MODEL_KEYS)
def test_different_prompt_changes_output(
    pipes: dict[str, Any], baseline: dict[str, np.ndarray], key: str
) -> None:
    """A different prompt changes the output, still after quantizing to 8-bit pixels."""
    other = run(pipes, key, params_for(key, prompt=OTHER_PROMPT))
    assert not np.array_equal(other, baseline[key])
    assert (as_uint8(other) != as_uint8(baseline[key])).sum() > 0


@pytest.mark.parametrize("key", ["wan-i2v", "qwen-image-edit"])
def test_different_input_image_changes_output(
    pipes: dict[str, Any], baseline: dict[str, np.ndarray], key: str
) -> None:
    """The conditioning image reaches the output of the image-conditioned models."""
    flipped = input_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert not np.array_equal(run(pipes, key, params_for(key, image=flipped)), baseline[key])


@pytest.mark.parametrize("key", ["newbie-image", "qwen-image"])
def test_non_default_image_size(pipes: dict[str, Any], key: str) -> None:
    """Image models honour a non-square, non-default 48x80 (height x width) request."""
    out = run(pipes, key, params_for(key, height=48, width=80))
    assert out.shape == (1, 48, 80, 3)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("key", ["wan-t2v", "hunyuan-video"])
def test_non_default_frame_count(pipes: dict[str, Any], key: str) -> None:
    """Video models honour a non-default 13-frame request (4k+1)."""
    out = run(pipes, key, params_for(key, num_frames=13))
    assert out.shape == (13, 64, 64, 3)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("key", ["newbie-image", "qwen-image", "wan-t2v"])
def test_guidance_and_negative_prompt_are_applied(
    pipes: dict[str, Any], baseline: dict[str, np.ndarray], key: str
) -> None:
    """Classifier-free guidance with a negative prompt changes the output where the pipeline supports it."""
    out = run(
        pipes, key, params_for(key, guidance_scale=4.0, negative_prompt="blurry, low quality")
    )
    assert np.isfinite(out).all()
    assert not np.array_equal(out, baseline[key])


def test_step_callback_is_called_every_step(pipes: dict[str, Any]) -> None:
    """``callback_on_step_end`` reaches the pipeline and runs once per denoising step."""
    steps: list[int] = []

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        steps.append(step)
        return kwargs

    generator = torch.Generator(device="cpu").manual_seed(0)
    get_runner("newbie-image").run(
        pipes["newbie-image"],
        params_for("newbie-image", num_inference_steps=3),
        generator=generator,
        callback_on_step_end=on_step,
    )
    assert steps == [0, 1, 2]


def test_raising_from_the_callback_stops_lumina2(pipes: dict[str, Any]) -> None:
    """Raising from the step callback aborts a Lumina2 generation (it has no interrupt flag)."""

    class Stop(Exception):
        pass

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        raise Stop

    with pytest.raises(Stop):
        get_runner("newbie-image").run(
            pipes["newbie-image"],
            params_for("newbie-image"),
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=on_step,
        )


def test_nan_in_the_model_stays_visible(tiny_dir: Path) -> None:
    """A model producing NaN returns NaN frames (nothing clips them away)."""
    runner = get_runner("newbie-image")
    pipe = runner.load(str(tiny_dir / "newbie-image"), "cpu", torch.float32)
    with torch.no_grad():
        next(pipe.transformer.parameters()).fill_(float("nan"))
    out = runner.run(pipe, params_for("newbie-image"), generator=torch.Generator().manual_seed(0))
    assert np.isnan(out).any()


def test_wan_in_bfloat16_keeps_the_vae_in_float32(tiny_dir: Path) -> None:
    """Loading Wan in bfloat16 keeps its VAE (and I2V image encoder) in float32 and still runs."""
    runner = get_runner("wan-i2v")
    pipe = runner.load(str(tiny_dir / "wan-i2v"), "cpu", torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32
    assert pipe.image_encoder.dtype == torch.float32
    out = runner.run(pipe, params_for("wan-i2v"), generator=torch.Generator().manual_seed(0))
    assert out.shape == (9, 64, 64, 3) and out.dtype == np.float32
    assert np.isfinite(out).all()


def test_image_models_need_an_image(pipes: dict[str, Any]) -> None:
    """The i2v and edit runners refuse a call without an input image."""
    for key in ("wan-i2v", "qwen-image-edit"):
        with pytest.raises(ValueError, match="image"):
            run(pipes, key, params_for(key, image=None))


def test_latency_report(pipes: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """Per-model latency at the default tiny size (2 steps) is measured and printed."""
    rows = []
    for key in MODEL_KEYS:
        params = params_for(key)
        run(pipes, key, params)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = run(pipes, key, params)
            times.append(time.perf_counter() - t0)
        assert np.isfinite(out).all()
        size = f"{params.num_frames or 1}x{params.height}x{params.width}"
        rows.append(
            f"  {key:<16} {size:>9}  median {statistics.median(times) * 1000:7.0f} ms  min {min(times) * 1000:7.0f} ms"
        )
    with capsys.disabled():
        print(f"\ntiny model latency (CPU, {torch.get_num_threads()} threads, {STEPS} steps):")
        print("\n".join(rows))
    assert len(rows) == len(MODEL_KEYS)
