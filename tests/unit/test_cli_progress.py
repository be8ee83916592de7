"""The long command-line operations: ``infergate cleanup``, ``infergate export --failed``, ``models validate``
and the benchmarks. Each runs as the operator runs it (a process of its own); a progress bar appears
on stderr only when asked for (stderr is no terminal here), and stdout stays what scripts parse.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings
from infergate.redrive import failed_export_jobs, redrive_failed
from infergate.store.tables import Export, ExportState, Job, JobState, ResultObject, SeriesState, utcnow
from tests.helpers.held import PACS, add_job, receive_series
from tests.helpers.queues import RecordingQueue

pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
BAR = re.compile(r"\d+%\|")


def _run(args: list[str], settings: Settings | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_") or k.startswith("INFERGATE_TEST_")}
    base["PYTHONPATH"] = str(REPO_ROOT)
    if settings is not None:
        base["INFERGATE_DATA_DIR"] = str(settings.data_path)
        base["INFERGATE_DATABASE_URL"] = settings.sqlalchemy_url
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_cleanup_prints_json_on_stdout_and_a_bar_on_stderr_only_when_asked(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    root = db_settings.data_path
    old = receive_series(session_factory, root, tmp_path, state=SeriesState.unmatched)
    kept = receive_series(session_factory, root, tmp_path, days_ago=3)

    dry = _run(
        ["-m", "infergate.cli", "cleanup", "--dry-run", "--progress"], db_settings, INFERGATE_RETAIN_INPUTS_DAYS="30"
    )
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)  # nothing but the report on stdout
    assert report["dry_run"] is True and report["series"] == [old.id] and report["instances"] == 3
    assert all(path.is_file() for path in old.paths)  # a dry run removes nothing
    assert not BAR.search(dry.stderr)  # a dry run only reads: there is nothing to wait for

    real = _run(["-m", "infergate.cli", "cleanup", "--progress"], db_settings, INFERGATE_RETAIN_INPUTS_DAYS="30")
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert report["dry_run"] is False and report["series"] == [old.id] and report["files"] == 3
    assert re.search(r"series: 100%\|", real.stderr), real.stderr
    assert not any(path.exists() for path in old.paths) and all(path.is_file() for path in kept.paths)
    for uid in (old.study_uid, old.series_uid):  # counts and ids only, on every stream
        assert uid not in real.stdout and uid not in real.stderr
    audit = [json.loads(line) for line in (root / "audit.log").read_text().splitlines()]
    assert [record["EventIdentification"]["EventID"]["csd-code"] for record in audit] == ["110105"]

    quiet = _run(["-m", "infergate.cli", "cleanup"], db_settings, INFERGATE_RETAIN_INPUTS_DAYS="30")
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["series"] == []
    assert not BAR.search(quiet.stderr)  # stderr is not a terminal: no bar unless --progress


def test_cleanup_with_retention_off_says_so_and_removes_nothing(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    series = receive_series(session_factory, db_settings.data_path, tmp_path, days_ago=4000)
    done = _run(["-m", "infergate.cli", "cleanup"], db_settings)
    assert done.returncode == 0 and "retention is off" in done.stderr
    assert json.loads(done.stdout)["series"] == [] and all(path.is_file() for path in series.paths)


def _failed_exports(factory: sessionmaker[Session], root: Path, work: Path) -> dict[str, int]:
    """Jobs: export failed (twice, one long ago), failed before any export, and done."""
    jobs = {}
    for name, state, export, days in (
        ("export_failed", JobState.failed, ExportState.failed, 1.0),
        ("export_failed_long_ago", JobState.failed, ExportState.failed, 40.0),
        ("model_failed", JobState.failed, None, 1.0),
        ("done", JobState.done, ExportState.done, 1.0),
    ):
        series = receive_series(factory, root, work, days_ago=days)
        jobs[name] = add_job(factory, root, series, state=state, export=export, finished_days_ago=days).id
    return jobs


def test_redrive_failed_sends_every_job_whose_export_failed(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    jobs = _failed_exports(session_factory, db_settings.data_path, tmp_path)
    settings = Settings(**{**db_settings.model_dump(), "pacs": PACS})
    with session_factory() as session:
        assert failed_export_jobs(session) == [jobs["export_failed"], jobs["export_failed_long_ago"]]
        assert failed_export_jobs(session, since=utcnow() - timedelta(days=2)) == [jobs["export_failed"]]
    queue = RecordingQueue()

    report = redrive_failed(session_factory, settings, queue)

    assert report.jobs == [jobs["export_failed"], jobs["export_failed_long_ago"]] and report.exports == 2
    assert queue.exports == report.jobs and report.skipped == {} and report.unsent == []
    with session_factory() as session:
        for name in ("export_failed", "export_failed_long_ago"):
            job = session.get(Job, jobs[name])
            assert job is not None and job.state == JobState.exporting
            states = session.scalars(
                select(Export.state).join(ResultObject).where(ResultObject.job_id == jobs[name])
            ).all()
            assert states == [ExportState.pending]
        for name, state in (("model_failed", JobState.failed), ("done", JobState.done)):
            job = session.get(Job, jobs[name])
            assert job is not None and job.state == state
    again = redrive_failed(session_factory, settings, queue)
    assert again.jobs == []  # re-driven jobs are exporting now: nothing is sent twice


def test_export_failed_command_redrives_since_a_time_with_a_bar(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    jobs = _failed_exports(session_factory, db_settings.data_path, tmp_path)
    since = (utcnow() - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%S")

    done = _run(
        ["-m", "infergate.cli", "export", "--failed", "--since", since, "--progress"], db_settings, INFERGATE_PACS=PACS
    )

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["jobs"] == [jobs["export_failed"]] and report["exports"] == 1 and report["unsent"] == []
    assert re.search(r"jobs: 100%\|", done.stderr), done.stderr
    with session_factory() as session:
        assert session.scalar(select(Job.state).where(Job.id == jobs["export_failed"])) == JobState.exporting
        assert session.scalar(select(Job.state).where(Job.id == jobs["export_failed_long_ago"])) == JobState.failed
    queued = list((db_settings.data_path / "broker" / "queue").iterdir())
    assert len(queued) == 1  # the export message, on the embedded broker


def test_export_failed_without_a_destination_refuses_before_touching_a_job(
    db_settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    jobs = _failed_exports(session_factory, db_settings.data_path, tmp_path)
    done = _run(["-m", "infergate.cli", "export", "--failed"], db_settings)
    assert done.returncode == 2 and "INFERGATE_PACS" in done.stderr and done.stdout == ""
    with session_factory() as session:
        assert session.scalar(select(Job.state).where(Job.id == jobs["export_failed"])) == JobState.failed


def test_models_validate_draws_a_bar_and_keeps_its_report(tmp_path: Path) -> None:
    package = str(REPO_ROOT / "models" / "ct-bone-classifier")
    plain = _run(["-m", "infergate.cli", "models", "validate", package])
    barred = _run(["-m", "infergate.cli", "models", "validate", "--progress", package])
    assert plain.returncode == barred.returncode == 0, barred.stderr
    assert barred.stdout == plain.stdout and "valid" in plain.stdout
    assert re.search(r"validate: 100%\|.*\| 4/4", barred.stderr), barred.stderr
    assert not BAR.search(plain.stderr)


def test_benchmark_tables_stay_on_stdout_and_the_bar_goes_to_stderr(tmp_path: Path) -> None:
    args = ["benchmarks/segsr.py", "--quick", "--results-dir", str(tmp_path)]
    plain = _run([*args, "--no-progress"])
    barred = _run([*args, "--progress"])
    assert plain.returncode == barred.returncode == 0, barred.stderr

    def shape(text: str) -> list[str]:  # the figures differ from run to run; the table does not
        return [re.sub(r"\d+(\.\d+)?", "N", line) for line in text.splitlines()]

    assert shape(barred.stdout) == shape(plain.stdout) and "writer" in plain.stdout
    assert not BAR.search(barred.stdout)
    assert re.search(r"repetitions: 100%\|", barred.stderr) and not BAR.search(plain.stderr)
