"""QIDO-RS (PS3.18 10.6): parsing a search, the matching rules, and the DICOM JSON answer.

Everything here is a plain function over plain values, so the rules are tested without a
database or HTTP: :func:`parse_query` turns query parameters into :class:`Criterion` objects
(which :mod:`infergate.store.queries` translates into SQL), and :func:`render` turns the matched
rows into DICOM JSON objects (PS3.18 F.2). The node answers for what it holds, received series
and its own SEG/SR results alike.

Matching follows PS3.4 C.2.2.2: single value matching (case-insensitive for PN, which
C.2.2.2.1 allows; case-sensitive otherwise), wildcard matching with ``*`` and ``?`` for string
VRs, range matching for DA and TM, and list matching for UI (``,`` or ``\\`` separated, as
PS3.18 8.3.4.1 allows) and for CS (so ``ModalitiesInStudy=CT,MR`` finds either). An empty value
or a lone ``*`` is universal matching: no condition, but the attribute is returned. Anything the
node cannot match exactly is refused with a message naming the parameter rather than ignored,
because a silently ignored filter returns wrong results.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_has_tag, keyword_for_tag, tag_for_keyword

from infergate.dicom.uids import is_valid_uid
from infergate.errors import InvalidInput

__all__ = [
    "ATTRIBUTES",
    "INTEGER_VRS",
    "MAX_OFFSET",
    "MAX_RESULTS",
    "MEDIA_TYPE",
    "RETRIEVE_URL_TAG",
    "Attribute",
    "Criterion",
    "Level",
    "Query",
    "has_wildcard",
    "parse_query",
    "render",
    "time_upper_bound",
    "wildcard_to_glob",
    "wildcard_to_like",
]

MAX_RESULTS = 1000
"""Most matches returned by one search; more are announced with a Warning header (PS3.18 8.3.4.4)."""

MAX_OFFSET = 2**31 - 1
"""Largest ``offset`` (and ``limit``) accepted: SQLite and PostgreSQL integers hold it."""

MEDIA_TYPE = "application/dicom+json"


class Level(enum.IntEnum):
    """Query/retrieve levels, ordered from the top of the hierarchy down."""

    study = 1
    series = 2
    instance = 3


@dataclass(frozen=True)
class Attribute:
    """An attribute the node matches or returns.

    ``column`` names the attribute of the level's row (``Study``, ``Series`` or ``Instance``)
    that holds the value; None marks a value computed for the answer (counts, RetrieveURL, the
    modalities of a study), which only ``ModalitiesInStudy`` also matches on.
    """

    keyword: str
    tag: str
    vr: str
    level: Level
    column: str | None

    @property
    def matchable(self) -> bool:
        return self.column is not None or self.keyword == "ModalitiesInStudy"


def _attr(keyword: str, vr: str, level: Level, column: str | None) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, f"{tag:08X}", vr, level, column)


_S, _SE, _I = Level.study, Level.series, Level.instance

ATTRIBUTES: tuple[Attribute, ...] = (
    # Study level: PS3.18 Table 10.6.1-5 (matching) and 10.6.3-3 (returned)
    _attr("StudyDate", "DA", _S, "study_date"),
    _attr("StudyTime", "TM", _S, "study_time"),
    _attr("AccessionNumber", "SH", _S, "accession_number"),
    _attr("ModalitiesInStudy", "CS", _S, None),
    _attr("ReferringPhysicianName", "PN", _S, "referring_physician_name"),
    _attr("StudyDescription", "LO", _S, "study_description"),
    _attr("PatientName", "PN", _S, "patient_name"),
    _attr("PatientID", "LO", _S, "patient_id"),
    _attr("PatientBirthDate", "DA", _S, "patient_birth_date"),
    _attr("PatientSex", "CS", _S, "patient_sex"),
    _attr("StudyInstanceUID", "UI", _S, "study_instance_uid"),
    _attr("StudyID", "SH", _S, "study_id_value"),
    _attr("NumberOfStudyRelatedSeries", "IS", _S, None),
    _attr("NumberOfStudyRelatedInstances", "IS", _S, None),
    # Series level: Tables 10.6.1-6 and 10.6.3-4
    _attr("Modality", "CS", _SE, "modality"),
    _attr("SeriesDescription", "LO", _SE, "series_description"),
    _attr("SeriesNumber", "IS", _SE, "series_number"),
    _attr("SeriesInstanceUID", "UI", _SE, "series_instance_uid"),
    _attr("NumberOfSeriesRelatedInstances", "IS", _SE, "num_instances"),
    _attr("PerformedProcedureStepStartDate", "DA", _SE, "performed_procedure_step_start_date"),
    _attr("SeriesDate", "DA", _SE, "series_date"),
    _attr("SeriesTime", "TM", _SE, "series_time"),
    _attr("BodyPartExamined", "CS", _SE, "body_part_examined"),
    # Instance level: Tables 10.6.1-7 and 10.6.3-5
    _attr("SOPClassUID", "UI", _I, "sop_class_uid"),
    _attr("SOPInstanceUID", "UI", _I, "sop_instance_uid"),
    _attr("InstanceNumber", "IS", _I, "instance_number"),
    _attr("Rows", "US", _I, "rows"),
    _attr("Columns", "US", _I, "columns"),
    _attr("BitsAllocated", "US", _I, "bits_allocated"),
    _attr("NumberOfFrames", "IS", _I, "number_of_frames"),
)
_BY_KEYWORD = {a.keyword: a for a in ATTRIBUTES}
_BY_TAG = {a.tag: a for a in ATTRIBUTES}

RETRIEVE_URL_TAG = "00081190"

_DEFAULT_RETURN: dict[Level, tuple[str, ...]] = {
    # The required return attributes of PS3.18 Tables 10.6.3-3/4/5, plus StudyDescription, which
    # every study browser shows, and the UIDs of the levels above, which a client needs to retrieve.
    Level.study: (
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
    ),
    Level.series: (
        "Modality",
        "SeriesDescription",
        "SeriesNumber",
        "SeriesInstanceUID",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
    ),
    Level.instance: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
    ),
}
_ALWAYS: dict[Level, tuple[str, ...]] = {
    Level.study: ("StudyInstanceUID",),
    Level.series: ("StudyInstanceUID", "SeriesInstanceUID"),
    Level.instance: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}

_STRING_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
INTEGER_VRS = frozenset({"IS", "US", "UL", "SS", "SL"})
_LIST_VRS = frozenset({"UI", "CS"})
_LIST_SPLIT = re.compile(r"[,\\]")
_DA = re.compile(r"\A[0-9]{4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])\Z")
_TM = re.compile(r"\A(?:[01][0-9]|2[0-3])(?:[0-5][0-9](?:(?:[0-5][0-9]|60)(?:\.[0-9]{1,6})?)?)?\Z")
_UINT = re.compile(r"\A[0-9]{1,10}\Z")
_INTEGER = re.compile(r"\A[+-]?[0-9]{1,10}\Z")
_TAG = re.compile(r"\A[0-9A-Fa-f]{8}\Z")
_PLURAL = {Level.study: "studies", Level.series: "series", Level.instance: "instances"}


@dataclass(frozen=True)
class Criterion:
    """One matching key: the row matches ``values`` (any of them) or lies in ``low..high``.

    ``values`` hold exact values, or for string VRs patterns with ``*``/``?``; for range matching
    ``values`` is empty and ``low``/``high`` are inclusive text bounds (None: open), already
    widened for TM so that ``1100`` as an upper bound covers 11:00:59.
    """

    attribute: Attribute
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None

    @property
    def is_range(self) -> bool:
        return not self.values


@dataclass(frozen=True)
class Query:
    """A parsed search: what to match, what to return and which page."""

    level: Level
    criteria: tuple[Criterion, ...]
    returned: tuple[Attribute, ...]
    limit: int
    offset: int
    fuzzymatching: bool


def has_wildcard(value: str) -> bool:
    """Whether a string key asks for wildcard matching (PS3.4 C.2.2.2.4); QIDO has no escape for them."""
    return "*" in value or "?" in value


def wildcard_to_like(pattern: str) -> str:
    """A QIDO wildcard pattern as a SQL LIKE pattern with ``\\`` as the escape character."""
    out = []
    for char in pattern:
        if char in "\\%_":
            out.append("\\" + char)
        elif char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def wildcard_to_glob(pattern: str) -> str:
    """A QIDO wildcard pattern as an SQLite GLOB pattern (case-sensitive, unlike SQLite's LIKE)."""
    return "".join("[[]" if char == "[" else char for char in pattern)


def time_upper_bound(value: str) -> str:
    """The last TM text a (partial) upper bound covers: ``11`` -> ``115959.999999``.

    Stored times compare as text, so a bound given to the hour or minute has to reach the end of
    that hour or minute to be inclusive (PS3.4 C.2.2.2.5).
    """
    if len(value) == 2:
        return value + "5959.999999"
    if len(value) == 4:
        return value + "59.999999"
    if len(value) == 6:
        return value + ".999999"
    head, fraction = value.split(".")
    return f"{head}.{fraction.ljust(6, '9')}"


def _lookup(key: str) -> Attribute:
    """The attribute a query key names, by keyword or by tag (``00100020``)."""
    if _TAG.match(key):
        attribute = _BY_TAG.get(key.upper())
        known = dictionary_has_tag(int(key, 16))
        name = keyword_for_tag(int(key, 16)) if known else key
    else:
        attribute = _BY_KEYWORD.get(key)
        known = tag_for_keyword(key) is not None
        name = key
    if attribute is not None:
        return attribute
    if known:
        raise InvalidInput(f'Query parameter "{key}" ({name}) is not an attribute this node can match on.')
    raise InvalidInput(f'Query parameter "{key}" is neither a QIDO-RS parameter nor a DICOM attribute keyword or tag.')


def _uint(key: str, value: str, minimum: int) -> int:
    """A paging value; at most MAX_OFFSET, which every database's integer holds."""
    if not _UINT.match(value) or not minimum <= int(value) <= MAX_OFFSET:
        raise InvalidInput(f'Query parameter "{key}" should be an integer from {minimum} to {MAX_OFFSET}.')
    return int(value)


def _criterion(key: str, attribute: Attribute, value: str) -> Criterion | None:
    """The criterion for one matching key; None for universal matching."""
    vr = attribute.vr
    if value == "" or (value == "*" and vr in _STRING_VRS):
        return None
    if vr in ("DA", "TM"):
        return _range_criterion(key, attribute, value)
    if has_wildcard(value) and vr not in _STRING_VRS:
        raise InvalidInput(f'Query parameter "{key}" does not allow wildcards ({vr} values match exactly).')
    values = tuple(v.strip() for v in _LIST_SPLIT.split(value)) if vr in _LIST_VRS else (value,)
    if any(v == "" for v in values):
        raise InvalidInput(f'Query parameter "{key}" has an empty item in its list of values.')
    if vr == "UI" and not all(is_valid_uid(v) for v in values):
        raise InvalidInput(f'Query parameter "{key}" should be a UID or a list of UIDs.')
    if vr in INTEGER_VRS:
        if not _INTEGER.match(value):
            raise InvalidInput(f'Query parameter "{key}" should be an integer.')
        values = (str(int(value)),)
    return Criterion(attribute, values=values)


def _range_criterion(key: str, attribute: Attribute, value: str) -> Criterion:
    """Single value or range matching of a DA or TM value (PS3.4 C.2.2.2.5)."""
    pattern = _DA if attribute.vr == "DA" else _TM
    form = "YYYYMMDD" if attribute.vr == "DA" else "HHMMSS.FFFFFF (minutes onward optional)"
    low, sep, high = value.partition("-") if "-" in value else (value, "", value)
    low, high = low.strip().replace(":", ""), high.strip().replace(":", "")
    if (not low and not high) or any(part and not pattern.match(part) for part in (low, high)):
        raise InvalidInput(f'Query parameter "{key}" should be {form} or a range of them separated by "-".')
    if attribute.vr == "TM" and high:
        high = time_upper_bound(high)
    if attribute.vr == "DA" and low and low == high and not sep:
        return Criterion(attribute, values=(low,))
    return Criterion(attribute, low=low or None, high=high or None)


def parse_query(
    params: Iterable[tuple[str, str]],
    level: Level,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> Query:
    """Parse the query parameters of a QIDO-RS request (PS3.18 8.3.4, 10.6.1).

    Parameters
    ----------
    params
        The query parameters in request order; a key may repeat (``includefield``, and the
        list-valued UI and CS keys, whose values are then joined).
    level
        What is searched for: studies, series or instances.
    study_instance_uid, series_instance_uid
        The UIDs in the target resource's path (``/studies/{study}/series``); they match like
        query keys and narrow which attributes are returned (PS3.18 10.6.3.3).

    Returns
    -------
    Query
        The criteria, the attributes to return, and the page.

    Raises
    ------
    InvalidInput
        A parameter is unknown, repeated, not a matching key at this level, or its value does not
        follow its VR; the message names the parameter.
    """
    limit, offset, fuzzy = MAX_RESULTS, 0, False
    include: list[Attribute] = []
    include_all = False
    raw: dict[str, tuple[str, Attribute, list[str]]] = {}
    for key, value in params:
        if key == "limit":
            limit = min(_uint(key, value, 1), MAX_RESULTS)
        elif key == "offset":
            offset = _uint(key, value, 0)
        elif key == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise InvalidInput('Query parameter "fuzzymatching" should be true or false.')
            fuzzy = value.lower() == "true"
        elif key == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item == "all":
                    include_all = True
                elif item:
                    include.extend(_included(item))
        else:
            attribute = _lookup(key)
            if attribute.level > level:
                raise InvalidInput(
                    f'Query parameter "{key}" belongs to the {attribute.level.name} level and cannot match '
                    f"when searching for {_PLURAL[level]}; search for {_PLURAL[attribute.level]} instead."
                )
            if not attribute.matchable:
                raise InvalidInput(f'Query parameter "{key}" is returned by this node but is not a matching key.')
            if attribute.keyword in raw:
                if attribute.vr not in _LIST_VRS:
                    raise InvalidInput(f'Query parameter "{key}" is given more than once.')
                raw[attribute.keyword][2].append(value)
            else:
                raw[attribute.keyword] = (key, attribute, [value])
    for keyword, uid in (("StudyInstanceUID", study_instance_uid), ("SeriesInstanceUID", series_instance_uid)):
        if uid is not None:
            if not is_valid_uid(uid):
                raise InvalidInput(f"The {keyword} in the path is not a valid UID.")
            raw.setdefault(f"path:{keyword}", (keyword, _BY_KEYWORD[keyword], [uid]))
    criteria = []
    for key, attribute, values in raw.values():
        criterion = _criterion(key, attribute, ",".join(values) if len(values) > 1 else values[0])
        if criterion is not None:
            criteria.append(criterion)
    depth = 2 if series_instance_uid is not None else 1 if study_instance_uid is not None else 0
    returned = _returned(level, depth, [a for _, a, _ in raw.values()], include, include_all)
    return Query(level, tuple(criteria), returned, limit, offset, fuzzy)


def _included(item: str) -> list[Attribute]:
    """An ``includefield`` item: one we hold, or a known attribute we hold no value of (skipped)."""
    if _TAG.match(item):
        if item.upper() in _BY_TAG:
            return [_BY_TAG[item.upper()]]
        if dictionary_has_tag(int(item, 16)):
            return []
    elif item in _BY_KEYWORD:
        return [_BY_KEYWORD[item]]
    elif tag_for_keyword(item) is not None:
        return []
    raise InvalidInput(f'Query parameter "includefield" names "{item}", which is not a DICOM attribute.')


def _returned(
    level: Level, depth: int, matched: Sequence[Attribute], include: Sequence[Attribute], include_all: bool
) -> tuple[Attribute, ...]:
    """Attributes of each answer: the defaults of the levels below the path, matched keys, included ones.

    A search under ``/studies/{study}`` answers without the study's attributes, as PS3.18
    10.6.3.3 lists; ``includefield=all`` returns everything the node holds down to ``level``.
    """
    keywords: set[str] = set(_ALWAYS[level])
    for each in Level:
        if depth < each <= level:
            keywords.update(_DEFAULT_RETURN[each])
    keywords.update(a.keyword for a in matched if a.level <= level)
    keywords.update(a.keyword for a in include if a.level <= level)
    if include_all:
        keywords.update(a.keyword for a in ATTRIBUTES if a.level <= level)
    return tuple(sorted((_BY_KEYWORD[k] for k in keywords), key=lambda a: a.tag))


def _element(vr: str, value: Any) -> dict[str, Any]:
    """One DICOM JSON attribute object (PS3.18 F.2.2); None or an empty list gives no Value."""
    if value is None or value == "" or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list | tuple) else [value]
    if vr == "PN":
        return {"vr": vr, "Value": [_person_name(str(v)) for v in values]}
    if vr in INTEGER_VRS:
        return {"vr": vr, "Value": [int(v) for v in values]}
    return {"vr": vr, "Value": [str(v) for v in values]}


def _person_name(value: str) -> dict[str, str]:
    """A PN value as its component groups (PS3.18 F.2.2): ``Alphabetic=Ideographic=Phonetic``."""
    groups = dict(zip(("Alphabetic", "Ideographic", "Phonetic"), value.split("="), strict=False))
    return {name: text for name, text in groups.items() if text}


def render(
    query: Query,
    rows: Mapping[Level, object],
    computed: Mapping[str, Any],
    retrieve_url: str,
) -> dict[str, Any]:
    """One match as a DICOM JSON object, attributes in tag order (PS3.18 F.2).

    Parameters
    ----------
    query
        The parsed search; its ``returned`` attributes are written, empty when unknown.
    rows
        The matched row of each level down to ``query.level`` (``Study``, ``Series``,
        ``Instance``); a value is read from the attribute its :class:`Attribute` names.
    computed
        Values without a column, by keyword (``ModalitiesInStudy``, the study's counts).
    retrieve_url
        The WADO-RS URL of the matched resource, returned as RetrieveURL (0008,1190).
    """
    out: dict[str, Any] = {}
    for attribute in query.returned:
        if attribute.column is not None:
            value = getattr(rows[attribute.level], attribute.column)
        else:
            value = computed.get(attribute.keyword)
        out[attribute.tag] = _element(attribute.vr, value)
    out[RETRIEVE_URL_TAG] = {"vr": "UR", "Value": [retrieve_url]}
    return dict(sorted(out.items()))
