"""Never lose a study: a full disk or a dead database refuses instances cleanly (rows 4 and 5 of issue 5).

* Row 4: the data folder is a small tmpfs. Once it is full, C-STOREs are answered 0xA700 (never
  Success), no partial file is left, nothing acknowledged is deleted, and storing works again once
  there is room.
* Row 5: PostgreSQL dies (``pg_ctl stop -m immediate``) in the middle of a study. Instances are
  answered 0xA700, no file is kept without a row, and after PostgreSQL's restart the sender's
  retries are stored. The cluster is a private one of the test, never the machine's shared server.
* What a crash or a lost COMMIT reply leaves (a file without a row, a row without a file) is
  repaired by the sender's retry of that instance.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.ingest import IngestOutcome, InstanceHeader, ingest_instance
from infergate.store.tables import InstanceConflict, Series
from tests.data.make_series import write_ct_series
from tests.reliability.scp_harness import (
    OUT_OF_RESOURCES,
    SUCCESS,
    PrivatePostgres,
    ScpProcess,
    Sender,
    assert_consistent,
    dataset_bytes,
    files_under,
    migrate,
    small_tmpfs,
    stored_instances,
    table_rows,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("verbatim_sends")]

#: The association-level free-space watermark (another guard, tested elsewhere) is turned off here,
#: so that the C-STORE handler itself meets the full disk.
NO_WATERMARK = {"min_free_bytes": 0}


# --- Row 4 ------------------------------------------------------------------------------------------


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real filesystem that fills up and answers ENOSPC."""
    try:
        with small_tmpfs(tmp_path / "volume", "4m") as mounted:
            yield mounted
    except PermissionError as exc:
        pytest.skip(f"a full disk is emulated with a small tmpfs, which needs root: {exc}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("database", ["sqlite-on-the-full-volume", "postgresql"])
def test_full_disk_answers_out_of_resources_and_keeps_what_it_acknowledged(
    database: str,
    volume: Path,
    tmp_path: Path,
    scp_process: Callable[..., ScpProcess],
    request: pytest.FixtureRequest,
) -> None:
    url = request.getfixturevalue("pg_url") if database == "postgresql" else None
    settings = migrate(volume / "var", url)  # SQLite lives on the full volume too, as embedded
    series = write_ct_series(tmp_path / "ct", slices=40, size=128, seed=4)  # 40 x 33 KiB
    scp = scp_process(settings, env=NO_WATERMARK).start()
    # Leave room for about ten instances: the test frees the ballast later; the node must never.
    stats = os.statvfs(volume)
    ballast = volume / "ballast"
    ballast.write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - 10 * series.paths[0].stat().st_size))
    sender = Sender(scp.port)
    try:
        statuses = {uid: sender.store(path) for uid, path in zip(series.sop_instance_uids, series.paths, strict=True)}
        sources = dict(zip(series.sop_instance_uids, series.paths, strict=True))
        answered = sorted({status for status in statuses.values()}, key=lambda s: -1 if s is None else s)
        assert set(answered) <= {SUCCESS, OUT_OF_RESOURCES}, f"statuses: {answered}"
        acknowledged = {uid: sources[uid] for uid, status in statuses.items() if status == SUCCESS}
        refused = [uid for uid, status in statuses.items() if status == OUT_OF_RESOURCES]
        assert acknowledged and refused, f"the volume should hold some of the series, not all: {answered}"
        assert_consistent(settings, acknowledged, refused)

        ballast.unlink()  # room again: the refused instances are sent again, as a PACS retries
        retried = {uid: sender.store(sources[uid]) for uid in refused}
        assert set(retried.values()) == {SUCCESS}, retried
    finally:
        sender.close()
        scp.kill()
    assert_consistent(settings, sources)


