"""Run dicom3tools' ``dciodvfy`` and DCMTK's ``dsrdump`` on written objects (STYLE.md: check every
written object).

``dciodvfy`` checks a Part 10 file against the IOD, module and attribute rules of the Standard
its build knows; it prints ``Error - ...`` for violations and ``Warning - ...`` for things
that are allowed but questionable, and exits 0 either way, so the lines are what count.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["dciodvfy_errors", "dciodvfy_lines", "dciodvfy_warnings", "dsrdump", "require_tool"]


def require_tool(name: str) -> str:
    """Path of the executable ``name``, or skip the calling test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def dciodvfy_lines(path: Path) -> list[str]:
    """Every line ``dciodvfy`` prints about the file at ``path`` (stdout and stderr)."""
    executable = require_tool("dciodvfy")
    completed = subprocess.run(
        [executable, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    return [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines ``dciodvfy`` prints about the file at ``path``; empty when it is valid."""
    return [line for line in dciodvfy_lines(path) if "Error" in line]


def dciodvfy_warnings(path: Path) -> list[str]:
    """The ``Warning`` lines ``dciodvfy`` prints about the file at ``path``."""
    return [line for line in dciodvfy_lines(path) if "Warning" in line]


def dsrdump(path: Path) -> str:
    """DCMTK's rendering of the SR at ``path``; fails the test if dsrdump rejects or warns about it.

    dsrdump checks the content tree against the SR IOD's relationship constraints while it
    reads, which dciodvfy does not do, and prints ``W:``/``E:`` lines on stderr when it objects.
    """
    completed = subprocess.run(
        [require_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr.strip() == "", completed.stderr
    return completed.stdout
