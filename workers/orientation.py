"""Reordering and flipping array axes so that they run along named patient axes (``RAS``, ``LPS``).

A DICOM volume is stored as (slice, row, column), whatever plane was acquired; a model trained on
NIfTI volumes loaded "as closest canonical" expects its axes to run towards the patient's Right,
Anterior and Superior instead. Only permutations and flips are used (never interpolation), so the
transform is exact and its inverse puts every voxel back where it came from.

Directions are in the DICOM patient coordinate system (LPS: +x to the patient's Left, +y Posterior,
+z Superior; PS3.3 C.7.6.2.1.1), as :attr:`infergate.dicom.volume.Volume.direction` holds them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

OrientationCode = Literal["RAS", "LPS"]

#: Unit vector in LPS coordinates of the direction each letter names.
_LETTERS: dict[str, tuple[int, int]] = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Reorientation:
    """An axis permutation followed by flips, from a (slice, row, column) array to oriented axes.

    Attributes
    ----------
    axes : tuple[int, int, int]
        For each oriented axis, the source axis it is taken from (the ``numpy.transpose`` order).
    flips : tuple[bool, bool, bool]
        For each oriented axis, whether it is reversed after the permutation.
    """

    axes: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)

    @property
    def is_identity(self) -> bool:
        """True when the array is used as stored."""
        return self.axes == (0, 1, 2) and not any(self.flips)

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The oriented view of a source-ordered array (no copy)."""
        out = np.transpose(array, self.axes)
        flipped = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        return np.flip(out, axis=flipped) if flipped else out

    def invert(self, array: np.ndarray) -> np.ndarray:
        """The source-ordered view of an oriented array: the exact inverse of :meth:`apply`."""
        flipped = tuple(axis for axis, flip in enumerate(self.flips) if flip)
        out = np.flip(array, axis=flipped) if flipped else array
        return np.transpose(out, tuple(int(i) for i in np.argsort(self.axes)))

    def shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The oriented shape of a source ``shape``."""
        return shape[self.axes[0]], shape[self.axes[1]], shape[self.axes[2]]

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """The voxel spacing along the oriented axes."""
        return spacing[self.axes[0]], spacing[self.axes[1]], spacing[self.axes[2]]


def reorientation(direction: np.ndarray, code: OrientationCode | None) -> Reorientation:
    """The :class:`Reorientation` that makes array axes run towards the letters of ``code``.

    Parameters
    ----------
    direction : numpy.ndarray
        3x3 rows: row cosines (the column index's direction), column cosines (the row index's
        direction) and the slice normal (the slice index's direction), as in
        :attr:`~infergate.dicom.volume.Volume.direction`.
    code : {"RAS", "LPS"} or None
        Target direction of oriented axes 0, 1 and 2; None keeps the stored order.

    Returns
    -------
    Reorientation
        For each oriented axis, the source axis whose direction is closest to the target (the
        permutation that maximises the summed absolute cosines, so an oblique acquisition still
        gives each patient axis exactly one array axis), flipped where it points the other way.

    Raises
    ------
    ValueError
        ``direction`` is not 3x3 or ``code`` is not a known orientation.
    """
    if code is None:
        return Reorientation()
    if code not in ("RAS", "LPS"):
        raise ValueError(f'Argument "code" should be "RAS", "LPS" or None, not {code!r}.')
    matrix = np.asarray(direction, dtype=np.float64)
    if matrix.shape != (3, 3):
        raise ValueError(f'Argument "direction" should be 3x3, not {matrix.shape}.')
    # array axis 0 (slices) runs along the normal, 1 (rows) along the column cosines, 2 along the row cosines
    axis_vectors = matrix[::-1]
    targets = [_LETTERS[letter] for letter in code]
    cosines = np.array([[axis_vectors[a][patient] * sign for patient, sign in targets] for a in range(3)])
    best = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(cosines[source, oriented]) for oriented, source in enumerate(perm)),
    )
    axes = (int(best[0]), int(best[1]), int(best[2]))
    flips = tuple(bool(cosines[source, oriented] < 0) for oriented, source in enumerate(axes))
    return Reorientation(axes=axes, flips=(flips[0], flips[1], flips[2]))
