"""Routing rules: loading and matching (infergate.routing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from infergate.errors import InvalidInput
from infergate.routing import Match, RoutingRules, Rule, SeriesFacts, load_rules

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"


def _installed_models() -> set[str] | None:
    """Ids of the model folders that have a manifest, or None while there are none yet."""
    found = (
        {p.name for p in MODELS_DIR.iterdir() if (p / "manifest.json").is_file()}
        if MODELS_DIR.is_dir()
        else set()
    )
    return found or None


def _rules(*rules: dict[str, object]) -> RoutingRules:
    return RoutingRules.model_validate({"rules": list(rules)})


CT = SeriesFacts(
    modality="CT",
    body_part_examined="CHEST",
    series_description="Chest 1.0 B31f",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    num_instances=40,
    calling_ae="MODALITY1",
    called_ae="INFERGATE",
)


def test_default_rules_file_loads() -> None:
    rules = load_rules(MODELS_DIR / "routing.yaml", known_models=_installed_models())
    assert rules.rules, "models/routing.yaml should hold at least one rule"
    models, names = rules.route(CT)
    assert models, "an ordinary axial CT volume should be routed by the default rules"
    assert names


def test_default_rules_do_not_route_tiny_or_derived_series() -> None:
    rules = load_rules(MODELS_DIR / "routing.yaml")
    assert rules.route(SeriesFacts(modality="CT", image_type=("ORIGINAL",), num_instances=1)) == ([], [])
    assert rules.route(SeriesFacts(modality="SEG", num_instances=40)) == ([], [])


def test_empty_match_matches_everything() -> None:
    rules = _rules({"name": "all", "models": ["m"]})
    assert rules.route(SeriesFacts()) == (["m"], ["all"])


@pytest.mark.parametrize(
    ("match", "expected"),
    [
        ({"modality": ["CT", "MR"]}, True),
        ({"modality": "ct"}, True),  # a single string, any case
        ({"modality": ["MR"]}, False),
        ({"body_part_examined": ["chest"]}, True),  # case-insensitive
        ({"body_part_examined": ["ABDOMEN"]}, False),
        ({"series_description": "(?i)chest|abdomen"}, True),
        ({"series_description": "B31f$"}, True),  # searched, not anchored at the start
        ({"series_description": "^chest"}, False),  # regex is case-sensitive unless it says (?i)
        ({"image_type": ["original", "axial"]}, True),  # subset, any case
        ({"image_type": ["ORIGINAL", "LOCALIZER"]}, False),
        ({"min_slices": 40}, True),
        ({"min_slices": 41}, False),
        ({"max_slices": 40}, True),
        ({"max_slices": 39}, False),
        ({"calling_ae": ["modality1"]}, True),
        ({"calling_ae": ["OTHER"]}, False),
        ({"called_ae": ["INFERGATE"]}, True),
        ({"called_ae": ["OTHER"]}, False),
        (
            {
                "modality": ["CT"],
                "min_slices": 8,
                "image_type": ["ORIGINAL"],
                "body_part_examined": ["CHEST"],
            },
            True,
        ),
        ({"modality": ["CT"], "min_slices": 8, "image_type": ["DERIVED"]}, False),  # all criteria must hold
    ],
)
def test_match_criteria(match: dict[str, object], expected: bool) -> None:
    assert Match.model_validate(match).matches(CT) is expected


def test_absent_attributes_do_not_match_a_required_value() -> None:
    bare = SeriesFacts(num_instances=10)
    assert not Match(modality=["CT"]).matches(bare)
    assert not Match(body_part_examined=["CHEST"]).matches(bare)
    assert not Match(series_description="chest").matches(bare)
    assert not Match(image_type=["ORIGINAL"]).matches(bare)
    assert not Match(calling_ae=["A"]).matches(bare)


def test_union_of_models_in_rule_order_without_repeats() -> None:
    rules = _rules(
        {"name": "ct", "match": {"modality": ["CT"]}, "models": ["seg", "cls"]},
        {"name": "mr", "match": {"modality": ["MR"]}, "models": ["mr-only"]},
        {"name": "chest", "match": {"body_part_examined": ["CHEST"]}, "models": ["cls", "nodules", "seg"]},
    )
    assert rules.route(CT) == (["seg", "cls", "nodules"], ["ct", "chest"])


def test_no_rule_matches() -> None:
    rules = _rules({"name": "mr", "match": {"modality": ["MR"]}, "models": ["m"]})
    assert rules.route(CT) == ([], [])


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if path.suffix == ".json" else yaml.safe_dump(data))
    return path


RULES = {
    "rules": [
        {
            "name": "CT body",
            "match": {"modality": ["CT"], "series_description": "(?i)chest", "min_slices": 8},
            "models": ["seg", "cls"],
        }
    ]
}


@pytest.mark.parametrize("name", ["rules.yaml", "rules.yml", "rules.json"])
def test_yaml_and_json_load_alike(tmp_path: Path, name: str) -> None:
    rules = load_rules(_write(tmp_path / name, RULES), known_models={"seg", "cls"})
    assert rules.rules == [
        Rule(
            name="CT body",
            match=Match(modality=["CT"], series_description="(?i)chest", min_slices=8),
            models=["seg", "cls"],
        )
    ]
    assert rules.route(CT) == (["seg", "cls"], ["CT body"])


def test_empty_file_means_no_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("")
    assert load_rules(path).rules == []


def test_invalid_regex_refused(tmp_path: Path) -> None:
    data = {"rules": [{"name": "r", "match": {"series_description": "chest(("}, "models": ["m"]}]}
    with pytest.raises(InvalidInput, match="series_description"):
        load_rules(_write(tmp_path / "rules.yaml", data))


def test_unknown_model_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="unknown models: cls"):
        load_rules(_write(tmp_path / "rules.json", RULES), known_models={"seg"})


@pytest.mark.parametrize(
    "data",
    [
        {"rules": [{"name": "r", "models": []}]},  # a rule needs a model
        {"rules": [{"name": "r", "match": {"modalty": ["CT"]}, "models": ["m"]}]},  # misspelt criterion
        {"rules": [{"name": "r", "match": {"min_slices": 0}, "models": ["m"]}]},
        {"rules": [{"models": ["m"]}]},  # no name
        {"routes": []},
        ["not", "a", "mapping"],
    ],
)
def test_malformed_rules_refused(tmp_path: Path, data: object) -> None:
    with pytest.raises(InvalidInput):
        load_rules(_write(tmp_path / "rules.json", data))


def test_unparsable_files_refused(tmp_path: Path) -> None:
    bad_json = tmp_path / "rules.json"
    bad_json.write_text("{rules: ")
    with pytest.raises(InvalidInput):
        load_rules(bad_json)
    bad_yaml = tmp_path / "rules.yaml"
    bad_yaml.write_text("rules: [unclosed")
    with pytest.raises(InvalidInput):
        load_rules(bad_yaml)


def test_missing_file_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="Cannot read"):
        load_rules(tmp_path / "absent.yaml")
