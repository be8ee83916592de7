"""Path-safe, durable storage of Part 10 files (infergate.dicom.storage)."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infergate.dicom.storage import (
    OutOfSpace,
    instance_relpath,
    replace_file,
    resolve_inside,
    result_relpath,
    store_new_file,
)
from infergate.errors import InvalidInput

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"
SOP = "1.2.826.0.1.3680043.8.498.3"


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# --- Paths ---------------------------------------------------------------------------------------


def test_instance_relpath_layout() -> None:
    assert instance_relpath(STUDY, SERIES, SOP) == Path("instances", STUDY, SERIES, SOP + ".dcm")


@pytest.mark.parametrize(
    "hostile",
    [
        "..",
        ".",
        "1.2/../3",
        "1.2\\..\\3",
        "/etc/passwd",
        "1.2.03",  # component with a leading zero
        "1." + "2" * 63,  # 65 characters
        "",
        "1.2\n",
        "1.2\x00",
        " 1.2",
    ],
)
@pytest.mark.parametrize("position", [0, 1, 2])
def test_instance_relpath_refuses_hostile_uids(hostile: str, position: int) -> None:
    uids = [STUDY, SERIES, SOP]
    uids[position] = hostile
    name = ["study_instance_uid", "series_instance_uid", "sop_instance_uid"][position]
    with pytest.raises(InvalidInput, match=name):
        instance_relpath(*uids)


@pytest.mark.parametrize("value", [None, 12, 1.2, b"1.2.3", ["1.2.3"]])
def test_instance_relpath_refuses_non_strings(value: object) -> None:
    with pytest.raises(InvalidInput, match="sop_instance_uid"):
        instance_relpath(STUDY, SERIES, value)  # type: ignore[arg-type]


def test_result_relpath() -> None:
    assert result_relpath(7, "SEG", SOP) == Path("results", "7", f"SEG-{SOP}.dcm")
    with pytest.raises(ValueError, match="kind"):
        result_relpath(7, "../SEG", SOP)
    with pytest.raises(InvalidInput, match="sop_instance_uid"):
        result_relpath(7, "SR", "../../x")


@pytest.mark.parametrize("relpath", ["../outside", "a/../../outside", "/etc/passwd", Path("..")])
def test_resolve_inside_refuses_escapes(tmp_path: Path, relpath: str | Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(InvalidInput):
        resolve_inside(root, relpath)


def test_resolve_inside_refuses_symlink_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(InvalidInput):
        resolve_inside(root, "link/file.dcm")


def test_resolve_inside_accepts_paths_inside(tmp_path: Path) -> None:
    assert resolve_inside(tmp_path, "a/b/../c.dcm") == tmp_path.resolve() / "a" / "c.dcm"
    assert resolve_inside(tmp_path, ".") == tmp_path.resolve()


# --- Writing -------------------------------------------------------------------------------------


def test_store_new_file_writes_and_keeps_the_first_copy(tmp_path: Path) -> None:
    relpath = instance_relpath(STUDY, SERIES, SOP)
    assert store_new_file(tmp_path, relpath, b"first copy") is True
    assert (tmp_path / relpath).read_bytes() == b"first copy"
    assert store_new_file(tmp_path, relpath, b"second, different copy") is False
    assert (tmp_path / relpath).read_bytes() == b"first copy"
    assert _all_files(tmp_path) == [tmp_path / relpath], "no temporary file may be left behind"


def test_store_new_file_accepts_chunks(tmp_path: Path) -> None:
    relpath = Path("instances", "x.dcm")
    assert store_new_file(tmp_path, relpath, [b"DICM", b"", b"-" * 100_000, b"end"])
    assert (tmp_path / relpath).read_bytes() == b"DICM" + b"-" * 100_000 + b"end"
    assert _all_files(tmp_path) == [tmp_path / relpath]


def test_store_new_file_refuses_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(InvalidInput):
        store_new_file(root, Path("../evil.dcm"), b"x")
    assert not (tmp_path / "evil.dcm").exists()


def test_replace_file_replaces(tmp_path: Path) -> None:
    relpath = result_relpath(1, "SEG", SOP)
    path = replace_file(tmp_path, relpath, b"version 1")
    assert path == tmp_path.resolve() / relpath
    assert path.read_bytes() == b"version 1"
    assert replace_file(tmp_path, relpath, b"version 2") == path
    assert path.read_bytes() == b"version 2"
    assert _all_files(tmp_path) == [path]


def test_replace_file_recovers_from_a_stale_temporary_file(tmp_path: Path) -> None:
    relpath = result_relpath(1, "SR", SOP)
    path = replace_file(tmp_path, relpath, b"v1")
    # A crash between writing and renaming leaves the temporary file behind.
    (path.parent / f".{path.name}.{os.getpid()}.tmp").write_bytes(b"half")
    replace_file(tmp_path, relpath, b"v2")
    assert path.read_bytes() == b"v2"
    assert _all_files(tmp_path) == [path]


# --- A full volume -------------------------------------------------------------------------------


def _mount_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    folder.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs to emulate a full disk (needs root): {result.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB filesystem, so that writes fail with ENOSPC as on a full disk."""
    yield from _mount_tmpfs(tmp_path / f"vol-{uuid.uuid4().hex[:6]}", "size=64k,mode=0700")


@pytest.fixture
def inode_starved_volume(tmp_path: Path) -> Iterator[Path]:
    """A real filesystem with only a few inodes, so that even creating a folder fails with ENOSPC."""
    yield from _mount_tmpfs(tmp_path / f"vol-{uuid.uuid4().hex[:6]}", "size=1m,nr_inodes=4,mode=0700")


def test_full_volume_raises_out_of_space_and_leaves_nothing(tiny_volume: Path) -> None:
    relpath = instance_relpath(STUDY, SERIES, SOP)
    with pytest.raises(OutOfSpace) as info:
        store_new_file(tiny_volume, relpath, b"\0" * (1 << 20))
    assert isinstance(info.value, OSError)
    assert _all_files(tiny_volume) == [], "a partial or temporary file was left on the full volume"
    # The space is free again: a small instance still fits.
    assert store_new_file(tiny_volume, relpath, b"small")
    assert (tiny_volume / relpath).read_bytes() == b"small"


def test_full_volume_on_replace_keeps_the_old_version(tiny_volume: Path) -> None:
    relpath = result_relpath(3, "SEG", SOP)
    path = replace_file(tiny_volume, relpath, b"old")
    with pytest.raises(OutOfSpace):
        replace_file(tiny_volume, relpath, b"\0" * (1 << 20))
    assert path.read_bytes() == b"old"
    assert _all_files(tiny_volume) == [path]


def test_no_room_for_a_new_folder_raises_out_of_space(inode_starved_volume: Path) -> None:
    # The root takes one inode; fill the rest so that the series folders cannot be created.
    for i in range(10):
        try:
            (inode_starved_volume / f"filler{i}").write_bytes(b"")
        except OSError:
            break
    relpath = instance_relpath(STUDY, SERIES, SOP)
    with pytest.raises(OutOfSpace):
        store_new_file(inode_starved_volume, relpath, b"data")
    with pytest.raises(OutOfSpace):
        replace_file(inode_starved_volume, result_relpath(1, "SR", SOP), b"data")
