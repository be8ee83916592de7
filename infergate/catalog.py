"""The installed models and the routing rules, read together and re-read when they change.

Rules come from the routing file (``INFERGATE_ROUTING_RULES``, default ``models/routing.yaml``)
followed by each package's own ``routing.yaml``, so that a model added with ``infergate models
add`` is routed without editing any file or restarting anything: the watcher and the workers
notice the change of the models folder (:func:`fingerprint`) and reload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infergate.config import Settings
from infergate.errors import InvalidInput
from infergate.manifest import ModelPackage, load_all
from infergate.routing import RoutingRules, load_rules

PACKAGE_RULES = "routing.yaml"


@dataclass(frozen=True)
class Catalog:
    packages: dict[str, ModelPackage]
    rules: RoutingRules


def fingerprint(settings: Settings) -> tuple[tuple[str, int], ...]:
    """Cheap change detector: modification times of the rules file, package folders and manifests."""
    paths: list[Path] = [settings.routing_rules_path, settings.models_dir]
    if settings.models_dir.is_dir():
        for folder in sorted(settings.models_dir.iterdir()):
            paths += [folder / "manifest.json", folder / PACKAGE_RULES]
    return tuple((str(p), p.stat().st_mtime_ns) for p in paths if p.exists())


def load_catalog(settings: Settings, *, verify_hash: bool = True) -> Catalog:
    """Packages and merged rules; refuses rules that name a model that is not installed.

    Raises
    ------
    InvalidInput
        A manifest or a rules file is invalid, or a rule names an unknown model.
    """
    packages = load_all(settings.models_dir, verify_hash=verify_hash)
    known = set(packages)
    rules = load_rules(settings.routing_rules_path, known_models=known)
    merged = list(rules.rules)
    for package in packages.values():
        path = package.folder / PACKAGE_RULES
        if path.is_file():
            merged.extend(load_rules(path, known_models=known).rules)
    try:
        return Catalog(packages=packages, rules=RoutingRules(rules=merged))
    except ValueError as exc:  # pragma: no cover - the parts were validated above
        raise InvalidInput(str(exc)) from exc
