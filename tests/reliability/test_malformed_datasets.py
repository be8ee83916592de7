"""Row 19 of issue 5: a malformed dataset never gets a Success unless it was stored intact.

* **Generated mutations** (hypothesis, derandomized, 10,560 examples in all): valid CT datasets in
  Explicit and Implicit VR Little Endian, RLE, JPEG 2000 and JPEG-LS, with nested sequences and
  private elements, are cut short, extended, overwritten byte by byte, spliced, given wrong lengths,
  wrong VRs and wrong tags, sent under another transfer syntax or with command UIDs that differ
  from the dataset's; and pure garbage. They go through the SCP's C-STORE handler in process (the
  network adds nothing here but time; the real process is exercised below). 1,000 more Part 10
  files, File Meta Information included, cut short and overwritten, go through STOW-RS's
  ``store_part``, the other door into the same store.
* **pydicom's own test files**, broken ones included (bad VRs, no meta, truncated, a JPEG 2000
  codestream cut short, bad sequences), each also cut in half, cut by one byte and given a bad VR,
  plus command/dataset UID mismatches, sent as they are to a real ``python -m service.scp`` process.

The promise checked for every case:

* Success (0x0000) only if the instance's row exists and its file holds exactly the sent dataset
  bytes (behind the node's own File Meta Information) and parses with pydicom, every element;
* otherwise a failure status in 0xA9xx or 0xCxxx and no row (0xA700 is for resources; none here);
* each case answers within 2 s; the SCP process survives and its peak RSS stays bounded.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.dicom.receive import StoreContext
from infergate.dicomweb.stow import FailureReason, StorePolicy, store_part
from infergate.store.session import make_engine, make_session_factory
from infergate.store.tables import Instance
from service.scp.ae import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES
from tests.data.make_series import write_ct_series
from tests.helpers.bombs import deflate_bomb
from tests.helpers.raw_store import RawSender, dataset_of, store_in_process
from tests.helpers.rss import RssSampler
from tests.reliability.scp_harness import ScpProcess, files_under, migrate, stored_instances

SUCCESS = 0x0000
#: Per case, as the row says; far above what a case takes here (a few ms).
CASE_SECONDS = 2.0
#: Examples per mutation kind, 10,560 in all (syntax_and_uids is every combination there is).
EXAMPLES = {
    "truncate": 1600,
    "extend": 600,
    "overwrite": 2200,
    "splice": 1000,
    "length": 2000,
    "vr": 1000,
    "tag": 1200,
    "garbage": 500,
    "syntax_and_uids": 60,
    "deflate": 400,
}
#: STOW-RS parts, on top: the same path into the store, by the other door.
STOW_EXAMPLES = 1000
STOW_POLICY = StorePolicy(frozenset(STORAGE_SOP_CLASSES), frozenset(TRANSFER_SYNTAXES))
#: Failure reasons of STOW-RS (PS3.18 Table I.2-2) that refuse a part for what it is.
STOW_REFUSALS = {
    FailureReason.CANNOT_UNDERSTAND,
    FailureReason.DATA_SET_DOES_NOT_MATCH,
    FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
    FailureReason.SOP_CLASS_NOT_SUPPORTED,
}
#: Growth of the test process's peak RSS allowed over the whole generated run.
FUZZ_RSS_GROWTH_MIB = 256
#: Peak RSS of the SCP process over the corpus run (its baseline is about 100 MiB).
SCP_PEAK_RSS_MIB = 600

#: The SOP Instance UID of every seed; the last 12 digits are replaced by a counter per example,
#: so that every example is a new instance (same length: no length field changes).
_UID_PREFIX = "1.2.826.0.1.3680043.8.498.19.1"
_UID_TEMPLATE = _UID_PREFIX + "0" * 12
_counter = iter(range(1, 10**12))

_ITEM_TAGS = (b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VRS = [
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
    b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
    b"UR", b"US", b"UT", b"UV", b"\x00\x00", b"ob", b"ZZ", b"\xff\xff", b"  ",
]  # fmt: skip


# --- seeds ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    syntax: str
    data: bytes  # the dataset (no File Meta), SOP Instance UID = _UID_TEMPLATE
    headers: tuple[int, ...]  # offsets of (probable) element headers, nested ones included

    @property
    def explicit(self) -> bool:
        return self.syntax != ImplicitVRLittleEndian


def _decorate(ds: Dataset) -> None:
    """Sequences (nested, undefined and defined length), private elements and a few more VRs."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "113691", "DCM", "IEC Body Dosimetry Phantom"
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.19.2"
    item.PurposeOfReferenceCodeSequence = [inner]
    ds.ReferencedImageSequence = [item]
    ds.AnatomicRegionSequence = [inner]
    block = ds.private_block(0x0009, "INFERGATE FUZZ", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "UL", 12345)
    block.add_new(0x03, "FD", [1.5, -2.5])
    block.add_new(0x04, "SQ", [item])
    ds.SOPInstanceUID = _UID_TEMPLATE


