"""The ``infergate`` command.

Subcommands that run a service start it by module name (``python -m service.scp``, ``python -m
workers``) so that this core package never imports the service or the workers. ``up`` runs every
part on the embedded defaults (SQLite, a filesystem broker) and stops them all on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from types import FrameType

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import Settings, get_settings
from infergate.errors import InfergateError
from infergate.logs import setup_logging
from infergate.manifest import load_all
from infergate.progress import bars, wanted

log = logging.getLogger("infergate")

SERVICES = {
    "scp": ["-m", "service.scp"],
    "api": ["-m", "service.api"],
    "worker": ["-m", "workers"],
    "watcher": ["-m", "service.watcher_main"],
}


def _exec(module_args: list[str], extra: Sequence[str]) -> int:
    """Replace this process with ``python -m ...`` so signals reach the service directly."""
    os.execv(sys.executable, [sys.executable, *module_args, *extra])
    return 1  # not reached


def db_upgrade(settings: Settings) -> None:
    from infergate.store.migrate import upgrade
    from infergate.store.session import make_engine

    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()


def cmd_up(settings: Settings) -> int:
    """Run scp (with the watcher), api and worker as child processes until Ctrl-C or SIGTERM.

    The metrics folder is emptied first: every process writing to it is a child of this one, and
    the files of an earlier run's processes would otherwise be added to the new counts.
    """
    from infergate.metrics import wipe

    setup_logging(settings, "up")
    db_upgrade(settings)
    wipe(settings.metrics_path)
    env = dict(
        os.environ, INFERGATE_DATA_DIR=str(settings.data_path), INFERGATE_METRICS_DIR=str(settings.metrics_path)
    )
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def _stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    for name in ("scp", "api", "worker"):
        children[name] = subprocess.Popen([sys.executable, *SERVICES[name]], env=env)
    log.info(
        "infergate up: DICOM %s@%s:%d, API http://%s:%d, data in %s",
        settings.ae_title,
        settings.scp_host,
        settings.scp_port,
        settings.api_host,
        settings.api_port,
        settings.data_path,
    )
    exit_code = 0
    while not stopping:
        for name, child in children.items():
            if child.poll() is not None:
                log.error("%s exited with code %s; stopping the others", name, child.returncode)
                stopping, exit_code = True, 1
                break
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    for name, child in children.items():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", name)
            child.kill()
            child.wait()
    log.info("stopped")
    return exit_code


def cmd_models_list(settings: Settings) -> int:
    packages = load_all(settings.models_dir)
    rows = [
        {
            "id": p.manifest.id,
            "version": p.manifest.version,
            "task": p.manifest.task,
            "modalities": p.manifest.accepts.modalities,
            "folder": str(p.folder),
        }
        for p in packages.values()
    ]
    sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    return 0


def _factory(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    from infergate.store.session import make_engine, make_session_factory

    engine = make_engine(settings)
    return engine, make_session_factory(engine)


def cmd_cleanup(settings: Settings, *, dry_run: bool, progress: bool | None) -> int:
    """One retention pass now (what the watcher runs every INFERGATE_CLEANUP_INTERVAL_SECONDS).

    The report (database ids and counts, no UIDs) goes to stdout as JSON; the bar to stderr.
    """
    from infergate.audit import Auditor
    from infergate.retention import cutoffs, run_cleanup

    setup_logging(settings, "cleanup")
    inputs_before, results_before = cutoffs(settings)
    if inputs_before is None and results_before is None:
        sys.stderr.write(
            "infergate: retention is off (INFERGATE_RETAIN_INPUTS_DAYS and INFERGATE_RETAIN_RESULTS_DAYS are 0): "
            "nothing is removed\n"
        )
    engine, factory = _factory(settings)
    auditor = None if dry_run else Auditor.from_settings(settings, process="cleanup")
    try:
        report = run_cleanup(
            factory,
            settings.data_path,
            inputs_before=inputs_before,
            results_before=results_before,
            dry_run=dry_run,
            progress=bars(wanted(progress)),
            auditor=auditor,
        )
    finally:
        if auditor is not None:
            auditor.close()
        engine.dispose()
    sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    return 0


def _since(value: str) -> datetime:
    """``--since``: an ISO 8601 date or date-time; UTC unless it names a zone."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or date-time: {value!r}") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def cmd_export_failed(
    settings: Settings, *, since: datetime | None, destination: str | None, progress: bool | None
) -> int:
    """Re-drive every job whose export failed (``POST /api/v1/jobs/{id}/export`` for each); JSON on stdout."""
    from infergate.jobs import JobQueue, make_celery
    from infergate.redrive import redrive_failed

    setup_logging(settings, "export")
    engine, factory = _factory(settings)
    try:
        report = redrive_failed(
            factory,
            settings,
            JobQueue(make_celery(settings)),
            since=since,
            destination=destination,
            progress=bars(wanted(progress)),
        )
    finally:
        engine.dispose()
    sys.stdout.write(json.dumps(asdict(report), indent=2) + "\n")
    return 0


def _progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Draw a progress bar on stderr (default: only when stderr is a terminal).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infergate", description="DICOM AI inference node.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="Run the whole node on the embedded defaults (SQLite, filesystem broker).")
    sub.add_parser("scp", help="Run the DICOM SCP (and the watcher unless --no-watcher).")
    sub.add_parser("api", help="Run the REST API.")
    sub.add_parser("worker", help="Run a Celery worker (extra arguments go to Celery).")
    sub.add_parser("watcher", help="Run the series-completion watcher and reconciler alone.")
    db = sub.add_parser("db", help="Database schema.")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="Apply Alembic migrations up to the newest.")
    models = sub.add_parser("models", help="Model packages.")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="List installed models.")
    models_sub.add_parser("validate", help="Check packages: manifest, codes, SHA-256, ONNX shapes, one inference.")
    models_sub.add_parser("add", help="Validate a package, then install it into the models folder.")
    sub.add_parser("openapi", help="Write the OpenAPI document to openapi/openapi.json.")
    cleanup = sub.add_parser(
        "cleanup", help="Remove inputs and results older than INFERGATE_RETAIN_*_DAYS whose work is done."
    )
    cleanup.add_argument("--dry-run", action="store_true", help="Print what would be removed; remove nothing.")
    _progress_option(cleanup)
    export = sub.add_parser("export", help="Send results to the PACS again.")
    export.add_argument("--failed", action="store_true", required=True, help="Re-drive every job whose export failed.")
    export.add_argument("--since", type=_since, help="Only jobs that finished at or after this ISO 8601 time (UTC).")
    export.add_argument("--destination", help="Only this configured destination (AE@host:port).")
    _progress_option(export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra and args.command not in SERVICES and getattr(args, "models_command", None) not in ("validate", "add"):
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        settings = get_settings()
        if args.command in SERVICES:
            return _exec(SERVICES[args.command], extra)
        if args.command == "openapi":
            return _exec(["-m", "service.api.openapi"], extra)
        if args.command == "up":
            return cmd_up(settings)
        if args.command == "db":
            setup_logging(settings, "db")
            db_upgrade(settings)
            return 0
        if args.command == "models" and args.models_command in ("validate", "add"):
            return _exec(["-m", "workers.model_admin", args.models_command], extra)
        if args.command == "models":
            return cmd_models_list(settings)
        if args.command == "cleanup":
            return cmd_cleanup(settings, dry_run=args.dry_run, progress=args.progress)
        if args.command == "export":
            return cmd_export_failed(settings, since=args.since, destination=args.destination, progress=args.progress)
    except (InfergateError, ValueError) as exc:
        sys.stderr.write(f"infergate: {exc}\n")
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
