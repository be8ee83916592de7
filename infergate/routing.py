"""Routing rules: which models run on a complete series.

Rules are data (YAML or JSON), in the spirit of MONAI Deploy's series selector. Each rule has a
``match`` block and a list of ``models``; every rule that matches adds its models (in file order,
without repeats). A criterion that is absent matches anything. Matching is pure: it sees only the
:class:`SeriesFacts` gathered from the stored headers and the association.

Example::

    rules:
      - name: CT body
        match:
          modality: [CT]
          series_description: "(?i)chest|abdomen|body"
          image_type: [ORIGINAL]
          min_slices: 8
        models: [ct-tissue-seg, ct-bone-classifier]
      - name: T1 brain
        match:
          modality: [MR]
          findings: {mr-series-type: [T1w]}   # waits for the series-type classifier
        models: [brain-extraction]

A rule with ``findings`` is evaluated again each time a classification job of the series finishes;
models it adds are queued then.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from infergate.errors import InvalidInput


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at for one series."""

    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    image_type: tuple[str, ...] = ()
    num_instances: int = 0
    calling_ae: str | None = None
    called_ae: str | None = None
    #: The top class name of each classification model already run on the series (model id -> class).
    findings: dict[str, str] = field(default_factory=dict)


def _upper_list(value: object) -> object:
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [str(item).strip().upper() for item in value]
    return value


class Match(BaseModel):
    """Criteria of one rule; all given criteria must hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modality: list[str] | None = None
    body_part_examined: list[str] | None = None
    series_description: str | None = Field(None, description="Regular expression searched in the description.")
    image_type: list[str] | None = Field(None, description="Values that must all appear in ImageType.")
    min_slices: int | None = Field(None, ge=1)
    max_slices: int | None = Field(None, ge=1)
    calling_ae: list[str] | None = None
    called_ae: list[str] | None = None
    findings: dict[str, list[str]] | None = Field(
        None,
        description="Model id -> class names: holds once that classification model ran on the series and "
        "its most probable class is one of the names (e.g. route only T1-weighted MR to brain extraction).",
    )

    _upper = field_validator("modality", "body_part_examined", "image_type", "calling_ae", "called_ae", mode="before")(
        _upper_list
    )

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f'"series_description" is not a valid regular expression: {exc}') from exc
        return value

    def matches(self, facts: SeriesFacts) -> bool:
        def one_of(allowed: list[str] | None, actual: str | None) -> bool:
            return allowed is None or (actual or "").strip().upper() in allowed

        if not one_of(self.modality, facts.modality):
            return False
        if not one_of(self.body_part_examined, facts.body_part_examined):
            return False
        if not one_of(self.calling_ae, facts.calling_ae) or not one_of(self.called_ae, facts.called_ae):
            return False
        if self.series_description is not None and not re.search(
            self.series_description, facts.series_description or ""
        ):
            return False
        if self.image_type is not None:
            present = {value.strip().upper() for value in facts.image_type}
            if not set(self.image_type) <= present:
                return False
        if self.min_slices is not None and facts.num_instances < self.min_slices:
            return False
        if self.findings is not None:
            for model_id, classes in self.findings.items():
                if facts.findings.get(model_id) not in classes:
                    return False
        return self.max_slices is None or facts.num_instances <= self.max_slices


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    match: Match = Match()
    models: list[str] = Field(min_length=1)


class RoutingRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rules: list[Rule] = Field(default_factory=list)

    def finding_models(self) -> set[str]:
        """Models whose findings some rule waits for."""
        return {model_id for rule in self.rules for model_id in (rule.match.findings or {})}

    def route(self, facts: SeriesFacts) -> tuple[list[str], list[str]]:
        """Return the model ids for ``facts`` and the names of the rules that matched."""
        models: list[str] = []
        names: list[str] = []
        for rule in self.rules:
            if rule.match.matches(facts):
                names.append(rule.name)
                models.extend(m for m in rule.models if m not in models)
        return models, names


def load_rules(path: Path, known_models: set[str] | None = None) -> RoutingRules:
    """Read rules from a YAML or JSON file.

    Raises
    ------
    InvalidInput
        The file is missing, malformed, or names a model that is not installed.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidInput(f"Cannot read routing rules {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        rules = RoutingRules.model_validate(data or {})
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidInput(f"Routing rules {path} are invalid: {exc}") from exc
    if known_models is not None:
        named = {m for rule in rules.rules for m in rule.models} | rules.finding_models()
        unknown = sorted(named - known_models)
        if unknown:
            raise InvalidInput(f"Routing rules {path} name unknown models: {', '.join(unknown)}.")
    return rules
