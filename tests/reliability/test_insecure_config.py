"""Row 25 (REST part): an API that would answer the network without authentication does not start.

The DICOM part (TLS without client certificates) is in test_tls.py. Here the real ``infergate api``
and ``infergate up`` commands are started as an operator would, and must exit at once with a message
that names what to set, instead of serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.node import node_env
from tests.helpers.peers import free_port

pytestmark = pytest.mark.timeout(120)


def _run(command: str, tmp_path: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
    env.update(node_env(data_dir=tmp_path / "var", api_port=free_port(), scp_port=free_port(), **settings))
    return subprocess.run(
        [sys.executable, "-m", "infergate.cli", command], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", ["api", "up"])
@pytest.mark.parametrize(
    "settings",
    [
        {"api_host": "0.0.0.0"},
        {"api_host": "10.1.2.3"},
        {"api_host": "0.0.0.0", "auth_required": "false"},
        {"api_host": "127.0.0.1", "auth_required": "true"},
    ],
    ids=["any-address", "lan-address", "auth-forced-off", "auth-required-but-none"],
)
def test_no_start_without_authentication_beyond_loopback(
    command: str, settings: dict[str, str], tmp_path: Path
) -> None:
    result = _run(command, tmp_path, **settings)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "INFERGATE_API_KEYS" in output or "auth_required" in output, output[-2000:]
    assert "Traceback" not in output, "a refusal is a message, not a crash"
    assert not (tmp_path / "var" / "instances").exists(), "nothing started receiving"
