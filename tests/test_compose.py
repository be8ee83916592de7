"""Static checks of docker-compose.yml, the Dockerfiles and the demo PACS configuration.

Docker does not run where the tests run, so these checks stand in for ``docker compose config`` and a build:
they catch the mistakes that would otherwise surface only at deploy time (a renamed subcommand or setting, a
missing file, a PACS that routes to the wrong AE or port).
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from infergate.config import Destination, Settings, get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
CLI_FILE = REPO_ROOT / "infergate" / "cli.py"
DOCKERFILES = sorted((REPO_ROOT / "docker").glob("*.Dockerfile"))
ORTHANC_CONFIG = REPO_ROOT / "docker" / "orthanc" / "orthanc.json"
AUTOROUTE = REPO_ROOT / "docker" / "orthanc" / "autoroute.lua"
ENV_PREFIX = "INFERGATE_"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two Compose syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _build(service: dict[str, Any]) -> tuple[Path, Path] | None:
    """(context, Dockerfile) of a service that builds, else None."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (REPO_ROOT / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


# Dockerfile parsing -----------------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, rest = logical.partition(" ")
        yield keyword.upper(), rest.strip()
        logical = ""


def _copy_sources(arguments: str) -> list[str] | None:
    """Sources of a COPY/ADD from the build context; None when it copies from another stage or image."""
    if arguments.startswith("["):
        parts = [str(part) for part in json.loads(arguments)]
    else:
        parts = shlex.split(arguments)
    if any(part.startswith("--from") for part in parts):
        return None
    parts = [part for part in parts if not part.startswith("--")]
    return parts[:-1]


