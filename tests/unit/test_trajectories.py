"""Wan ATI trajectory processing: validation, resampling, latent mapping, conditioning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from serve_app.models.wan_ati import (
    GAUSSIAN_RADIUS_SIGMAS,
    MAX_REPORTED_PROBLEMS,
    apply_ati_conditioning,
    latent_frame_count,
    latent_to_pixel_frames,
    latent_track_positions,
    resample_track,
    to_latent_grid,
    validate_trajectories,
)

pytestmark = pytest.mark.unit


def cell_center(c: int, n: int) -> float:
    """Normalized coordinate of the centre of latent cell c on an n-cell axis."""
    return (c + 0.5) / n


# ---------------------------------------------------------------- validation


def test_valid_tracks_have_no_problems() -> None:
    """Well-formed tracks, with and without visibility, validate clean."""
    tracks = [[[0.0, 0.0], [1.0, 1.0, 1]], [[0.5, 0.5, 0]], [[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]]
    assert validate_trajectories(tracks, max_tracks=3) == []


def test_x_out_of_range_names_track_and_point() -> None:
    """An x above 1 is reported at trajectories.<track>.<point> with its value."""
    tracks = [[[0.1, 0.1]], [[0.1, 0.1]], [[0.1, 0.1]] * 5 + [[1.3, 0.5]]]
    assert validate_trajectories(tracks, max_tracks=8) == [
        ("trajectories.2.5", "x must be within 0..1, got 1.3")
    ]


def test_y_out_of_range() -> None:
    """A negative y is out of range."""
    assert validate_trajectories([[[0.5, -0.25]]], max_tracks=1) == [
        ("trajectories.0.0", "y must be within 0..1, got -0.25")
    ]


def test_not_a_list_of_tracks() -> None:
    """A non-list trajectories value is one problem at the field itself."""
    assert validate_trajectories({"a": 1}, max_tracks=4) == [
        ("trajectories", "must be a list of tracks, got dict")
    ]


def test_at_least_one_track() -> None:
    """An empty list of tracks is rejected."""
    assert validate_trajectories([], max_tracks=4) == [
        ("trajectories", "at least one track is required")
    ]


def test_max_tracks() -> None:
    """More tracks than max_tracks is rejected, naming the limit and the count."""
    tracks = [[[0.5, 0.5]]] * 5
    assert validate_trajectories(tracks, max_tracks=4) == [
        ("trajectories", "at most 4 tracks are allowed, got 5")
    ]
    assert validate_trajectories(tracks, max_tracks=5) == []


def test_track_needs_a_point() -> None:
    """An empty track is reported at its index."""
    assert validate_trajectories([[[0.5, 0.5]], []], max_tracks=4) == [
        ("trajectories.1", "a track needs at least one point")
    ]


def test_track_must_be_a_list() -> None:
    """A track that is not a list is reported with its type."""
    assert validate_trajectories([0.5], max_tracks=4) == [
        ("trajectories.0", "a track must be a list of points, got float")
    ]


def test_max_points_per_track() -> None:
    """A track longer than max_points is rejected."""
    assert validate_trajectories([[[0.5, 0.5]] * 4], max_tracks=1, max_points=3) == [
        ("trajectories.0", "at most 3 points per track, got 4")
    ]


@pytest.mark.parametrize("point", [[0.5], [0.1, 0.2, 1, 0], []])
def test_point_arity(point: list[float]) -> None:
    """A point must have 2 or 3 values."""
    assert validate_trajectories([[point]], max_tracks=1) == [
        ("trajectories.0.0", f"a point must be [x, y] or [x, y, visible], got {len(point)} values")
    ]


def test_point_must_be_a_list() -> None:
    """A scalar where a point belongs is reported."""
    assert validate_trajectories([[0.5]], max_tracks=1) == [
        ("trajectories.0.0", "a point must be [x, y] or [x, y, visible], got float")
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_numbers_must_be_finite(bad: float) -> None:
    """NaN and infinities are rejected as non-finite."""
    assert validate_trajectories([[[bad, 0.5]]], max_tracks=1) == [
        ("trajectories.0.0", f"x must be a finite number, got {bad}")
    ]


@pytest.mark.parametrize("bad", ["0.5", None, True])
def test_coordinates_must_be_numbers(bad: object) -> None:
    """Strings, null and booleans are not coordinates."""
    assert validate_trajectories([[[0.5, bad]]], max_tracks=1) == [
        ("trajectories.0.0", f"y must be a number, got {type(bad).__name__}")
    ]


@pytest.mark.parametrize("bad", [2, 0.5, -1, "1", math.nan])
def test_visible_must_be_zero_or_one(bad: object) -> None:
    """visible takes only 0 or 1."""
    assert validate_trajectories([[[0.5, 0.5, bad]]], max_tracks=1) == [
        ("trajectories.0.0", f"visible must be 0 or 1, got {bad!r}")
    ]


@pytest.mark.parametrize("ok", [0, 1, 0.0, 1.0, True, False])
def test_visible_accepts_zero_and_one(ok: object) -> None:
    """0/1 in int, float or JSON-boolean form are accepted."""
    assert validate_trajectories([[[0.5, 0.5, ok]]], max_tracks=1) == []


def test_every_problem_is_reported() -> None:
    """Problems in several tracks and points are all listed, in order."""
    tracks = [[[1.5, 0.5], [0.5, 0.5]], [], [[0.5, 0.5], [0.5, 2.0, 3]]]
    assert validate_trajectories(tracks, max_tracks=3) == [
        ("trajectories.0.0", "x must be within 0..1, got 1.5"),
        ("trajectories.1", "a track needs at least one point"),
        ("trajectories.2.1", "y must be within 0..1, got 2.0"),
        ("trajectories.2.1", "visible must be 0 or 1, got 3"),
    ]


def test_problem_list_is_bounded() -> None:
    """A flood of bad points yields at most MAX_REPORTED_PROBLEMS entries."""
    problems = validate_trajectories([[[5.0, 5.0]] * 100], max_tracks=1)
    assert len(problems) == MAX_REPORTED_PROBLEMS
    assert problems[0] == ("trajectories.0.0", "x must be within 0..1, got 5.0")


# ---------------------------------------------------------------- resampling


def test_resample_length_and_endpoints() -> None:
    """The output has num_frames rows and starts/ends on the first/last points."""
    out = resample_track([[0.1, 0.2], [0.5, 0.9], [0.7, 0.3]], 17)
    assert out.shape == (17, 3)
    np.testing.assert_allclose(out[0], [0.1, 0.2, 1.0])
    np.testing.assert_allclose(out[-1], [0.7, 0.3, 1.0])


def test_resample_linear_midpoints() -> None:
    """Two points are interpolated linearly across the frames."""
    out = resample_track([[0.0, 1.0], [1.0, 0.5]], 5)
    np.testing.assert_allclose(out[:, 0], [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(out[:, 1], [1.0, 0.875, 0.75, 0.625, 0.5])


def test_resample_piecewise_over_normalized_time() -> None:
    """Three points sit at times 0, 1/2, 1; frames between them interpolate each segment."""
    out = resample_track([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], 9)
    np.testing.assert_allclose(out[2, :2], [0.5, 0.0])  # a quarter of the way: mid first segment
    np.testing.assert_allclose(out[4, :2], [1.0, 0.0])  # the middle point
    np.testing.assert_allclose(out[6, :2], [1.0, 0.5])  # mid second segment


def test_resample_downsamples_long_tracks() -> None:
    """A track with more points than frames is sampled along its path."""
    points = [[i / 100, 0.5] for i in range(101)]
    out = resample_track(points, 5)
    np.testing.assert_allclose(out[:, 0], [0.0, 0.25, 0.5, 0.75, 1.0])


def test_single_point_stays_put() -> None:
    """A one-point track is constant over every frame."""
    out = resample_track([[0.3, 0.6, 0]], 9)
    assert out.shape == (9, 3)
    np.testing.assert_allclose(out, np.tile([0.3, 0.6, 0.0], (9, 1)))


def test_resample_single_frame() -> None:
    """num_frames=1 keeps the first point."""
    np.testing.assert_allclose(resample_track([[0.1, 0.2], [0.9, 0.8]], 1), [[0.1, 0.2, 1.0]])


def test_resample_visibility_nearest() -> None:
    """Visibility takes the nearest input point, not an interpolated value."""
    out = resample_track([[0.1, 0.1, 1], [0.2, 0.2, 0], [0.3, 0.3, 1]], 9)
    np.testing.assert_array_equal(out[:, 2], [1, 1, 0, 0, 0, 0, 1, 1, 1])
    assert set(np.unique(out[:, 2])) <= {0.0, 1.0}


def test_resample_rejects_bad_frame_count() -> None:
    """num_frames must be a positive integer."""
    with pytest.raises(ValueError, match="num_frames"):
        resample_track([[0.5, 0.5]], 0)
    with pytest.raises(ValueError, match="at least one point"):
        resample_track([], 5)


# ------------------------------------------------------------ latent mapping


def test_to_latent_grid_edges_and_centres() -> None:
    """0 maps to -0.5, 1 to W-0.5, and a cell's normalized centre to its index."""
    rows = np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [cell_center(3, 8), cell_center(5, 6), 1.0]])
    grid = to_latent_grid(rows, latent_h=6, latent_w=8)
    np.testing.assert_allclose(grid[0], [-0.5, -0.5, 1.0])
    np.testing.assert_allclose(grid[1], [7.5, 5.5, 0.0])
    np.testing.assert_allclose(grid[2], [3.0, 5.0, 1.0])