# --- Row 5 ------------------------------------------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    cluster = PrivatePostgres().init()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.mark.timeout(180)
def test_database_down_mid_study_answers_out_of_resources_and_recovers(
    private_postgres: PrivatePostgres, tmp_path: Path, scp_process: Callable[..., ScpProcess]
) -> None:
    settings: Settings = migrate(tmp_path / "var", private_postgres.url)
    series = write_ct_series(tmp_path / "ct", slices=50, size=64, seed=5)
    sources = dict(zip(series.sop_instance_uids, series.paths, strict=True))
    scp = scp_process(settings).start()
    sender = Sender(scp.port)
    statuses: dict[str, int | None] = {}
    stopped = threading.Event()
    after_stop: list[str] = []

    def stop_database() -> None:
        private_postgres.stop_immediately()
        stopped.set()

    stopper = threading.Thread(target=stop_database, name="pg-stop")
    try:
        for index, (uid, path) in enumerate(sources.items()):
            if index == 20:
                stopper.start()  # dies while the next stores are on their way
            if stopped.is_set():
                after_stop.append(uid)
            statuses[uid] = sender.store(path)
        stopper.join(timeout=60)
        assert set(statuses.values()) <= {SUCCESS, OUT_OF_RESOURCES}, statuses
        assert after_stop and all(statuses[uid] == OUT_OF_RESOURCES for uid in after_stop)
        acknowledged = {uid: sources[uid] for uid, status in statuses.items() if status == SUCCESS}
        refused = [uid for uid, status in statuses.items() if status == OUT_OF_RESOURCES]
        assert len(acknowledged) >= 20

        # While the database is down: only acknowledged instances have files, and they are whole.
        folder = settings.instances_dir / series.study_uid / series.series_uid
        on_disk = files_under(settings.instances_dir)
        assert on_disk == {folder / f"{uid}.dcm" for uid in acknowledged}, "a file was kept for a refused instance"
        for uid in acknowledged:
            assert dataset_bytes(folder / f"{uid}.dcm") == dataset_bytes(sources[uid])

        private_postgres.start()
        # A COMMIT whose reply was lost with the server may still have reached it: such a refused
        # instance has a row but (its file having been discarded) no file, until the retry below
        # restores the file. Any other refused instance has neither.
        rows = stored_instances(settings)
        lost_replies = [uid for uid in refused if uid in rows]
        assert all(not rows[uid].path.exists() for uid in lost_replies)
        assert_consistent(
            settings, acknowledged, [uid for uid in refused if uid not in lost_replies], unresolved=lost_replies
        )

        retried = {uid: sender.store(sources[uid]) for uid in refused}
        assert set(retried.values()) == {SUCCESS}, retried
    finally:
        sender.close()
        scp.kill()
    assert_consistent(settings, sources)


# --- What a crash or a lost COMMIT reply leaves behind, met by the sender's retry ------------------------


def _ingest(factory: sessionmaker[Session], settings: Settings, path: Path) -> IngestOutcome:
    ds = dcmread(path, stop_before_pixels=True)
    header = InstanceHeader.from_dataset(
        ds,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
    )
    return ingest_instance(factory, settings.data_path, header, path.read_bytes(), calling_ae="RETRY", called_ae=None)


@pytest.mark.timeout(60)
def test_a_row_without_its_file_is_restored_by_the_retry(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The COMMIT reached the database, its reply did not: the handler discarded the file and
    answered 0xA700; the sender's retry must not be taken for a harmless duplicate."""
    series = write_ct_series(tmp_path / "ct", slices=1, size=32, seed=6)
    path, uid = series.paths[0], series.sop_instance_uids[0]
    assert _ingest(session_factory, db_settings, path) is IngestOutcome.stored
    stored_instances(db_settings)[uid].path.unlink()
    assert _ingest(session_factory, db_settings, path) is IngestOutcome.stored
    assert_consistent(db_settings, {uid: path})
    assert [row["num_instances"] for row in table_rows(db_settings, Series)] == [1]


@pytest.mark.timeout(60)
def test_a_file_without_a_row_is_replaced_by_the_retry(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Killed between the link and the commit: a complete file without a row, never acknowledged.
    The retry's copy replaces it and is indexed with its own size."""
    series = write_ct_series(tmp_path / "ct", slices=1, size=32, seed=7)
    path, uid = series.paths[0], series.sop_instance_uids[0]
    orphan = db_settings.instances_dir / series.study_uid / series.series_uid / f"{uid}.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(path.read_bytes()[:-100])  # another (shorter) copy of the same instance
    assert _ingest(session_factory, db_settings, path) is IngestOutcome.stored
    assert orphan.read_bytes() == path.read_bytes()
    assert_consistent(db_settings, {uid: path})
    assert table_rows(db_settings, InstanceConflict) == []