def _dockerignore_patterns() -> list[str]:
    path = REPO_ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops the path (or a folder above it); negations are not needed here."""
    parts = relative.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("!"):
            continue
        pattern = pattern.strip("/")
        for prefix in prefixes:
            if fnmatch(prefix, pattern):
                return True
            if pattern.startswith("**/") and fnmatch(prefix.rsplit("/", 1)[-1], pattern[3:]):
                return True
    return False


# CLI parsing ------------------------------------------------------------------------------------------------


def _cli_tree() -> set[tuple[str, ...]]:
    """Every (sub)command path declared in infergate/cli.py, found with ast (nothing is imported or run).

    ``sub = parser.add_subparsers()``, ``db = sub.add_parser("db")``, ``db_sub = db.add_subparsers()`` and
    ``db_sub.add_parser("upgrade")`` give ``{("db",), ("db", "upgrade")}``.
    """
    tree = ast.parse(CLI_FILE.read_text())
    parsers: dict[str, tuple[str, ...]] = {}
    subparsers: dict[str, tuple[str, ...]] = {}
    paths: set[tuple[str, ...]] = set()
    assignments = [node for node in ast.walk(tree) if isinstance(node, ast.Assign | ast.AnnAssign | ast.Expr)]
    for _ in range(4):  # fixpoint: assignments may be visited before the ones they depend on
        for node in assignments:
            call = node.value
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
                continue
            owner = call.func.value.id if isinstance(call.func.value, ast.Name) else None
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            names = [target.id for target in targets if isinstance(target, ast.Name)]
            method = call.func.attr
            if method == "ArgumentParser":
                parsers.update(dict.fromkeys(names, ()))
            elif method == "add_subparsers" and owner in parsers:
                subparsers.update(dict.fromkeys(names, parsers[owner]))
            elif method == "add_parser" and owner in subparsers and call.args:
                first = call.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    path = (*subparsers[owner], first.value)
                    paths.add(path)
                    parsers.update(dict.fromkeys(names, path))
    return paths


def _check_infergate_command(tokens: list[str], paths: set[tuple[str, ...]]) -> str | None:
    """None if ``infergate ...`` names existing subcommands down to a leaf (or stops at an option)."""
    path: tuple[str, ...] = ()
    for token in tokens[1:]:
        children = {p[-1] for p in paths if p[:-1] == path}
        if not children or token.startswith("-"):
            return None
        if token not in children:
            where = " ".join(("infergate", *path))
            return f'"{token}" is not a subcommand of `{where}` (known: {sorted(children)})'
        path = (*path, token)
    if any(p[:-1] == path for p in paths) and path:
        return f"`infergate {' '.join(path)}` needs a subcommand"
    return None


# Tests ------------------------------------------------------------------------------------------------------


def test_expected_services_are_declared(compose: dict[str, Any]) -> None:
    assert {
        *("postgres", "redis", "orthanc", "migrate", "scp", "api", "worker", "worker-gpu"),
        *("ohif", "prometheus", "grafana"),  # viewer and monitoring: tests/test_deploy.py
    } <= set(_services(compose))
    assert _services(compose)["worker-gpu"].get("profiles") == ["gpu"]


def test_every_build_has_its_dockerfile(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        build = _build(service)
        if build is None:
            continue
        context, dockerfile = build
        assert context.is_dir(), f"{name}: build context {context} is missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"


def test_base_image_is_provided_to_the_builds_that_need_it(compose: dict[str, Any]) -> None:
    """A Dockerfile that starts ``FROM infergate-base`` builds only with that named context."""
    services = _services(compose)
    for name, service in services.items():
        build = _build(service)
        if build is None:
            continue
        froms = [  # FROM [--platform=...] image [AS name]
            next(token for token in args.split() if not token.startswith("--"))
            for keyword, args in _instructions(build[1])
            if keyword == "FROM"
        ]
        contexts = service["build"].get("additional_contexts") or {}
        for image in froms:
            if image == "infergate-base":
                assert image in contexts, f"{name}: FROM infergate-base without an additional context"
        for context_name, source in contexts.items():
            if str(source).startswith("service:"):
                provider = services.get(str(source).removeprefix("service:"))
                assert provider is not None and provider.get("build"), f"{name}: {context_name} -> {source}"
                assert provider.get("image") == context_name, f"{source} should be tagged {context_name}"


def test_commands_name_existing_cli_subcommands(compose: dict[str, Any]) -> None:
    if not CLI_FILE.exists():
        pytest.skip("infergate/cli.py is not written yet: cannot check the subcommands compose runs")
    paths = _cli_tree()
    assert ("scp",) in paths, "no subcommands found in infergate/cli.py: has its argparse layout changed?"
    commands = {f"service {name}": _command(service) for name, service in _services(compose).items()}
    for dockerfile in DOCKERFILES:
        for keyword, args in _instructions(dockerfile):
            if keyword in {"CMD", "ENTRYPOINT"} and args.startswith("["):
                commands[f"{dockerfile.name} {keyword}"] = [str(part) for part in json.loads(args)]
    checked = 0
    for where, tokens in commands.items():
        if tokens[:1] == ["infergate"]:
            checked += 1
            problem = _check_infergate_command(tokens, paths)
            assert problem is None, f"{where}: {problem}"
    assert checked >= 6


def _infergate_variables(compose: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name, service in _services(compose).items():
        for variable in _environment(service):
            if variable.startswith(ENV_PREFIX):
                yield f"service {name}", variable
    for dockerfile in DOCKERFILES:
        for keyword, args in _instructions(dockerfile):
            if keyword == "ENV":
                for variable in re.findall(rf"\b({ENV_PREFIX}[A-Z0-9_]+)=", args):
                    yield dockerfile.name, variable


def test_every_infergate_variable_is_a_setting(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    found = list(_infergate_variables(compose))
    assert found
    for where, variable in found:
        assert variable.removeprefix(ENV_PREFIX).lower() in fields, (
            f"{where}: {variable} is not a Settings field"
        )


def test_every_service_environment_makes_valid_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values parse too (e.g. INFERGATE_PACS as AE@host:port), as each container would read them."""
    for name, service in _services(compose).items():
        env = {k: v for k, v in _environment(service).items() if k.startswith(ENV_PREFIX)}
        if not env:
            continue
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            settings = get_settings()
        assert str(settings.data_dir) == "/data", name
        assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://"), name
        assert settings.broker_url and settings.broker_url.startswith("redis://"), name


def test_mounted_files_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in _services(compose).items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, kind = str(volume.get("source", "")), volume.get("type", "volume")
            else:
                source = str(volume).split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind":
                assert (REPO_ROOT / source).exists(), f"{name}: mounted {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source} is not declared"


def test_shared_data_volume_is_mounted_by_the_node(compose: dict[str, Any]) -> None:
    for name in ("scp", "api", "worker", "worker-gpu"):
        assert "data:/data" in _services(compose)[name]["volumes"], name


def test_stores_are_only_on_internal_networks(compose: dict[str, Any]) -> None:
    networks = compose.get("networks") or {}
    services = _services(compose)
    for name in ("postgres", "redis"):
        joined = services[name].get("networks") or ["default"]
        assert all((networks.get(net) or {}).get("internal") is True for net in joined), name
        assert "ports" not in services[name], f"{name} must not publish ports"
    internal = {net for net, spec in networks.items() if (spec or {}).get("internal")}
    for name in ("migrate", "scp", "api", "worker", "worker-gpu"):
        assert internal & set(services[name].get("networks") or []), f"{name} cannot reach the stores"


