"""Log set-up (infergate/logs.py): JSON lines, the correlation context and the study hash.

``setup_logging`` replaces the root logger's handlers (and with them the PHI watch of this pytest
process), so it is run in a child process; the formatter and the context are tested here directly.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from infergate import logs
from infergate.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
STUDY = "1.2.826.0.1.3680043.8.498.4242"


def _record(message: str = "job %d: running %s", args: tuple[object, ...] = (5, "ct-tissue-seg")) -> logging.LogRecord:
    return logging.LogRecord("workers.pipeline", logging.INFO, __file__, 1, message, args, None)


def test_json_line_fields_and_context() -> None:
    formatter = logs.JsonFormatter("worker")
    with logs.log_context(job_id=5, study_uid=STUDY):
        line = formatter.format(_record())
    entry = json.loads(line)
    assert set(entry) == {"time", "level", "process", "pid", "logger", "message", "job_id", "study"}
    assert entry["level"] == "INFO" and entry["process"] == "worker" and entry["logger"] == "workers.pipeline"
    assert entry["message"] == "job 5: running ct-tissue-seg"
    assert entry["job_id"] == 5
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert entry["pid"] == os.getpid()
    assert len(entry["study"]) == logs.STUDY_HASH_CHARS and entry["study"] not in STUDY
    assert STUDY not in line  # the UID itself never reaches the line

    outside = json.loads(formatter.format(_record()))
    assert outside["job_id"] is None and outside["study"] is None


def test_json_line_carries_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("service.scp", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(logs.JsonFormatter("scp").format(record))
    assert "RuntimeError: boom" in entry["exc"] and entry["level"] == "ERROR"


def test_context_is_undone_after_the_block_and_local_to_a_thread() -> None:
    with logs.log_context(job_id=1):
        logs.bind_study(STUDY)
        inside = logs.current_context()
        seen: list[tuple[int | None, str | None]] = []
        thread = threading.Thread(target=lambda: seen.append(logs.current_context()))
        thread.start()
        thread.join()
    assert inside[0] == 1 and inside[1] is not None
    assert seen == [(None, None)]  # another thread (another association) does not see this one's job or study
    assert logs.current_context() == (None, None)


def test_study_hash_is_keyed() -> None:
    first = logs.study_hash(STUDY, b"salt-one")
    assert first == logs.study_hash(STUDY, b"salt-one")
    assert first != logs.study_hash(STUDY, b"salt-two")
    assert first != logs.study_hash(STUDY + "1", b"salt-one")
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    with pytest.raises(ValueError, match="salt"):
        logs.study_hash(STUDY, b"")


def test_salt_file_is_created_once_and_private(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    salt = logs.load_salt(settings)
    path = settings.data_path / logs.SALT_FILE
    assert len(salt) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert logs.load_salt(make_settings()) == salt  # a second process on the same data folder agrees
    assert [p.name for p in settings.data_path.iterdir()] == [logs.SALT_FILE]  # no temporary file left
    assert logs.load_salt(make_settings(log_salt=SecretStr("configured"))) == b"configured"


_CHILD = textwrap.dedent(
    """
    import logging, sys
    from infergate import logs
    from infergate.config import Settings

    settings = Settings(data_dir=sys.argv[1], log_format=sys.argv[2])
    logs.setup_logging(settings, "scp")
    with logs.log_context(job_id=9, study_uid=sys.argv[3]):
        logging.getLogger("service.scp").warning("stored %d instance(s)", 3)
    logging.getLogger("pynetdicom").info("hidden: pynetdicom is kept at WARNING")
    """
)


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_setup_logging_writes_the_configured_format(tmp_path: Path, log_format: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "var"), log_format, STUDY],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert STUDY not in done.stderr
    if log_format == "text":
        assert " scp WARNING service.scp: stored 3 instance(s)" in lines[0]
        assert not (tmp_path / "var" / logs.SALT_FILE).exists()  # text lines need no salt
        return
    entry = json.loads(lines[0])
    salt = (tmp_path / "var" / logs.SALT_FILE).read_bytes().strip()
    assert entry["process"] == "scp" and entry["message"] == "stored 3 instance(s)"
    assert entry["job_id"] == 9 and entry["study"] == logs.study_hash(STUDY, salt)


def test_use_format_switches_foreign_handlers_to_json_only(make_settings: Callable[..., Settings]) -> None:
    logger = logging.getLogger("tests.logs.foreign")
    handler = logging.StreamHandler()
    text = logging.Formatter("%(message)s")
    handler.setFormatter(text)
    logger.addHandler(handler)
    try:
        logs.use_format(make_settings(), "worker", logger)
        assert handler.formatter is text
        logs.use_format(make_settings(log_format="json"), "worker", logger)
        assert isinstance(handler.formatter, logs.JsonFormatter) and handler.formatter.process == "worker"
    finally:
        logger.removeHandler(handler)


def test_an_unwritable_salt_file_does_not_stop_the_process(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(log_format="json")
    settings.data_path.parent.mkdir(parents=True, exist_ok=True)
    settings.data_path.write_text("a file where the data folder should be")  # the salt cannot be created
    with pytest.raises(OSError):
        logs.load_salt(settings)
    assert logs.configure_context(settings) is False
    assert logs.configure_context(make_settings(log_format="text")) is True  # text lines need no salt