@pytest.mark.parametrize(("frames", "latent"), [(1, 1), (5, 2), (8, 2), (9, 3), (17, 5), (81, 21)])
def test_latent_frame_count(frames: int, latent: int) -> None:
    """Wan's VAE gives (num_frames - 1) // 4 + 1 latent frames."""
    assert latent_frame_count(frames) == latent


def test_latent_to_pixel_frames() -> None:
    """Latent frame t stands for pixel frame 4t."""
    np.testing.assert_array_equal(latent_to_pixel_frames(9), [0, 4, 8])
    mapping = latent_to_pixel_frames(81)
    assert len(mapping) == 21 and mapping[-1] == 80
    np.testing.assert_array_equal(mapping, np.arange(21) * 4)
    np.testing.assert_array_equal(latent_to_pixel_frames(8), [0, 4])


def test_latent_track_positions() -> None:
    """A track resampled to 9 frames lands on latent frames at pixel frames 0, 4, 8."""
    track = [[cell_center(0, 8), cell_center(0, 8)], [cell_center(6, 8), cell_center(2, 8)]]
    pos = latent_track_positions(track, num_frames=9, latent_h=8, latent_w=8)
    np.testing.assert_allclose(pos, [[0.0, 0.0, 1.0], [3.0, 1.0, 1.0], [6.0, 2.0, 1.0]])


