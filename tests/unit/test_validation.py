"""The constraint checker: each rule gives the right message and location."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from serve_app.config import Constraints, FrameConstraints
from serve_app.validation import check_params, decode_image, nearest_4k1

pytestmark = pytest.mark.unit

VIDEO = Constraints(
    multiple_of=16, max_side_px=512, max_steps=50,
    frames=FrameConstraints(form="4k+1", min_frames=1, max_frames=65),
    max_pixel_frames=256 * 256 * 33, max_prompt_chars=100,
)
IMAGE = Constraints(multiple_of=16, max_side_px=512, max_steps=50, max_pixel_frames=512 * 512)


def ok_video(**kw):
    p = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 4, "num_frames": 9}
    p.update(kw)
    return p


def msgs(violations):
    return {tuple(v.loc): v.msg for v in violations}


def test_valid_video_passes() -> None:
    """A request inside every rule has no violations."""
    assert check_params(ok_video(), VIDEO, video=True) == []


def test_height_multiple_names_nearest_values() -> None:
    """An odd height is refused with the two nearest multiples."""
    m = msgs(check_params(ok_video(height=120), VIDEO, video=True))
    assert m[("body", "height")] == "height must be a multiple of 16: 112 or 128"


def test_width_out_of_range() -> None:
    """A side beyond max_side_px is refused with the range."""
    m = msgs(check_params(ok_video(width=1024), VIDEO, video=True))
    assert "between 16 and 512" in m[("body", "width")]


@pytest.mark.parametrize("steps", [0, -3, 51])
def test_steps_range(steps: int) -> None:
    """Steps outside 1..max_steps are refused naming the bounds."""
    m = msgs(check_params(ok_video(num_inference_steps=steps), VIDEO, video=True))
    assert m[("body", "num_inference_steps")] == f"num_inference_steps must be between 1 and 50, got {steps}"


def test_steps_non_integer() -> None:
    """A non-integer step count is refused."""
    m = msgs(check_params(ok_video(num_inference_steps="many"), VIDEO, video=True))
    assert "integer" in m[("body", "num_inference_steps")]


@pytest.mark.parametrize("frames,expected", [(8, "5 or 9"), (10, "9 or 13"), (12, "9 or 13"), (2, "1 or 5")])
def test_frames_4k1_names_accepted_values(frames: int, expected: str) -> None:
    """A frame count not of the form 4k+1 is refused with the nearest accepted counts."""
    m = msgs(check_params(ok_video(num_frames=frames), VIDEO, video=True))
    assert m[("body", "num_frames")] == f"num_frames must be of the form 4k+1 (1, 5, 9, 13, ...): {expected}"


def test_frames_range() -> None:
    """Zero or too many frames are refused with the range."""
    assert "between 1 and 65" in msgs(check_params(ok_video(num_frames=0), VIDEO, video=True))[("body", "num_frames")]
    assert "between 1 and 65" in msgs(check_params(ok_video(num_frames=69), VIDEO, video=True))[("body", "num_frames")]


def test_nearest_4k1_at_bounds() -> None:
    """Suggestions stay inside the model's frame range."""
    assert nearest_4k1(64, 1, 65) == [61, 65]
    assert nearest_4k1(66, 1, 65) == [65]


def test_pixel_frame_budget() -> None:
    """width*height*frames over the budget is refused, naming the budget."""
    m = msgs(check_params(ok_video(width=512, height=512, num_frames=33), VIDEO, video=True))
    assert "exceeds this model's budget of 2162688 pixel-frames" in m[("body", "num_frames")]


def test_image_budget_and_frames_rejected_for_images() -> None:
    """Image models refuse num_frames > 1."""
    p = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 4, "num_frames": 9}
    assert "only accepted by video models" in msgs(check_params(p, IMAGE, video=False))[("body", "num_frames")]


def test_prompt_rules() -> None:
    """Empty and over-long prompts are refused."""
    assert "non-empty" in msgs(check_params(ok_video(prompt="  "), VIDEO, video=True))[("body", "prompt")]
    m = msgs(check_params(ok_video(prompt="x" * 101), VIDEO, video=True))
    assert m[("body", "prompt")] == "prompt must be at most 100 characters, got 101"


def test_guidance_scale_rules() -> None:
    """Negative or non-finite guidance is refused."""
    assert ("body", "guidance_scale") in msgs(check_params(ok_video(guidance_scale=-1.0), VIDEO, video=True))
    assert ("body", "guidance_scale") in msgs(check_params(ok_video(guidance_scale=float("nan")), VIDEO, video=True))


def test_trajectory_violation_location() -> None:
    """A trajectory point outside 0..1 is reported at trajectories.<track>.<point>."""
    v = check_params(ok_video(trajectories=[[[0.1, 0.1], [1.3, 0.5]]]), VIDEO, video=True)
    locs = [tuple(x.loc) for x in v]
    assert any(loc[:2] == ("body", "trajectories") and 0 in loc for loc in locs), locs


def test_decode_image() -> None:
    """Valid PNG bytes decode to RGB; garbage raises ValueError naming the problem."""
    buf = io.BytesIO()
    Image.new("RGBA", (10, 12)).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (10, 12)
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_image(b"not an image")


def test_min_steps_and_guidance_cap() -> None:
    """A model's min_steps and max_guidance_scale are enforced with their bounds."""
    c = Constraints(multiple_of=16, max_side_px=512, max_steps=50, min_steps=2, max_guidance_scale=20)
    p = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    assert msgs(check_params(p, c, video=False))[("body", "num_inference_steps")] == (
        "num_inference_steps must be between 2 and 50, got 1")
    p = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 4, "guidance_scale": 1e39}
    assert "between 0 and 20" in msgs(check_params(p, c, video=False))[("body", "guidance_scale")]


def test_lone_surrogate_prompt_is_refused() -> None:
    """A prompt that is not encodable text is a caller error, not a model failure."""
    p = {"prompt": "\ud800 cat", "width": 64, "height": 64, "num_inference_steps": 4}
    assert "lone surrogate" in msgs(check_params(p, IMAGE, video=False))[("body", "prompt")]


def test_decode_image_limits_checked_from_header() -> None:
    """Too many pixels or an extreme aspect ratio is refused before decoding."""
    buf = io.BytesIO()
    Image.new("RGB", (4000, 1)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="aspect ratio over 20"):
        decode_image(buf.getvalue())
    buf = io.BytesIO()
    Image.new("L", (300, 300)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="more than 10000 pixels"):
        decode_image(buf.getvalue(), max_pixels=10_000)
