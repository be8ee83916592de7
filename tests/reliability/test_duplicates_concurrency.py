"""Never lose a study: repeated, concurrent and aborted sends (rows 14-16 of issue 5).

* Row 14: an instance sent again, identical, with changed content, or under the same SOP Instance
  UID in another series or study: Success every time, the first copy is kept, one job runs, and a
  differing copy is recorded as a conflict.
* Row 15: 20 associations send the same 50-instance study 5 times each, at once: exactly 50
  instances, one job for the series, no failure.
* Row 16: an association aborted after 30 of 50 instances: the 30 acknowledged ones are processed
  once the series is quiet.

The SCP runs with its watcher (quiet period of a few seconds) and routing rules that send a CT
series to one model, so that "one job per series" is exactly one job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from infergate.config import Settings
from infergate.store.tables import ConflictKind, Instance, InstanceConflict, Job, JobState, Series, SeriesState
from tests.data.make_series import write_ct_series
from tests.helpers.node import NodeProcess
from tests.helpers.peers import run_storescu
from tests.reliability.scp_harness import (
    SUCCESS,
    ScpProcess,
    Sender,
    assert_consistent,
    dataset_bytes,
    stored_instances,
    table_rows,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("verbatim_sends")]

QUIET_SECONDS = 2.0
ONE_MODEL_RULES = """\
rules:
  - name: CT volume
    match: {modality: [CT], min_slices: 8}
    models: [ct-bone-classifier]
"""


def _watching(tmp_path: Path, **extra: object) -> dict[str, object]:
    """Environment of an SCP whose watcher routes a quiet CT series to one model."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(ONE_MODEL_RULES)
    return {
        "series_quiet_seconds": QUIET_SECONDS,
        "watcher_interval_seconds": 0.3,
        "routing_rules": rules,
        "reconcile_interval_seconds": 3600,
        **extra,
    }


def _routed_jobs(settings: Settings, timeout: float) -> list[dict[str, object]]:
    """Wait until every series left ``receiving``; then one more quiet period, and return the jobs."""
    wait_until(
        lambda: all(row["state"] != SeriesState.receiving for row in table_rows(settings, Series)),
        timeout=timeout,
        what="the series to be routed",
    )
    time.sleep(QUIET_SECONDS + 1)  # a second job, if any were made, would be there by now
    return table_rows(settings, Job)


# --- Row 14 -----------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_repeated_instances_keep_the_first_copy_and_record_conflicts(
    db_settings: Settings, scp_process: Callable[..., ScpProcess], tmp_path: Path
) -> None:
    series = write_ct_series(tmp_path / "ct", slices=10, size=64, seed=14)
    sources = dict(zip(series.sop_instance_uids, series.paths, strict=True))
    uids = series.sop_instance_uids
    scp = scp_process(db_settings, watcher=True, env=_watching(tmp_path)).start()

    changed = dcmread(series.paths[1])  # same UIDs, other pixels (a "corrected" image)
    pixels = changed.pixel_array.copy()
    pixels[:8, :8] = 0
    changed.PixelData = np.ascontiguousarray(pixels).tobytes()
    changed.save_as(tmp_path / "changed.dcm")
    other_series = dcmread(series.paths[2])  # same SOP Instance UID, another series of the study
    other_series.SeriesInstanceUID = generate_uid(entropy_srcs=["row 14 other series"])
    other_series.save_as(tmp_path / "other-series.dcm")
    other_study = dcmread(series.paths[3])  # ... and in another study
    other_study.StudyInstanceUID = generate_uid(entropy_srcs=["row 14 other study"])
    other_study.SeriesInstanceUID = generate_uid(entropy_srcs=["row 14 other study series"])
    other_study.save_as(tmp_path / "other-study.dcm")

    sender, second = Sender(scp.port), Sender(scp.port, calling="SECONDSENDER")
    try:
        assert [sender.store(path) for path in series.paths] == [SUCCESS] * 10
        first_copies = {uid: row.path.read_bytes() for uid, row in stored_instances(db_settings).items()}
        repeats = {
            "identical": sender.store(series.paths[0]),
            "identical, other association": second.store(series.paths[0]),
            "changed content": sender.store(tmp_path / "changed.dcm"),
            "other series": second.store(tmp_path / "other-series.dcm"),
            "other study": sender.store(tmp_path / "other-study.dcm"),
            "whole series again": second.store(series.paths[4]),
        }
    finally:
        sender.close()
        second.close()
    assert repeats == dict.fromkeys(repeats, SUCCESS), "a repeat is answered Success: the sender has nothing to fix"

    jobs = _routed_jobs(db_settings, timeout=60)
    # First copies kept, byte for byte, and nothing of the repeats stored (no folder of theirs either).
    assert_consistent(db_settings, sources)
    assert {uid: row.path.read_bytes() for uid, row in stored_instances(db_settings).items()} == first_copies
    assert dataset_bytes(stored_instances(db_settings)[uids[1]].path) != dataset_bytes(tmp_path / "changed.dcm")
    assert sorted(p.name for p in db_settings.instances_dir.iterdir()) == [series.study_uid]
    (only_series,) = table_rows(db_settings, Series)
    assert only_series["series_instance_uid"] == series.series_uid and only_series["num_instances"] == 10
    assert len(jobs) == 1 and jobs[0]["series_id"] == only_series["id"], jobs
    # The differing copies are recorded, against the first copy they repeat; identical ones are not.
    ids = {row["sop_instance_uid"]: row["id"] for row in table_rows(db_settings, Instance)}
    conflicts = sorted(
        (row["instance_id"], row["kind"], row["series_instance_uid"], row["calling_ae"])
        for row in table_rows(db_settings, InstanceConflict)
    )
    assert conflicts == sorted(
        [
            (ids[uids[1]], ConflictKind.content, series.series_uid, "RELIABILITY"),
            (ids[uids[2]], ConflictKind.series, other_series.SeriesInstanceUID, "SECONDSENDER"),
            (ids[uids[3]], ConflictKind.series, other_study.SeriesInstanceUID, "RELIABILITY"),
        ]
    )
    log = scp.log_text(limit=200_000)
    assert log.count("differs from the first copy") == 3
    assert "Phantom" not in log and str(changed.PatientID) not in log  # no patient data in the record


