"""The README documents what the code does: every setting, and exactly two set-up commands."""

from __future__ import annotations

import re
from pathlib import Path

from infergate.config import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_settings_table() -> None:
    documented = set(re.findall(r"^\| `(INFERGATE_[A-Z_]+)` \|", README, flags=re.MULTILINE))
    expected = {f"INFERGATE_{name.upper()}" for name in Settings.model_fields}
    assert documented == expected, f"missing: {expected - documented}, unknown: {documented - expected}"


def test_two_set_up_commands() -> None:
    set_up = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", set_up, flags=re.DOTALL)
    assert [b.strip() for b in blocks] == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/infergate up",
        "bash scripts/test.sh",
    ]
    assert (Path(__file__).resolve().parent.parent / "scripts" / "test.sh").is_file()