def _part10(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _headers(ds: Dataset, data: bytes) -> tuple[int, ...]:
    """Offsets at which the tag of an element of ``ds`` (or an item tag) occurs in ``data``."""
    patterns = set(_ITEM_TAGS)
    for elem in ds.iterall():
        patterns.add(struct.pack("<HH", elem.tag.group, elem.tag.element))
    offsets = {m.start() for pattern in patterns for m in re.finditer(re.escape(pattern), data)}
    return tuple(sorted(offsets))


def _make_seeds(folder: Path) -> list[Seed]:
    seeds = []
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLSLossless):
        info = write_ct_series(folder / syntax, slices=1, size=32, seed=19, transfer_syntax=syntax)
        ds = dcmread(info.paths[0])
        _decorate(ds)
        data = dataset_of(_part10(ds))
        seeds.append(Seed(UID(syntax).name, syntax, data, _headers(ds, data)))
    return seeds


def _fresh(data: bytes) -> tuple[str, bytes]:
    """A new SOP Instance UID for this example, and ``data`` carrying it."""
    uid = f"{_UID_PREFIX}{next(_counter):012d}"
    return uid, data.replace(_UID_TEMPLATE.encode(), uid.encode())


# --- the promise ------------------------------------------------------------------------------------


def _parses(path: Path) -> None:
    """pydicom reads the file and converts every element, nested ones included."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
        for _ in ds.iterall():
            pass


def _is_failure(status: int) -> bool:
    return 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF


def _check_case(status: int, sent: bytes, stored: Path | None, what: str) -> None:
    """The row's promise for one case; ``stored`` is the file of the instance's row, if any."""
    if status == SUCCESS:
        assert stored is not None, f"{what}: Success without a row"
        assert stored.is_file(), f"{what}: Success with a row but no file"
        assert dataset_of(stored.read_bytes()) == sent, (
            f"{what}: Success but the stored bytes differ from the sent ones"
        )
        try:
            _parses(stored)
        except Exception as exc:  # noqa: BLE001 - the assertion names what pydicom raised
            raise AssertionError(f"{what}: Success but the stored file does not parse ({exc!r})") from exc
    else:
        assert _is_failure(status), f"{what}: status 0x{status:04X} is neither Success nor a 0xA9xx/0xCxxx failure"
        assert stored is None, f"{what}: refused with 0x{status:04X} but a row was kept"


# --- generated mutations, in process ----------------------------------------------------------------


@dataclass(repr=False)
class Fuzz:
    ctx: StoreContext
    factory: sessionmaker[Session]
    seeds: list[Seed]
    failures_by_status: dict[int, int]

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "Fuzz(...)"


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    root = tmp_path_factory.mktemp("fuzz")
    settings = migrate(root / "var", None)
    engine = make_engine(settings)
    factory = make_session_factory(engine)
    quiet = {name: logging.getLogger(name) for name in ("infergate", "pydicom")}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.CRITICAL)  # 10,000 refusals would be 10,000 warnings
    state = Fuzz(StoreContext(factory, settings.data_path), factory, _make_seeds(root / "seeds"), {})
    sampler = RssSampler().__enter__()
    try:
        yield state
    finally:
        sampler.__exit__(None, None, None)
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
        growth_mib = sampler.growth / 1024**2
        rows = stored_instances(settings)
        files = files_under(settings.instances_dir)
        engine.dispose()
    # Checked once the generated cases ran: nothing left that has no row, and memory stayed bounded.
    assert files == {row.path for row in rows.values()}, "files without a row, or rows without a file"
    assert growth_mib < FUZZ_RSS_GROWTH_MIB, f"peak RSS grew by {growth_mib:.0f} MiB over the generated cases"


def _run_case(fuzz: Fuzz, sop_class: str, sop_instance: str, syntax: str, data: bytes) -> None:
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = store_in_process(fuzz.ctx, sop_class, sop_instance, syntax, data)
    elapsed = time.perf_counter() - started
    assert elapsed < CASE_SECONDS, f"the handler took {elapsed:.2f} s"
    fuzz.failures_by_status[status] = fuzz.failures_by_status.get(status, 0) + 1
    with fuzz.factory() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance))
    stored = None if path is None else fuzz.ctx.data_root / path
    _check_case(status, data, stored, f"{syntax} {len(data)} bytes")


def _fuzz_settings(kind: str) -> settings:
    return settings(
        max_examples=EXAMPLES[kind],
        derandomize=True,  # the same examples on every run and in CI
        database=None,
        deadline=timedelta(seconds=CASE_SECONDS),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


_seed_index = st.integers(min_value=0, max_value=4)
_byte = st.integers(min_value=0, max_value=255)


@pytest.mark.timeout(180)
@_fuzz_settings("truncate")
@given(index=_seed_index, fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated(fuzz: Fuzz, index: int, fraction: float) -> None:
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, data[: int(fraction * len(data))])


@pytest.mark.timeout(120)
@_fuzz_settings("extend")
@given(index=_seed_index, tail=st.binary(min_size=1, max_size=64))
def test_trailing_bytes(fuzz: Fuzz, index: int, tail: bytes) -> None:
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, data + tail)


@pytest.mark.timeout(240)
@_fuzz_settings("overwrite")
@given(
    index=_seed_index, edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), _byte), min_size=1, max_size=8)
)
def test_overwritten_bytes(fuzz: Fuzz, index: int, edits: list[tuple[float, int]]) -> None:
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    mutable = bytearray(data)
    for where, value in edits:
        mutable[int(where * len(mutable))] = value
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, bytes(mutable))


@pytest.mark.timeout(180)
@_fuzz_settings("splice")
@given(
    index=_seed_index,
    start=st.floats(0.0, 1.0),
    removed=st.integers(min_value=0, max_value=40),
    inserted=st.binary(max_size=40),
)
def test_spliced(fuzz: Fuzz, index: int, start: float, removed: int, inserted: bytes) -> None:
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    at = int(start * len(data))
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, data[:at] + inserted + data[at + removed :])


def _length_field(seed: Seed, data: bytes, offset: int) -> tuple[int, int]:
    """(offset, size) of the length field of the element header at ``offset``."""
    if data[offset : offset + 4] in _ITEM_TAGS or not seed.explicit:
        return offset + 4, 4
    return (offset + 8, 4) if data[offset + 4 : offset + 6] in _LONG_VRS else (offset + 6, 2)


_lengths = st.one_of(
    st.sampled_from([0, 1, 2, 3, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFE, 0x7FFFFFFF, 0x80000000]),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.integers(min_value=-8, max_value=8),  # added to the true length
)


@pytest.mark.timeout(240)
@_fuzz_settings("length")
@given(index=_seed_index, which=st.floats(0.0, 1.0, exclude_max=True), length=_lengths)
def test_wrong_lengths(fuzz: Fuzz, index: int, which: float, length: int) -> None:
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    offset = seed.headers[int(which * len(seed.headers))]
    field, size = _length_field(seed, data, offset)
    if field + size > len(data):
        return
    old = int.from_bytes(data[field : field + size], "little")
    new = (old + length) if -8 <= length <= 8 else length
    new %= 1 << (8 * size)
    data = data[:field] + new.to_bytes(size, "little") + data[field + size :]
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, data)


@pytest.mark.timeout(180)
@_fuzz_settings("vr")
@given(index=st.sampled_from([0, 2, 3, 4]), which=st.floats(0.0, 1.0, exclude_max=True), vr=st.sampled_from(_VRS))
def test_wrong_vrs(fuzz: Fuzz, index: int, which: float, vr: bytes) -> None:
    seed = fuzz.seeds[index]  # explicit VR seeds only: implicit VR has no VR field
    uid, data = _fresh(seed.data)
    offset = seed.headers[int(which * len(seed.headers))]
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, data[: offset + 4] + vr + data[offset + 6 :])


_tags = st.one_of(
    st.sampled_from(
        [
            (0xFFFE, 0xE000),
            (0xFFFE, 0xE00D),
            (0xFFFE, 0xE0DD),
            (0x0002, 0x0010),
            (0x0000, 0x0000),
            (0x7FE0, 0x0010),
            (0x0008, 0x0018),
            (0x0020, 0x000D),
            (0xFFFC, 0xFFFC),
            (0x0009, 0x0010),
        ]
    ),
    st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
)


@pytest.mark.timeout(180)
@_fuzz_settings("tag")
@given(index=_seed_index, which=st.floats(0.0, 1.0, exclude_max=True), tag=_tags)
def test_wrong_tags(fuzz: Fuzz, index: int, which: float, tag: tuple[int, int]) -> None:
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    offset = seed.headers[int(which * len(seed.headers))]
    _run_case(fuzz, CTImageStorage, uid, seed.syntax, data[:offset] + struct.pack("<HH", *tag) + data[offset + 4 :])


@pytest.mark.timeout(120)
@_fuzz_settings("garbage")
@given(syntax=st.sampled_from(TRANSFER_SYNTAXES), data=st.binary(max_size=4096))
def test_garbage(fuzz: Fuzz, syntax: str, data: bytes) -> None:
    _run_case(fuzz, CTImageStorage, f"{_UID_PREFIX}{next(_counter):012d}", syntax, data)


@pytest.mark.timeout(120)
@_fuzz_settings("syntax_and_uids")
@given(
    index=_seed_index,
    syntax=st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]),
    command=st.sampled_from(["same", "other class", "other instance", "dataset class"]),
)
def test_syntax_and_uid_mismatches(fuzz: Fuzz, index: int, syntax: str, command: str) -> None:
    """A dataset sent under another transfer syntax, or whose SOP Class/Instance UID differs from the command's."""
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    sop_class, sop_instance = CTImageStorage, uid
    if command == "other class":
        sop_class = MRImageStorage
    elif command == "other instance":
        sop_instance = f"{_UID_PREFIX}{next(_counter):012d}"
    elif command == "dataset class":
        data = data.replace(CTImageStorage.encode() + b"\x00", MRImageStorage.encode())
    if command == "same" and syntax == seed.syntax:
        syntax = ImplicitVRLittleEndian if seed.explicit else ExplicitVRLittleEndian
    _run_case(fuzz, sop_class, sop_instance, syntax, data)


