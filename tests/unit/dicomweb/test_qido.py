"""QIDO-RS query parsing, matching rules and DICOM JSON, without a database (infergate.dicomweb.qido)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from infergate.dicomweb.qido import (
    MAX_RESULTS,
    Criterion,
    Level,
    parse_query,
    render,
    time_upper_bound,
    wildcard_to_glob,
    wildcard_to_like,
)
from infergate.errors import InvalidInput

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = "1.2.826.0.1.3680043.8.498.2"


def _only(params: list[tuple[str, str]], level: Level = Level.study) -> Criterion:
    query = parse_query(params, level)
    assert len(query.criteria) == 1
    return query.criteria[0]


def _keywords(params: list[tuple[str, str]], level: Level, **uids: str) -> set[str]:
    return {a.keyword for a in parse_query(params, level, **uids).returned}


# Matching keys -------------------------------------------------------------------------------------------------


def test_keyword_and_tag_name_the_same_attribute() -> None:
    by_keyword = _only([("PatientID", "P1")])
    by_tag = _only([("00100020", "P1")])
    assert by_keyword == by_tag
    assert by_keyword.attribute.keyword == "PatientID"
    assert by_keyword.values == ("P1",)
    assert _only([("0020000d", STUDY)]).attribute.keyword == "StudyInstanceUID"  # tags in either case


def test_wildcards_are_kept_for_string_vrs() -> None:
    criterion = _only([("PatientName", "Phan*^C?")])
    assert criterion.values == ("Phan*^C?",)
    assert not criterion.is_range


@pytest.mark.parametrize("value", ["", "*"])
def test_empty_value_or_lone_star_is_universal_matching_but_returns_the_attribute(value: str) -> None:
    query = parse_query([("AccessionNumber", value), ("includefield", "00081030")], Level.series)
    assert query.criteria == ()
    returned = {a.keyword for a in query.returned}
    assert {"AccessionNumber", "StudyDescription"} <= returned


def test_date_range_and_open_ranges() -> None:
    closed = _only([("StudyDate", "20250101-20250131")])
    assert (closed.low, closed.high, closed.is_range) == ("20250101", "20250131", True)
    assert (_only([("StudyDate", "20250101-")]).low, _only([("StudyDate", "20250101-")]).high) == ("20250101", None)
    assert (_only([("StudyDate", "-20250131")]).low, _only([("StudyDate", "-20250131")]).high) == (None, "20250131")
    single = _only([("StudyDate", "20250115")])
    assert single.values == ("20250115",) and not single.is_range


def test_time_bounds_cover_the_precision_given() -> None:
    assert time_upper_bound("11") == "115959.999999"
    assert time_upper_bound("1100") == "110059.999999"
    assert time_upper_bound("110000") == "110000.999999"
    assert time_upper_bound("110000.5") == "110000.599999"
    criterion = _only([("StudyTime", "10-1100")])
    assert (criterion.low, criterion.high) == ("10", "110059.999999")
    single = _only([("StudyTime", "1015")])
    assert (single.low, single.high) == ("1015", "101559.999999")
    assert _only([("StudyTime", "10:15-")]).low == "1015"  # the ACR-NEMA form is tolerated


@pytest.mark.parametrize(
    "key,value",
    [
        ("StudyDate", "2025-01-01"),
        ("StudyDate", "2025*"),
        ("StudyDate", "-"),
        ("StudyDate", "20250101-20250131-20250201"),
        ("StudyTime", "25"),
        ("StudyTime", "101"),
        ("StudyTime", "1060"),
        ("StudyDate", "20251301"),
        ("PatientBirthDate", "1970"),
    ],
)
def test_malformed_dates_and_times_are_refused(key: str, value: str) -> None:
    with pytest.raises(InvalidInput, match=f'"{key}"'):
        parse_query([(key, value)], Level.study)


def test_uid_lists_split_on_comma_and_backslash_and_repeat() -> None:
    other = "1.2.826.0.1.3680043.8.498.3"
    assert _only([("StudyInstanceUID", f"{STUDY},{other}")]).values == (STUDY, other)
    assert _only([("StudyInstanceUID", f"{STUDY}\\{other}")]).values == (STUDY, other)
    assert _only([("StudyInstanceUID", STUDY), ("StudyInstanceUID", other)]).values == (STUDY, other)


@pytest.mark.parametrize("value", ["1.2.3.04", "1.2.*", "abc", "1.2.3,"])
def test_bad_uids_are_refused(value: str) -> None:
    with pytest.raises(InvalidInput, match='"StudyInstanceUID"'):
        parse_query([("StudyInstanceUID", value)], Level.study)


def test_code_strings_match_a_list_of_values() -> None:
    assert _only([("ModalitiesInStudy", "CT,MR")]).values == ("CT", "MR")
    assert _only([("Modality", "SEG")], Level.series).values == ("SEG",)


def test_integers_match_exactly() -> None:
    assert _only([("SeriesNumber", "2")], Level.series).values == ("2",)
    assert _only([("InstanceNumber", "+07")], Level.instance).values == ("7",)
    for bad in ("two", "2*", "1.5", "+-5", "99999999999"):
        with pytest.raises(InvalidInput, match='"SeriesNumber"'):
            parse_query([("SeriesNumber", bad)], Level.series)


def test_path_uids_become_criteria() -> None:
    query = parse_query([], Level.instance, study_instance_uid=STUDY, series_instance_uid=SERIES)
    assert {(c.attribute.keyword, c.values) for c in query.criteria} == {
        ("StudyInstanceUID", (STUDY,)),
        ("SeriesInstanceUID", (SERIES,)),
    }
    with pytest.raises(InvalidInput, match="StudyInstanceUID in the path"):
        parse_query([], Level.series, study_instance_uid="not-a-uid")


# Refusals name the parameter -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,level,message",
    [
        ("Foo", "1", Level.study, '"Foo" is neither'),
        ("00191001", "1", Level.study, '"00191001" is neither'),  # private tag: not in the dictionary
        ("Manufacturer", "x", Level.series, '"Manufacturer" \\(Manufacturer\\) is not an attribute'),
        ("00080070", "x", Level.series, '"00080070" \\(Manufacturer\\)'),
        ("Modality", "CT", Level.study, '"Modality" belongs to the series level'),
        ("SOPInstanceUID", STUDY, Level.series, '"SOPInstanceUID" belongs to the instance level'),
        ("NumberOfStudyRelatedSeries", "2", Level.study, "not a matching key"),
        ("PatientID", "P*", Level.study, None),  # fine
        ("limit", "0", Level.study, '"limit"'),
        ("limit", "-1", Level.study, '"limit"'),
        ("limit", "ten", Level.study, '"limit"'),
        ("offset", "-1", Level.study, '"offset"'),
        ("offset", str(2**63), Level.study, '"offset"'),
        ("limit", "9" * 5000, Level.study, '"limit"'),
        ("fuzzymatching", "yes", Level.study, '"fuzzymatching"'),
        ("includefield", "NoSuchKeyword", Level.study, '"includefield" names "NoSuchKeyword"'),
    ],
)
def test_unknown_or_unsupported_parameters_are_refused(key: str, value: str, level: Level, message: str | None) -> None:
    if message is None:
        parse_query([(key, value)], level)
        return
    with pytest.raises(InvalidInput, match=message):
        parse_query([(key, value)], level)


def test_a_single_valued_key_may_not_repeat() -> None:
    with pytest.raises(InvalidInput, match='"PatientID" is given more than once'):
        parse_query([("PatientID", "A"), ("PatientID", "B")], Level.study)


def test_paging_and_fuzzymatching() -> None:
    query = parse_query([("limit", "5"), ("offset", "10"), ("fuzzymatching", "TRUE")], Level.study)
    assert (query.limit, query.offset, query.fuzzymatching) == (5, 10, True)
    default = parse_query([], Level.study)
    assert (default.limit, default.offset, default.fuzzymatching) == (MAX_RESULTS, 0, False)
    assert parse_query([("limit", str(MAX_RESULTS * 10))], Level.study).limit == MAX_RESULTS


# What is returned ----------------------------------------------------------------------------------------------


def test_default_study_attributes_are_the_required_ones() -> None:
    assert _keywords([], Level.study) == {
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "StudyDescription",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    }


def test_returned_attributes_depend_on_the_resource() -> None:
    series_everywhere = _keywords([], Level.series)
    series_in_study = _keywords([], Level.series, study_instance_uid=STUDY)
    assert {"PatientID", "Modality", "SeriesInstanceUID"} <= series_everywhere
    assert "PatientID" not in series_in_study
    assert {"StudyInstanceUID", "Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"} <= series_in_study
    in_series = _keywords([], Level.instance, study_instance_uid=STUDY, series_instance_uid=SERIES)
    assert in_series == {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    }


def test_includefield_by_keyword_tag_list_and_all() -> None:
    assert "SeriesDate" in _keywords([("includefield", "SeriesDate")], Level.series)
    assert {"SeriesDate", "SeriesTime"} <= _keywords([("includefield", "00080021,00080031")], Level.series)
    # a known attribute the node holds no value of is accepted and simply not returned
    assert "Manufacturer" not in _keywords([("includefield", "Manufacturer")], Level.series)
    everything = _keywords([("includefield", "all")], Level.instance)
    assert {"BodyPartExamined", "SeriesTime", "PatientSex", "NumberOfFrames"} <= everything
    # attributes below the searched level are not returned
    assert "Rows" not in _keywords([("includefield", "Rows")], Level.series)


# Patterns and rendering ----------------------------------------------------------------------------------------


def test_wildcards_become_escaped_sql_patterns() -> None:
    assert wildcard_to_like("Ab*c?") == "Ab%c_"
    assert wildcard_to_like("100%_a\\b*") == "100\\%\\_a\\\\b%"
    assert wildcard_to_glob("A[1]*?") == "A[[]1]*?"


def test_render_writes_dicom_json() -> None:
    query = parse_query([("includefield", "SeriesTime")], Level.series)
    study = SimpleNamespace(
        **{
            column: None
            for column in (
                "study_date",
                "study_time",
                "accession_number",
                "referring_physician_name",
                "study_description",
                "patient_birth_date",
                "patient_sex",
                "study_id_value",
            )
        },
        patient_name="Doe^Jane=山田^花子",
        patient_id="P1",
        study_instance_uid=STUDY,
    )
    series = SimpleNamespace(
        modality="CT",
        series_description="CHEST",
        series_number=3,
        series_instance_uid=SERIES,
        num_instances=12,
        performed_procedure_step_start_date=None,
        series_time="101500",
    )
    out = render(
        query,
        {Level.study: study, Level.series: series},
        {"ModalitiesInStudy": ["CT", "SEG"], "NumberOfStudyRelatedSeries": 2},
        "http://node/dicomweb/studies/1/series/2",
    )
    assert list(out) == sorted(out)
    assert out["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane", "Ideographic": "山田^花子"}]}
    assert out["00100020"] == {"vr": "LO", "Value": ["P1"]}
    assert out["00080020"] == {"vr": "DA"}  # unknown: present, without a Value
    assert out["00200011"] == {"vr": "IS", "Value": [3]}
    assert out["00201209"] == {"vr": "IS", "Value": [12]}
    assert out["00080061"] == {"vr": "CS", "Value": ["CT", "SEG"]}
    assert out["00201206"] == {"vr": "IS", "Value": [2]}
    assert out["00201208"] == {"vr": "IS"}
    assert out["00080031"] == {"vr": "TM", "Value": ["101500"]}
    assert out["00081190"] == {"vr": "UR", "Value": ["http://node/dicomweb/studies/1/series/2"]}
