"""Clean-up of binary masks and label maps: connected components and enclosed holes.

Segmentation networks leave small false-positive islands and, in organs with internal cavities
(ventricles in a brain mask), holes. These helpers remove them in 3-D, or in 2-D for a volume of one
slice (a radiograph), where a 3-D hole could never be enclosed. Components are 26-connected (as
``cc3d``'s default, which deepbet uses), holes are background regions that are not 6-connected to
the array border (as ``scipy.ndimage.binary_fill_holes`` and ``fill_voids`` define them).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from infergate.manifest import Postprocess


def _planar(mask: np.ndarray) -> tuple[np.ndarray, bool]:
    """A one-slice volume is processed as the 2-D image it is."""
    if mask.ndim == 3 and mask.shape[0] == 1:
        return mask[0], True
    return mask, False


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of the fully connected components of ``mask`` and their voxel counts (index 0 unused)."""
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    labels, count = ndimage.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels, sizes


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component of a boolean mask (empty stays empty)."""
    plane, planar = _planar(np.asarray(mask, dtype=bool))
    labels, sizes = _components(plane)
    kept = labels == int(np.argmax(sizes)) if sizes.size > 1 else np.zeros_like(plane)
    return kept[np.newaxis] if planar else kept


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop connected components of fewer than ``min_voxels`` voxels."""
    plane, planar = _planar(np.asarray(mask, dtype=bool))
    if min_voxels <= 1:
        kept = plane.copy()
    else:
        labels, sizes = _components(plane)
        kept = (sizes >= min_voxels)[labels] & plane
    return kept[np.newaxis] if planar else kept


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not reach the array border (6-connected background).

    Equivalent to ``scipy.ndimage.binary_fill_holes`` with its default structure, but done with one
    labelling pass instead of iterated dilation, which takes seconds to minutes on a 256^3 volume.
    """
    plane, planar = _planar(np.asarray(mask, dtype=bool))
    background, count = ndimage.label(~plane)
    if count == 0:
        filled = plane.copy()
    else:
        border = np.zeros(count + 1, dtype=bool)
        for axis in range(plane.ndim):
            for end in (0, -1):
                border[np.take(background, end, axis=axis)] = True
        border[0] = True  # label 0 is the mask itself
        filled = plane | ~border[background]
    return filled[np.newaxis] if planar else filled


def _box(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty mask, to keep the work proportional to the object."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def clean_labels(label_map: np.ndarray, postprocess: Postprocess) -> np.ndarray:
    """Apply ``min_component_voxels``, ``largest_component`` and ``fill_holes`` to each label, in this order.

    Filled holes take the label only where they were background, so a label enclosed by another one
    is kept. Work is limited to each label's bounding box: outside it the label has no voxels, and
    background beyond the box always reaches the border, so the result is the same as on the whole array.

    Returns
    -------
    numpy.ndarray
        A new label map of the same dtype.
    """
    out = np.array(label_map, copy=True)
    if not (postprocess.largest_component or postprocess.fill_holes or postprocess.min_component_voxels > 1):
        return out
    for value in (int(v) for v in np.unique(out) if v != 0):
        present = out == value
        box = _box(present)
        region = out[box]
        mask = present[box]
        cleaned = remove_small_components(mask, postprocess.min_component_voxels)
        if postprocess.largest_component:
            cleaned = largest_component(cleaned)
        region[mask & ~cleaned] = 0
        if postprocess.fill_holes:
            holes = fill_holes(cleaned) & ~cleaned & (region == 0)
            region[holes] = value
    return out
