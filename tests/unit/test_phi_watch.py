"""The run-wide watch for patient data in the node's logs (tests/helpers/phi_watch.py) does catch a leak."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.phi_watch import CANARY, WATCH


@pytest.fixture
def isolated_hits() -> Iterator[list[object]]:
    """Leaks made on purpose here are taken back out, so that they don't fail the run."""
    before = list(WATCH.hits)
    yield WATCH.hits
    WATCH.hits[:] = before


def test_a_node_log_record_with_a_patient_name_is_caught(isolated_hits: list[object]) -> None:
    count = len(isolated_hits)
    logging.getLogger("infergate.leaky").info("stored instance of %s", "Phantom^CT")
    assert len(isolated_hits) == count + 1
    logging.getLogger("tests.helper").info("Phantom^CT")  # test code is not the node
    logging.getLogger("infergate.fine").info("stored 1.2.3.4 for job 7")
    assert len(isolated_hits) == count + 1


def test_node_log_files_and_audit_logs_are_read(tmp_path: Path, isolated_hits: list[object]) -> None:
    watched = tmp_path / "scp.log"
    watched.write_text("INFO stored\nWARNING refused for patient PHANTOM-CT-11\n")
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "audit.log").write_text('{"EventID": "110104", "AccessionNumber": "ACC0000011"}\n')
    WATCH.watch_file(watched)
    try:
        count = len(isolated_hits)
        WATCH.scan_files([tmp_path])
        assert len(isolated_hits) == count + 2
    finally:
        WATCH.files.discard(watched)
        (tmp_path / "var" / "audit.log").unlink()  # the end-of-run scan would find it too


@pytest.mark.parametrize("value", ["Phantom^MR", "PHANTOM-CT-0", "19700101", "ACC0000042", "Doe^Jane", "PAT-B"])
def test_the_canaries_of_the_test_data_are_known(value: str) -> None:
    assert CANARY.search(value)


@pytest.mark.parametrize("value", ["PHANTOM CT", "1.2.826.0.1.3680043.8.498.1", "job 19700", "ACC12"])
def test_ordinary_log_text_is_no_canary(value: str) -> None:
    assert not CANARY.search(value)