# -------------------------------------------------------------- conditioning

H = W = 16
NUM_FRAMES = 9  # 3 latent frames: pixel frames 0, 4, 8


def make_condition(batch: int = 1, channels: int = 4) -> torch.Tensor:
    """A (B, C, 3, 16, 16) condition: random first frame, later frames like encoded zeros."""
    gen = torch.Generator().manual_seed(0)
    cond = torch.full((batch, channels, 3, H, W), -0.3)
    cond[:, :, 0] = torch.randn(batch, channels, H, W, generator=gen)
    return cond


def track_between(c0: tuple[int, int], c2: tuple[int, int]) -> list[list[float]]:
    """A straight track from the centre of cell c0 to that of cell c2 ((col, row) pairs)."""
    return [
        [cell_center(c0[0], W), cell_center(c0[1], H)],
        [cell_center(c2[0], W), cell_center(c2[1], H)],
    ]


def changed_cells(a: torch.Tensor, b: torch.Tensor, t: int) -> set[tuple[int, int]]:
    """(col, row) cells of latent frame t where a and b differ in any batch/channel."""
    diff = (a[:, :, t] - b[:, :, t]).abs().amax(dim=(0, 1)) > 1e-6
    return {(int(c), int(r)) for r, c in zip(*torch.nonzero(diff, as_tuple=True), strict=True)}