@pytest.mark.timeout(120)
@_fuzz_settings("deflate")
@given(
    index=st.sampled_from([0, 1]),
    cut=st.floats(0.0, 1.0),
    edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), _byte), max_size=4),
    tail=st.binary(max_size=8),
)
def test_deflated(fuzz: Fuzz, index: int, cut: float, edits: list[tuple[float, int]], tail: bytes) -> None:
    """Deflated Explicit VR Little Endian: the deflate stream cut short, overwritten or extended."""
    seed = fuzz.seeds[index]  # 1: implicit VR content, deflated, in an explicit VR context
    uid, data = _fresh(seed.data)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = bytearray(compressor.compress(data) + compressor.flush())
    for where, value in edits:
        stream[int(where * len(stream))] = value
    sent = bytes(stream[: max(1, int(cut * len(stream)))] if cut < 1.0 else stream) + tail
    _run_case(fuzz, CTImageStorage, uid, DeflatedExplicitVRLittleEndian, sent)


@pytest.mark.timeout(120)
@settings(
    max_examples=STOW_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=CASE_SECONDS),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    index=_seed_index,
    cut=st.one_of(st.just(1.0), st.floats(0.0, 1.0)),  # whole or cut short, about half and half
    edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), _byte), max_size=4),
)
def test_stow_parts(fuzz: Fuzz, index: int, cut: float, edits: list[tuple[float, int]]) -> None:
    """STOW-RS takes the same path into the store: Part 10 files (File Meta Information included)
    cut short and overwritten, through ``store_part``. A stored part keeps its bytes, preamble zeroed."""
    seed = fuzz.seeds[index]
    uid, data = _fresh(seed.data)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, UID(uid)
    meta.TransferSyntaxUID = UID(seed.syntax)
    buffer = BytesIO()
    buffer.write(b"\xff" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    part = bytearray(buffer.getvalue() + data)
    for where, value in edits:
        part[int(where * len(part))] = value
    sent = bytes(part[: int(cut * len(part))] if cut < 1.0 else part)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = store_part(fuzz.factory, fuzz.ctx.data_root, sent, policy=STOW_POLICY)
    assert time.perf_counter() - started < CASE_SECONDS
    with fuzz.factory() as session:
        path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == outcome.sop_instance_uid))
    if outcome.stored:
        assert path is not None, "stored without a row"
        stored = (fuzz.ctx.data_root / path).read_bytes()
        assert stored == bytes(128) + sent[128:], "a stored part differs from the sent one"
        _parses(fuzz.ctx.data_root / path)
    else:
        assert outcome.failure in STOW_REFUSALS, outcome
        assert path is None or outcome.sop_instance_uid != uid, "a refused part left a row"


