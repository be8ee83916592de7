"""Pixel and decompression bombs for the reliability suite, and a child process that meets them
with its address space capped.

:func:`pixel_bombs` writes Part 10 files that are valid DICOM structures (an SCP stores them) but
whose pixel data would make a decoder allocate gigabytes: headers of 65535 x 65535 over a few KiB,
and JPEG / JPEG-LS / JPEG 2000 codestreams declaring 65535 x 65535 under a 64 x 64 header, and RLE
runs that decode to 2 GiB. :func:`deflate_bomb` is a dataset that inflates to 2 GiB.

``python -m tests.helpers.bombs load FOLDER`` and ``python -m tests.helpers.bombs jobs DATA_DIR
JOB_ID...`` run the worker-side code on them after capping ``RLIMIT_AS`` at what the process holds
after its imports plus ``--headroom`` bytes: a bomb allocation then fails loudly (MemoryError, or a
decoder's error) rather than succeeding lazily and being OOM-killed later. One JSON object per case
goes to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import struct
import sys
import tempfile
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.data.make_series import write_ct_series

__all__ = ["BIG", "deflate_bomb", "deflate_bomb_part10", "pixel_bombs"]

#: The largest dimension a US can declare.
BIG = 65535


def _slice(folder: Path, syntax: str) -> Dataset:
    info = write_ct_series(folder / str(syntax), slices=1, size=64, seed=21, transfer_syntax=syntax)
    return dcmread(info.paths[0])


def _own_series(ds: Dataset) -> Dataset:
    """A copy of ``ds`` as the only instance of a new series (so each bomb gets its own job)."""
    ds = copy.deepcopy(ds)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _patch(data: bytes, marker: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """``data`` with ``values`` packed at ``offset`` bytes after the first ``marker``."""
    at = data.index(marker) + offset
    packed = struct.pack(fmt, *values)
    return data[:at] + packed + data[at + len(packed) :]


def _encapsulated(ds: Dataset, frame: bytes, syntax: str) -> Dataset:
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    return ds


def _jpeg_baseline(native: Dataset) -> Dataset:
    """The slice as 8-bit JPEG baseline (PIL's encoder), its SOF0 declaring BIG x BIG."""
    pixels = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) % 251).astype(np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="JPEG", quality=90)
    ds = _own_series(native)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return _encapsulated(ds, _patch(buffer.getvalue(), b"\xff\xc0", 5, ">HH", BIG, BIG), JPEGBaseline8Bit)


def _rle_runs(native: Dataset) -> Dataset:
    """A 64 x 64 16-bit RLE frame of two segments, each 16 MiB of runs that decode to 1 GiB."""
    runs = b"\x81\x00" * (8 * 1024**2)  # each pair: 128 zero bytes
    header = struct.pack("<16I", 2, 64, 64 + len(runs), *([0] * 13))
    return _encapsulated(_own_series(native), header + runs + runs, RLELossless)


def pixel_bombs(folder: Path) -> dict[str, Path]:
    """Write the pixel bombs as Part 10 files; name -> path. Each is its own series."""
    native = _slice(folder / "source", ExplicitVRLittleEndian)
    j2k = _slice(folder / "source", JPEG2000Lossless)
    jls = _slice(folder / "source", JPEGLSLossless)
    bombs: dict[str, Dataset] = {}
    for name, size in (("native 65535 x 65535", BIG), ("native 40000 x 40000", 40000), ("native 1024", 1024)):
        ds = _own_series(native)
        ds.Rows = ds.Columns = size
        bombs[name] = ds
    ds = _own_series(j2k)
    ds.PixelData = _patch(ds.PixelData, b"\xff\x4f\xff\x51", 8, ">II", BIG, BIG)
    bombs["JPEG 2000 SIZ 65535 x 65535"] = ds
    ds = _own_series(j2k)
    ds.PixelData = _patch(ds.PixelData, b"\xff\x4f\xff\x51", 8, ">II", BIG, BIG)
    ds.Rows = ds.Columns = BIG
    bombs["JPEG 2000 65535 x 65535 in both"] = ds
    ds = _own_series(jls)
    ds.PixelData = _patch(ds.PixelData, b"\xff\xf7", 5, ">HH", BIG, BIG)
    bombs["JPEG-LS SOF55 65535 x 65535"] = ds
    bombs["JPEG SOF0 65535 x 65535"] = _jpeg_baseline(native)
    bombs["RLE runs to 2 GiB"] = _rle_runs(native)
    out = folder / "bombs"
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for number, (name, ds) in enumerate(bombs.items()):
        paths[name] = out / f"bomb{number}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    (out / "names.json").write_text(json.dumps({path.name: name for name, path in paths.items()}))
    return paths


