"""Comparing two DICOM objects element by element, nested sequences included."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

#: What may legitimately differ between two runs of the same job: when the object was made, and the
#: Dimension Organization UID, which highdicom draws at random for each SEG (PS3.3 C.7.6.17).
RUN_TIME_KEYWORDS = frozenset(
    {
        "ContentDate",
        "ContentTime",
        "InstanceCreationDate",
        "InstanceCreationTime",
        "ContributionDateTime",
        "DateTime",
        "Date",
        "Time",
        "DimensionOrganizationUID",
    }
)


def differences(a: Dataset, b: Dataset, path: str = "") -> set[str]:
    """Paths (``ContentSequence[0].DateTime``) of the elements whose values differ, or that only one has."""
    found: set[str] = set()
    for tag in sorted(set(a.keys()) | set(b.keys())):
        name = a[tag].keyword if tag in a else b[tag].keyword
        where = f"{path}{name or tag}"
        if tag not in a or tag not in b:
            found.add(where)
            continue
        left, right = a[tag].value, b[tag].value
        if isinstance(left, Sequence) and isinstance(right, Sequence):
            if len(left) != len(right):
                found.add(where)
                continue
            for index, (x, y) in enumerate(zip(left, right, strict=True)):
                found |= differences(x, y, f"{where}[{index}].")
        elif left != right:
            found.add(where)
    return found


def keywords(paths: set[str]) -> set[str]:
    """The last keyword of each path: ``ContentSequence[0].DateTime`` -> ``DateTime``."""
    return {path.rsplit(".", 1)[-1] for path in paths}


__all__ = ["RUN_TIME_KEYWORDS", "differences", "keywords"]