# --- pydicom's test files, to a real SCP process ----------------------------------------------------


def _corpus() -> list[Path]:
    """Every DICOM file pydicom and pydicom-data ship (found on disk: nothing is downloaded)."""
    roots = [Path(get_testdata_file("CT_small.dcm", download=False) or "").parent]  # type: ignore[arg-type]
    external = get_testdata_file("emri_small_jpeg_2k_lossless_too_short.dcm", download=False)
    if external is not None:
        roots.append(Path(external).parent)
    return sorted(path for root in roots for path in root.glob("*.dcm"))


@dataclass(frozen=True)
class Case:
    name: str
    sop_class: str
    sop_instance: str
    syntax: str
    data: bytes


def _new_uid_like(old: str, number: int) -> str:
    """A valid UID unique per ``number``, of exactly ``len(old)`` characters where that is possible
    (so that replacing ``old`` changes no length field)."""
    prefix = f"2.25.{number}."
    fill = len(old) - len(prefix)
    return prefix + "1" * fill if fill >= 1 else f"2.25.{number}"


def _read_corpus_file(path: Path) -> tuple[bytes, str | None, str | None, str | None]:
    """(dataset bytes, transfer syntax, SOP Class UID, SOP Instance UID), each None where the file
    does not say (no meta, or too broken to tell)."""
    raw = path.read_bytes()
    try:
        data = dataset_of(raw)
    except ValueError:
        data = raw[132:] if raw[128:132] == b"DICM" else raw
    syntax = sop_class = sop_instance = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, force=True, stop_before_pixels=True)
            syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "") or None
            sop_class, sop_instance = str(ds.SOPClassUID), str(ds.SOPInstanceUID)
        except Exception:  # noqa: BLE001 - broken files are the point; the defaults stand in
            pass
    return data, syntax, sop_class, sop_instance


