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
from types import FrameType

from infergate.config import Settings, get_settings
from infergate.errors import InfergateError
from infergate.logs import setup_logging
from infergate.manifest import load_all

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
    except (InfergateError, ValueError) as exc:
        sys.stderr.write(f"infergate: {exc}\n")
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