# --- Row 15 -----------------------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_twenty_concurrent_senders_store_each_instance_once(
    db_settings: Settings, scp_process: Callable[..., ScpProcess], tmp_path: Path
) -> None:
    series = write_ct_series(tmp_path / "ct", slices=50, size=64, seed=15)
    # 20 associations from one address: above the node's default per-address limit (16), which
    # would refuse 4 of them transiently (the sender then retries); this row is about the store.
    env = _watching(tmp_path, scp_max_associations_per_host=24)
    scp = scp_process(db_settings, watcher=True, env=env).start()
    outputs: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def send_five_times(number: int) -> None:
        for _ in range(5):
            result = run_storescu(series.folder, port=scp.port, aet=f"SENDER{number:02d}", extra_args=["-v"])
            log = result.stdout + result.stderr
            with lock:
                outputs.append((result.returncode, log.count("Received Store Response (Success)"), log))

    threads = [threading.Thread(target=send_five_times, args=(n,), name=f"sender-{n}") for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(outputs) == 100
    for returncode, successes, log in outputs:
        assert returncode == 0 and successes == 50, log[-3000:]

    jobs = _routed_jobs(db_settings, timeout=60)
    assert_consistent(db_settings, dict(zip(series.sop_instance_uids, series.paths, strict=True)))
    (only_series,) = table_rows(db_settings, Series)
    assert only_series["num_instances"] == 50
    assert len(jobs) == 1, jobs
    assert table_rows(db_settings, InstanceConflict) == []  # 4,950 identical repeats, no conflict


# --- Row 16 -----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_acknowledged_instances_of_an_aborted_association_are_processed(
    db_settings: Settings, scp_process: Callable[..., ScpProcess], tmp_path: Path
) -> None:
    series = write_ct_series(tmp_path / "ct", slices=50, size=64, seed=16)
    scp = scp_process(db_settings, watcher=True, env=_watching(tmp_path)).start()
    worker_env = {key: value for key, value in scp.env.items() if key != "INFERGATE_SCP_PORT"}
    worker = NodeProcess(["worker"], worker_env, tmp_path / "worker.log").start()
    sender = Sender(scp.port)
    try:
        statuses = [sender.store(path) for path in series.paths[:30]]
        sender.abort()  # A-ABORT: the study stops at 30 of 50
        aborted_at = time.monotonic()
        assert statuses == [SUCCESS] * 30

        wait_until(
            lambda: [row["state"] for row in table_rows(db_settings, Job)] == [JobState.done],
            timeout=180,
            what="the job of the 30 instances to finish",
            interval=0.5,
        )
    except BaseException:
        print(worker.log_text()[-5000:])  # noqa: T201
        raise
    finally:
        worker.stop()
    assert time.monotonic() - aborted_at >= QUIET_SECONDS
    acknowledged = dict(zip(series.sop_instance_uids[:30], series.paths[:30], strict=True))
    assert_consistent(db_settings, acknowledged, series.sop_instance_uids[30:])
    (received,) = [row for row in table_rows(db_settings, Series) if row["series_instance_uid"] == series.series_uid]
    assert received["num_instances"] == 30 and received["state"] == SeriesState.routed
    (job,) = table_rows(db_settings, Job)
    assert job["series_id"] == received["id"]
    quiet_for = (job["created_at"] - received["last_received_at"]).total_seconds()
    assert quiet_for >= QUIET_SECONDS, f"routed {quiet_for:.1f} s after the last instance"