def within(cells: set[tuple[int, int]], centres: list[tuple[float, float]], radius: float) -> bool:
    """Whether every cell lies within radius of one of the centres."""
    return all(any(math.dist(cell, c) <= radius + 1e-9 for c in centres) for cell in cells)


def test_feature_lands_on_track_positions() -> None:
    """The first-frame feature at the start is copied to the track's cell in each later frame."""
    cond = make_condition()
    out = apply_ati_conditioning(cond, [track_between((2, 3), (12, 11))], num_frames=NUM_FRAMES)
    feature = cond[0, :, 0, 3, 2]
    # Latent frame 1 = pixel frame 4 = halfway: cell (7, 7); latent frame 2: cell (12, 11).
    torch.testing.assert_close(out[0, :, 1, 7, 7], feature)
    torch.testing.assert_close(out[0, :, 2, 11, 12], feature)


def test_gaussian_blend_weight() -> None:
    """A neighbour cell one step away is blended with weight exp(-1 / (2 sigma^2))."""
    cond = make_condition()
    for sigma in (1.0, 2.0):
        out = apply_ati_conditioning(
            cond, [track_between((2, 3), (12, 11))], num_frames=NUM_FRAMES, sigma=sigma
        )
        w = math.exp(-1.0 / (2.0 * sigma**2))
        expected = cond[0, :, 1, 7, 8] * (1 - w) + cond[0, :, 0, 3, 2] * w
        torch.testing.assert_close(out[0, :, 1, 7, 8], expected)


def test_first_frame_and_far_cells_unchanged() -> None:
    """Frame 0 is untouched, and cells beyond 3 sigma of the track keep their values exactly."""
    cond = make_condition()
    sigma = 1.5
    out = apply_ati_conditioning(
        cond, [track_between((2, 3), (12, 11))], num_frames=NUM_FRAMES, sigma=sigma
    )
    torch.testing.assert_close(out[:, :, 0], cond[:, :, 0], rtol=0, atol=0)
    radius = GAUSSIAN_RADIUS_SIGMAS * sigma
    assert within(changed_cells(out, cond, 1), [(7.0, 7.0)], radius)
    assert within(changed_cells(out, cond, 2), [(12.0, 11.0)], radius)
    assert (7, 7) in changed_cells(out, cond, 1)
    assert (0, 15) not in changed_cells(out, cond, 1) | changed_cells(out, cond, 2)


def test_changing_the_trajectory_changes_conditioning_where_expected() -> None:
    """Moving the track's end moves the change: only cells near the old or new path differ."""
    cond = make_condition()
    old = apply_ati_conditioning(cond, [track_between((2, 3), (12, 11))], num_frames=NUM_FRAMES)
    new = apply_ati_conditioning(cond, [track_between((2, 3), (2, 13))], num_frames=NUM_FRAMES)
    radius = GAUSSIAN_RADIUS_SIGMAS * 1.0
    torch.testing.assert_close(new[:, :, 0], old[:, :, 0], rtol=0, atol=0)
    # frame 1: old at (7, 7), new at (2, 8); frame 2: old at (12, 11), new at (2, 13)
    moved_1 = changed_cells(new, old, 1)
    moved_2 = changed_cells(new, old, 2)
    assert {(7, 7), (2, 8)} <= moved_1
    assert {(12, 11), (2, 13)} <= moved_2
    assert within(moved_1, [(7.0, 7.0), (2.0, 8.0)], radius)
    assert within(moved_2, [(12.0, 11.0), (2.0, 13.0)], radius)
    torch.testing.assert_close(new[0, :, 2, 13, 2], cond[0, :, 0, 3, 2])


