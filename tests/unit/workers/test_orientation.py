"""Reorientation to RAS/LPS: every axis-aligned acquisition, oblique ones, and the exact inverse."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from workers.orientation import Reorientation, reorientation


def _directions() -> list[np.ndarray]:
    """All 48 axis-aligned frames: (row cosines, column cosines, normal) with a right-handed normal."""
    frames = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=2):
            row = np.zeros(3)
            row[perm[0]] = signs[0]
            column = np.zeros(3)
            column[perm[1]] = signs[1]
            frames.append(np.stack([row, column, np.cross(row, column)]))
    return frames


def _lps_coordinates(shape: tuple[int, int, int], direction: np.ndarray) -> np.ndarray:
    """(3, *shape): the LPS position of each voxel of a (slice, row, column) array with unit spacing."""
    k, i, j = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (
        np.einsum("a,...->a...", direction[2], k)
        + np.einsum("a,...->a...", direction[1], i)
        + np.einsum("a,...->a...", direction[0], j)
    )


@pytest.mark.parametrize("direction", _directions(), ids=lambda d: "".join(f"{v:+.0f}" for v in d[:2].ravel()))
def test_ras_axes_run_towards_right_anterior_superior(direction: np.ndarray) -> None:
    shape = (3, 4, 5)
    coordinates = _lps_coordinates(shape, direction)
    transform = reorientation(direction, "RAS")
    oriented = np.stack([transform.apply(c) for c in coordinates])
    # axis 0 towards the Right (LPS x falls), axis 1 Anterior (y falls), axis 2 Superior (z rises)
    assert np.all(np.diff(oriented[0], axis=0) == -1) and np.all(np.diff(oriented[0], axis=(1)) == 0)
    assert np.all(np.diff(oriented[1], axis=1) == -1) and np.all(np.diff(oriented[1], axis=2) == 0)
    assert np.all(np.diff(oriented[2], axis=2) == 1) and np.all(np.diff(oriented[2], axis=0) == 0)
    lps = reorientation(direction, "LPS")
    oriented = np.stack([lps.apply(c) for c in coordinates])
    assert np.all(np.diff(oriented[0], axis=0) == 1)
    assert np.all(np.diff(oriented[1], axis=1) == 1)
    assert np.all(np.diff(oriented[2], axis=2) == 1)


@pytest.mark.parametrize("direction", _directions()[::5])
def test_inverse_restores_the_array_shape_and_spacing(direction: np.ndarray) -> None:
    array = np.random.default_rng(0).random((3, 4, 5))
    transform = reorientation(direction, "RAS")
    oriented = transform.apply(array)
    assert oriented.shape == transform.shape((3, 4, 5))
    np.testing.assert_array_equal(transform.invert(oriented), array)
    assert transform.spacing((3.0, 4.0, 5.0)) == tuple(float(n) for n in oriented.shape)


def test_axial_series_and_none_keeps_the_order() -> None:
    axial = np.eye(3)  # columns run Left, rows Posterior, slices Superior
    assert reorientation(axial, None).is_identity and reorientation(axial, None) == Reorientation()
    lps = reorientation(axial, "LPS")  # axis 0 Left = the column axis: a transpose, no flips
    assert lps.axes == (2, 1, 0) and lps.flips == (False, False, False)
    ras = reorientation(axial, "RAS")
    assert ras.axes == (2, 1, 0) and ras.flips == (True, True, False)


def test_oblique_acquisition_gets_the_closest_axes() -> None:
    angle = np.deg2rad(30.0)  # sagittal, tilted 30 degrees about the left-right axis
    row = np.array([0.0, np.cos(angle), -np.sin(angle)])
    column = np.array([0.0, np.sin(angle), np.cos(angle)])
    direction = np.stack([row, column, np.cross(row, column)])
    transform = reorientation(direction, "RAS")
    # slices (normal = +x, Left) -> R flipped; columns (mostly +y, Posterior) -> A flipped; rows -> S
    assert transform.axes == (0, 2, 1)
    assert transform.flips == (True, True, False)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match='"code"'):
        reorientation(np.eye(3), "XYZ")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3x3"):
        reorientation(np.eye(2), "RAS")
