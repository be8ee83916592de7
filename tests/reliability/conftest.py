"""Fixtures for the reliability suite ("never lose a study"): real processes, faults injected on loopback."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import _config

from infergate.config import Settings
from tests.reliability.scp_harness import ScpProcess


@pytest.fixture
def verbatim_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom SCUs of this test send each file's dataset bytes as they are, not re-encoded."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def scp_process(tmp_path: Path) -> Iterator[Callable[..., ScpProcess]]:
    """Make SCP processes (``ScpProcess(tmp_path, settings, **kwargs)``); killed after the test.

    Their logs are printed at teardown, which pytest shows when the test failed.
    """
    made: list[ScpProcess] = []

    def make(settings: Settings, **kwargs: Any) -> ScpProcess:
        scp = ScpProcess(tmp_path, settings, **kwargs)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.kill()
        sys.stdout.write(scp.log_text() + "\n")