def test_depends_on_conditions_can_be_met(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            continue
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = (spec or {}).get("condition", "service_started")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], (
                    f"{name} waits for {target}, which has no healthcheck"
                )
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot: restart 'no'"


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    patterns = _dockerignore_patterns()
    assert {".git", ".venv", "var"} <= set(patterns)
    for dockerfile in DOCKERFILES:
        for keyword, args in _instructions(dockerfile):
            if keyword not in {"COPY", "ADD"}:
                continue
            sources = _copy_sources(args)
            for source in sources or []:
                assert list(REPO_ROOT.glob(source)), f"{dockerfile.name}: COPY source {source} does not exist"
                assert not _ignored(source, patterns), (
                    f"{dockerfile.name}: {source} is excluded by .dockerignore"
                )


def test_requirement_extraction_in_the_dockerfiles(tmp_path: Path) -> None:
    """The inline Python turning pyproject.toml into requirements runs; the GPU one drops onnxruntime."""
    import subprocess
    import sys

    (tmp_path / "pyproject.toml").write_bytes((REPO_ROOT / "pyproject.toml").read_bytes())
    outputs = {}
    for dockerfile in DOCKERFILES:
        snippets = re.findall(r"python -c '([^']*tomllib[^']*)'", dockerfile.read_text())
        for snippet in snippets:
            result = subprocess.run(
                [sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True, check=True
            )
            outputs[dockerfile.name] = result.stdout.split()
    base, gpu = outputs["base.Dockerfile"], outputs["worker-gpu.Dockerfile"]
    assert any(req.startswith("onnxruntime>") for req in base)
    assert any(req.startswith("onnxruntime-gpu") for req in gpu)
    assert not any(re.match(r"onnxruntime([<>=!~;]|$)", req) for req in gpu)
    assert {r for r in base if not r.startswith("onnxruntime")} == {
        r for r in gpu if not r.startswith("onnxruntime")
    }


def test_gpu_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = _services(compose)["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)


def test_pacs_routes_to_the_scp_and_results_go_back_to_the_pacs(compose: dict[str, Any]) -> None:
    """orthanc.json, autoroute.lua and the node's settings must agree on AE titles, hosts and ports."""
    services = _services(compose)
    config = json.loads(ORTHANC_CONFIG.read_text())
    orthanc = services["orthanc"]
    mounts = {
        str(v).split(":")[1]: str(v).split(":")[0] for v in orthanc["volumes"] if str(v).startswith(".")
    }

    # the node as Orthanc sees it
    lua = AUTOROUTE.read_text()
    node_modality = re.search(r"NODE_MODALITY\s*=\s*'([^']+)'", lua)
    node_aet = re.search(r"NODE_AET\s*=\s*'([^']+)'", lua)
    assert node_modality and node_aet
    ae_title, host, port = config["DicomModalities"][node_modality[1]]
    scp_settings = _environment(services[host])
    assert _command(services[host])[:2] == ["infergate", "scp"], (
        f"modality host {host} is not the SCP service"
    )
    assert (
        ae_title
        == node_aet[1]
        == scp_settings.get("INFERGATE_AE_TITLE", Settings.model_fields["ae_title"].default)
    )
    assert port == int(scp_settings.get("INFERGATE_SCP_PORT", Settings.model_fields["scp_port"].default))
    assert set(services[host]["networks"]) & set(orthanc["networks"]), "Orthanc cannot reach the SCP"
    for script in config.get("LuaScripts", []):
        assert script in mounts and (REPO_ROOT / mounts[script]) == AUTOROUTE, f"{script} is not mounted"
    assert any(
        target.startswith("/etc/orthanc/")
        and target.endswith(".json")
        and (REPO_ROOT / src) == ORTHANC_CONFIG
        for target, src in mounts.items()
    )

    # Orthanc as the node sees it
    for name in ("scp", "api", "worker"):
        (pacs,) = [
            Destination.parse(text) for text in _environment(services[name])["INFERGATE_PACS"].split(",")
        ]
        assert (pacs.ae_title, pacs.host, pacs.port) == (
            config["DicomAet"],
            "orthanc",
            config["DicomPort"],
        ), name
    assert config["DicomWeb"]["Enable"] is True