def deflate_bomb() -> tuple[str, str, bytes]:
    """(SOP Class UID, SOP Instance UID, deflated dataset): a CT header and 2 GiB of zero pixels,
    deflated to about 2 MiB."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.21.1"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.21.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.21.3"
    ds.Rows = ds.Columns = 32768
    ds.BitsAllocated = 16
    buffer = BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    size, block = 2 * 1024**3, 1024**2
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = compressor.compress(buffer.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + size.to_bytes(4, "little"))
    head += compressor.flush(zlib.Z_FULL_FLUSH)
    # After a full flush the compressor forgets its history: the same block of zeros compresses to
    # the same bytes every time, so 2 GiB take one block's work.
    zeros = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), head + zeros * (size // block) + compressor.flush()


def deflate_bomb_part10() -> bytes:
    """:func:`deflate_bomb` as a Part 10 file (a STOW-RS part)."""
    sop_class, sop_instance, data = deflate_bomb()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(bytes(128) + b"DICM")
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    return buffer.getvalue() + data


# --- the capped child -------------------------------------------------------------------------------


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _cap(headroom: int) -> int:
    limit = _vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return limit


def _emit(case: str, **values: Any) -> None:
    sys.stdout.write(json.dumps({"case": case, **values}) + "\n")
    sys.stdout.flush()


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _outcome(call: Any) -> dict[str, Any]:
    try:
        result = call()
    except MemoryError:
        return {"outcome": "MemoryError", "message": ""}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which says what it expects
        return {"outcome": type(exc).__name__, "message": str(exc)}
    return {"outcome": "returned", "message": repr(result)[:300]}


def _load(folder: Path, headroom: int) -> None:
    from sqlalchemy.orm import sessionmaker

    from infergate.dicom.receive import StoreContext
    from infergate.dicom.volume import load_volume
    from infergate.dicomweb.stow import StorePolicy, store_part
    from service.scp.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
    from tests.helpers.raw_store import store_in_process

    paths = sorted(folder.glob("*.dcm"))
    names = json.loads((folder / "names.json").read_text())
    bomb = deflate_bomb()
    part = deflate_bomb_part10()
    scratch = Path(tempfile.mkdtemp())
    policy = StorePolicy(frozenset(STORAGE_SOP_CLASSES), frozenset(TRANSFER_SYNTAXES))
    unused = sessionmaker()  # refused before any SQL
    receive_log = _Messages()
    logging.getLogger("infergate.dicom.receive").addHandler(receive_log)
    logging.getLogger("infergate.dicom.receive").setLevel(logging.INFO)
    limit = _cap(headroom)
    _emit("cap", outcome="capped", message=str(limit), proof=_outcome(lambda: bytearray(2 * headroom))["outcome"])
    for path in paths:
        ds = dcmread(path)
        _emit(names[path.name], **_outcome(lambda ds=ds: load_volume([ds])))
        if names[path.name] == "native 1024":
            _emit("3000 slices of 1024 x 1024", **_outcome(lambda ds=ds: load_volume([ds] * 3000)))
    outcome = _outcome(lambda: store_part(unused, scratch, part, policy=policy))
    _emit("deflate bomb to STOW-RS", **outcome)
    ctx = StoreContext(unused, scratch)
    outcome = _outcome(lambda: store_in_process(ctx, bomb[0], bomb[1], DeflatedExplicitVRLittleEndian, bomb[2]))
    _emit("deflate bomb to the C-STORE handler", **outcome, log=receive_log.messages[-1:])
    _emit("peak", outcome="rss", message=str(_peak_rss()))


def _peak_rss() -> int:
    """This process's own resident high-water mark in bytes.

    Not ``getrusage().ru_maxrss``: Linux carries it over from the parent through fork and exec, so a
    child of a large pytest process would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _jobs(data_dir: Path, job_ids: list[int], headroom: int) -> None:
    from infergate.config import Settings
    from infergate.store.session import make_engine, make_session_factory
    from workers.pipeline import WorkerContext, run_job
    from workers.runtime import OnnxRunner

    settings = Settings(data_dir=data_dir)
    ctx = WorkerContext(settings, make_session_factory(make_engine(settings)), OnnxRunner(["CPUExecutionProvider"]))
    ctx.catalog()
    _cap(headroom)
    for job_id in job_ids:
        _emit(str(job_id), **_outcome(lambda job_id=job_id: run_job(ctx, job_id)[0].value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--headroom", type=int, default=1024**3)
    sub = parser.add_subparsers(dest="mode", required=True)
    load = sub.add_parser("load")
    load.add_argument("folder", type=Path)
    jobs = sub.add_parser("jobs")
    jobs.add_argument("data_dir", type=Path)
    jobs.add_argument("job_ids", type=int, nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.mode == "load":
        _load(args.folder, args.headroom)
    else:
        _jobs(args.data_dir, args.job_ids, args.headroom)
    return 0


if __name__ == "__main__":
    sys.exit(main())
