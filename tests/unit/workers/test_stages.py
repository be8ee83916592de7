"""Stage timings: the timer itself, inference's split, and what a job run through the pipeline records."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.ingest import InstanceHeader, ingest_instance
from infergate.manifest import ModelPackage, RegionOfInterest
from infergate.store import queries
from infergate.store.tables import Job, JobState, Series
from tests.data.make_series import write_ct_series
from tests.helpers.storage_scp import StorageSCP
from tests.unit.workers._fakes import (
    MeanRunner,
    PointwiseRunner,
    classification_package,
    segmentation_package,
    volume_of,
)
from workers.export import export_job
from workers.inference import infer
from workers.pipeline import JobOutcome, WorkerContext, run_job
from workers.runtime import OnnxRunner, RegionRunner
from workers.stages import STAGES, StageTimer, TimedRegionRunner, TimedRunner, merged, timed

_WORK = {"queue_wait", "load", "preprocess", "onnx", "postprocess", "sr_build", "write", "record"}


def test_nested_stages_count_once_and_repeats_add_up() -> None:
    timer = StageTimer()
    with timer.stage("outer"):
        time.sleep(0.02)
        with timer.stage("inner"):
            time.sleep(0.03)
    with timer.stage("inner"):
        time.sleep(0.01)
    assert 0.018 <= timer.seconds["outer"] < 0.03  # the inner 0.03 s is not counted twice
    assert timer.seconds["inner"] >= 0.04


def test_as_dict_is_in_pipeline_order_and_merged_adds() -> None:
    timer = StageTimer()
    for name in ("zzz", "record", "load", "onnx"):
        timer.add(name, 0.5)
    assert list(timer.as_dict()) == ["load", "onnx", "record", "zzz"]
    assert merged({"load": 1.0, "export": 0.25}, {"export": 0.5, "record": 2.0}) == {
        "load": 1.0,
        "export": 0.75,
        "record": 2.0,
    }
    assert merged(None, {"export": 1.0}) == {"export": 1.0}
    with pytest.raises(ValueError, match="seconds"):
        timer.add("load", -1.0)


class _Region(MeanRunner):
    def run_file(self, package: ModelPackage, file: RegionOfInterest, batch: np.ndarray) -> np.ndarray:
        return batch


def test_timed_runner_keeps_what_the_runner_can_do() -> None:
    timer = StageTimer()
    plain = timed(MeanRunner(), timer)
    region = timed(_Region(), timer)
    assert type(plain) is TimedRunner and not isinstance(plain, RegionRunner)
    assert isinstance(region, TimedRegionRunner) and isinstance(region, RegionRunner)


def test_infer_splits_its_time_without_changing_the_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    volume = volume_of(rng.random((6, 10, 12)))
    package = segmentation_package(tmp_path, patch_size=[4, 6, 6], overlap=0.5)
    plain = infer(volume, package, PointwiseRunner())
    timer = StageTimer()
    timed_output = infer(volume, package, PointwiseRunner(), timer)
    assert plain.label_map is not None and timed_output.label_map is not None
    np.testing.assert_array_equal(timed_output.label_map, plain.label_map)
    assert set(timer.seconds) == {"preprocess", "onnx", "postprocess"}
    assert all(value >= 0 for value in timer.seconds.values())

    classifier = classification_package(tmp_path, target_shape=[2, 4, 4])
    timer = StageTimer()
    probabilities = infer(volume, classifier, MeanRunner(), timer).probabilities
    assert probabilities is not None
    np.testing.assert_array_equal(probabilities, infer(volume, classifier, MeanRunner()).probabilities)
    assert set(timer.seconds) == {"preprocess", "onnx", "postprocess"}


def _series(settings: Settings, factory: sessionmaker[Session], folder: Path) -> int:
    info = write_ct_series(folder, slices=10, size=64)
    for path in info.paths:
        ds = dcmread(path)
        header = InstanceHeader.from_dataset(
            ds,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        )
        ingest_instance(factory, settings.data_path, header, path.read_bytes(), calling_ae="TEST", called_ae="NODE")
    with factory() as session:
        series_id = session.scalar(select(Series.id))
    assert series_id is not None
    return series_id


@pytest.fixture
def pacs() -> Iterator[StorageSCP]:
    scp = StorageSCP().start()
    yield scp
    scp.stop()


def test_run_job_records_every_stage_and_export_adds_its_own(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path, pacs: StorageSCP
) -> None:
    settings = Settings(**{**db_settings.model_dump(), "pacs": pacs.destination})
    series_id = _series(settings, session_factory, tmp_path / "ct")
    ctx = WorkerContext(settings=settings, factory=session_factory, runner=OnnxRunner(["CPUExecutionProvider"]))
    ids = {}
    for model_id in ("ct-tissue-seg", "ct-bone-classifier"):
        with session_factory() as session, session.begin():
            ids[model_id] = queries.create_job(session, series_id, model_id, "1")

    for model_id, job_id in ids.items():
        assert job_id is not None
        assert run_job(ctx, job_id) == (JobOutcome.exporting, None)
        with session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.timings is not None
            recorded = dict(job.timings)
        expected = _WORK | ({"seg_build", "preview"} if model_id == "ct-tissue-seg" else {"preview"})
        assert set(recorded) == expected, model_id
        assert list(recorded) == [name for name in STAGES if name in recorded]
        assert all(isinstance(value, float) and value >= 0 for value in recorded.values())
        assert recorded["onnx"] > 0 and recorded["load"] > 0

        assert export_job(ctx, job_id) is None
        with session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state == JobState.done and job.timings is not None
            assert job.timings["export"] > 0
            assert {k: v for k, v in job.timings.items() if k != "export"} == recorded


def test_a_rerun_replaces_the_timings(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series_id = _series(db_settings, session_factory, tmp_path / "ct")
    ctx = WorkerContext(settings=db_settings, factory=session_factory, runner=OnnxRunner(["CPUExecutionProvider"]))
    with session_factory() as session, session.begin():
        job_id = queries.create_job(session, series_id, "ct-bone-classifier", "1")
    assert job_id is not None
    with session_factory() as session, session.begin():  # as if an earlier attempt had recorded these
        session.execute(update(Job).where(Job.id == job_id).values(timings={"load": 1000.0, "export": 5.0}))
    assert run_job(ctx, job_id)[0] is JobOutcome.done
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.timings is not None
        assert "export" not in job.timings and job.timings["load"] < 1000.0