def _break_vr(data: bytes, at: int) -> bytes:
    return data[:at] + b"\x00\x01" + data[at + 2 :]


def _corpus_cases(paths: list[Path], accepted: set[tuple[str, str]]) -> list[Case]:
    """Each file as it is, cut in half, cut by one byte and (explicit VR) with one VR broken, each
    under a new SOP Instance UID of the same length where the file carries one (so that no case is
    a duplicate of another); sent under the file's own context where the SCP accepts it, else as CT
    in Explicit VR Little Endian (the dataset is then wrong in class or encoding, for the SCP)."""
    rng = random.Random(19)
    cases: list[Case] = []
    for number, path in enumerate(paths, start=1):
        data, syntax, sop_class, old_uid = _read_corpus_file(path)
        syntax = syntax or ImplicitVRLittleEndian
        sop_class = sop_class or CTImageStorage
        if (sop_class, syntax) not in accepted:
            syntax = ExplicitVRLittleEndian
            if (sop_class, syntax) not in accepted:
                sop_class = CTImageStorage
        variants: dict[str, Callable[[bytes], bytes]] = {
            "": lambda d: d,
            " (half)": lambda d: d[: len(d) // 2],
            " (minus one byte)": lambda d: d[:-1],
        }
        if syntax != ImplicitVRLittleEndian:
            found = [m.start() + 4 for m in re.finditer(rb"(?s).{4}(?:US|UL|LO|CS|UI|DS|IS|SH|DA|TM)", data)]
            if found:
                at = rng.choice(found)
                variants[" (bad VR)"] = functools.partial(_break_vr, at=at)
        for variant, (label, mutate) in enumerate(variants.items()):
            unique = 10 * number + variant
            uid = _new_uid_like(old_uid, unique) if old_uid else f"2.25.{unique}"
            sent = data.replace(old_uid.encode(), uid.encode()) if old_uid and len(uid) == len(old_uid) else data
            cases.append(Case(path.name + label, sop_class, uid, syntax, mutate(sent)))
    return cases


def _bomb_command() -> tuple[str, str]:
    sop_class, sop_instance, _ = deflate_bomb()
    return sop_class, sop_instance


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_pydicom_test_files_to_a_real_scp(tmp_path: Path, scp_process: Callable[..., ScpProcess]) -> None:
    settings: Settings = migrate(tmp_path / "var", None)
    scp = scp_process(settings).start()
    paths = _corpus()
    assert len(paths) >= 100, f"only {len(paths)} pydicom test files found"
    assert {"MR_truncated.dcm", "badVR.dcm", "no_meta.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"} <= {
        p.name for p in paths
    }
    accepted = {(str(c), str(t)) for c in STORAGE_SOP_CLASSES for t in TRANSFER_SYNTAXES}
    cases = _corpus_cases(paths, accepted)
    # command/dataset mismatches of a valid file, and a deflate bomb
    valid = next(c for c in cases if c.name == "CT_small.dcm")
    cases += [
        Case("class mismatch", MRImageStorage, valid.sop_instance, valid.syntax, valid.data),
        Case("instance mismatch", valid.sop_class, "2.25.19", valid.syntax, valid.data),
        Case("deflate bomb", *_bomb_command(), DeflatedExplicitVRLittleEndian, deflate_bomb()[2]),
    ]
    contexts = sorted({(c.sop_class, c.syntax) for c in cases} | {(MRImageStorage, valid.syntax)})
    assert len(contexts) <= 128
    sender = RawSender(scp.port, contexts, timeout=CASE_SECONDS * 5)
    statuses: dict[str, int | None] = {}
    seconds: dict[str, float] = {}
    try:
        for case in cases:
            started = time.perf_counter()
            statuses[case.name] = sender.send(case.sop_class, case.sop_instance, case.syntax, case.data)
            seconds[case.name] = time.perf_counter() - started
    finally:
        sender.close()
    assert scp.process is not None and scp.process.poll() is None, "the SCP process died"
    peak = _peak_rss_mib(scp.pid)
    rows = stored_instances(settings)
    for case in cases:
        status = statuses[case.name]
        assert status is not None, f"{case.name}: no response"
        row = rows.get(case.sop_instance)
        stored = row.path if row is not None and case.name not in ("class mismatch", "instance mismatch") else None
        if case.name in ("class mismatch", "instance mismatch"):
            assert status == 0xA900, f"{case.name}: 0x{status:04X}"
            continue
        _check_case(status, case.data, stored, case.name)
    slow = {name: round(t, 2) for name, t in seconds.items() if t > CASE_SECONDS}
    assert not slow, f"cases slower than {CASE_SECONDS} s: {slow}"
    assert peak < SCP_PEAK_RSS_MIB, f"the SCP's peak RSS reached {peak:.0f} MiB"
    succeeded = {name for name, status in statuses.items() if status == SUCCESS}
    assert {"CT_small.dcm", "MR_small.dcm"} <= succeeded, "valid files must still be stored"
    for name in ("MR_truncated.dcm", "deflate bomb", "CT_small.dcm (half)", "MR_small.dcm (minus one byte)"):
        assert name not in succeeded, f"{name} was acknowledged"
    assert files_under(settings.instances_dir) == {row.path for row in rows.values()}
