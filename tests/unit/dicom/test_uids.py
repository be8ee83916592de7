"""UID grammar checks and deterministic UIDs (infergate.dicom.uids)."""

from __future__ import annotations

import uuid

import pytest

from infergate.dicom.uids import UID_PATTERN, derived_uid, is_valid_uid, require_uid


@pytest.mark.parametrize(
    "text",
    [
        "1.2.840.10008.5.1.4.1.1.2",
        "0",
        "1.0.2",
        "2.25.329800735698586629295641978511506172918",
        "1." + "2" * 62,  # 64 characters
    ],
)
def test_valid_uids(text: str) -> None:
    assert is_valid_uid(text)
    assert UID_PATTERN.fullmatch(text)
    assert require_uid(text, "uid") == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1.02",  # leading zero
        "01.2",
        "1..2",
        "1.2.",
        ".1.2",
        "1.2\n",  # '$' would accept this; the pattern must not
        "1.2\x00",
        "1.2 ",
        "1.2a",
        "1.-2",
        "1/2",
        "../../etc/passwd",
        "\u0661.\u0662",  # Arabic-Indic digits match \d but are not DICOM digits
        "1." + "2" * 63,  # 65 characters
    ],
)
def test_invalid_uids(text: str) -> None:
    assert not is_valid_uid(text)
    with pytest.raises(ValueError, match='"sop_instance_uid"'):
        require_uid(text, "sop_instance_uid")


@pytest.mark.parametrize("value", [None, 1.2, 12, b"1.2", ["1.2"]])
def test_non_strings_are_not_uids(value: object) -> None:
    assert not is_valid_uid(value)
    with pytest.raises(TypeError, match='"uid"'):
        require_uid(value, "uid")


def test_pattern_match_is_anchored() -> None:
    assert UID_PATTERN.match("1.2\n") is None
    assert UID_PATTERN.match("1.2x") is None


def test_derived_uid_is_deterministic_and_valid() -> None:
    first = derived_uid("job-42", "seg")
    assert first == derived_uid("job-42", "seg")
    assert first.startswith("2.25.")
    assert is_valid_uid(first)
    assert len(first) <= 44


def test_derived_uid_is_a_version_8_uuid() -> None:
    value = uuid.UUID(int=int(derived_uid("job-42", "sr").removeprefix("2.25.")))
    assert value.version == 8
    assert value.variant == uuid.RFC_4122


def test_derived_uid_separates_parts() -> None:
    uids = {
        derived_uid("ab", "c"),
        derived_uid("a", "bc"),
        derived_uid("abc"),
        derived_uid("c", "ab"),
        derived_uid("ab", "c", ""),
    }
    assert len(uids) == 5


def test_derived_uids_do_not_collide_in_bulk() -> None:
    uids = {derived_uid("job", str(i)) for i in range(10_000)}
    assert len(uids) == 10_000
    assert all(is_valid_uid(u) for u in uids)


def test_derived_uid_needs_string_parts() -> None:
    with pytest.raises(TypeError, match='"parts"'):
        derived_uid()
    with pytest.raises(TypeError, match='"parts"'):
        derived_uid("job", 3)  # type: ignore[arg-type]