def test_start_feature_is_bilinear() -> None:
    """A start between cell centres samples the bilinear mix of the four neighbours."""
    cond = make_condition()
    x0, y0 = (2.0 + 0.25 + 0.5) / W, (3.0 + 0.5 + 0.5) / H  # col 2.25, row 3.5
    end = [cell_center(10, W), cell_center(10, H)]
    out = apply_ati_conditioning(cond, [[[x0, y0], end]], num_frames=NUM_FRAMES)
    f = cond[0, :, 0]
    expected = (
        f[:, 3, 2] * 0.75 * 0.5
        + f[:, 3, 3] * 0.25 * 0.5
        + f[:, 4, 2] * 0.75 * 0.5
        + f[:, 4, 3] * 0.25 * 0.5
    )
    torch.testing.assert_close(out[0, :, 2, 10, 10], expected)


def test_invisible_points_are_skipped() -> None:
    """A latent frame where the track is invisible is left as it was."""
    cond = make_condition()
    # 3 points over 9 frames: pixel frame 4 takes the middle point (invisible).
    track = [
        [cell_center(2, W), cell_center(2, H), 1],
        [0.5, 0.5, 0],
        [cell_center(12, W), cell_center(12, H), 1],
    ]
    out = apply_ati_conditioning(cond, [track], num_frames=NUM_FRAMES)
    torch.testing.assert_close(out[:, :, 1], cond[:, :, 1], rtol=0, atol=0)
    torch.testing.assert_close(out[0, :, 2, 12, 12], cond[0, :, 0, 2, 2])


def test_each_track_and_batch_item_uses_its_own_feature() -> None:
    """Two tracks place their own start features; each batch item samples its own frame 0."""
    cond = make_condition(batch=2)
    tracks = [track_between((1, 1), (4, 4)), track_between((14, 14), (11, 11))]
    out = apply_ati_conditioning(cond, tracks, num_frames=NUM_FRAMES)
    for b in range(2):
        torch.testing.assert_close(out[b, :, 2, 4, 4], cond[b, :, 0, 1, 1])
        torch.testing.assert_close(out[b, :, 2, 11, 11], cond[b, :, 0, 14, 14])
    assert not torch.equal(out[0, :, 2, 4, 4], out[1, :, 2, 4, 4])


def test_no_trajectories_leaves_tensor_unchanged() -> None:
    """None or [] returns an equal copy, not the input object."""
    cond = make_condition()
    for tracks in (None, []):
        out = apply_ati_conditioning(cond, tracks, num_frames=NUM_FRAMES)
        assert out is not cond
        torch.testing.assert_close(out, cond, rtol=0, atol=0)


def test_input_tensor_not_modified() -> None:
    """Conditioning returns a new tensor and leaves its input as it was."""
    cond = make_condition()
    before = cond.clone()
    out = apply_ati_conditioning(cond, [track_between((2, 3), (12, 11))], num_frames=NUM_FRAMES)
    torch.testing.assert_close(cond, before, rtol=0, atol=0)
    assert not torch.equal(out, cond)


def test_dtype_preserved() -> None:
    """A bfloat16 condition comes back as bfloat16."""
    cond = make_condition().to(torch.bfloat16)
    out = apply_ati_conditioning(cond, [track_between((2, 3), (12, 11))], num_frames=NUM_FRAMES)
    assert out.dtype == torch.bfloat16 and out.shape == cond.shape


def test_conditioning_rejects_bad_inputs() -> None:
    """Wrong frame count, invalid tracks, bad sigma and bad rank raise ValueError."""
    cond = make_condition()
    track = [track_between((2, 3), (12, 11))]
    with pytest.raises(ValueError, match="latent frames"):
        apply_ati_conditioning(cond, track, num_frames=17)
    with pytest.raises(ValueError, match=r"trajectories\.0\.0: x must be within 0\.\.1"):
        apply_ati_conditioning(cond, [[[1.5, 0.5]]], num_frames=NUM_FRAMES)
    with pytest.raises(ValueError, match="sigma"):
        apply_ati_conditioning(cond, track, num_frames=NUM_FRAMES, sigma=0.0)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        apply_ati_conditioning(cond[0], track, num_frames=NUM_FRAMES)
