"""The Helm chart (docker/helm/infergate), rendered and linted by Helm itself.

``helm-python-sdk`` (test group) binds Helm's own Go SDK (v4) as a shared library: ``Chart.render`` is
``helm template``, ``lint`` is ``helm lint``, both offline, and both apply ``values.schema.json``. The tests then
read the manifests as Kubernetes would: kinds and API versions, the names that must agree (Service ports and
container ports, Secrets and the pods that read them, the volume claim), the environment each container gets,
parsed into ``Settings`` as the process would, and the commands against ``infergate/cli.py``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infergate.config import Settings, get_settings
from tests.test_compose import REPO_ROOT, _check_infergate_command, _cli_tree

try:  # test dependency (pyproject.toml, test group); a clear failure rather than a silent skip
    import helm_python as helm
except ImportError as exc:  # pragma: no cover - only without the test group installed
    raise ImportError(
        "helm-python-sdk is missing: install the test group (pip install -e . --group test); it brings Helm's "
        "SDK as a library, so no helm binary is needed"
    ) from exc

CHART = REPO_ROOT / "docker" / "helm" / "infergate"
ENV_PREFIX = "INFERGATE_"
#: apiVersion of every kind the chart may render (all GA since Kubernetes 1.21 or earlier).
API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
}
API_KEY = "ci-secret-key"
#: The least an install needs: the shared stores and a way to authenticate to the API.
REQUIRED = {
    "secrets": {
        "databaseUrl": "postgresql+psycopg://infergate:secret@postgres:5432/infergate",
        "brokerUrl": "redis://redis:6379/0",
        "apiKeys": f"viewer:{hashlib.sha256(API_KEY.encode()).hexdigest()}:read",
    }
}


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def render(values: dict[str, Any] | None = None, *, required: bool = True) -> list[dict[str, Any]]:
    """Every object ``helm template`` gives for these values (merged over REQUIRED unless told otherwise)."""
    merged = _merge(REQUIRED, values or {}) if required else (values or {})
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(merged, name="pacs-ai", namespace="radiology")
    objects = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in objects if obj["kind"] == kind}


def _pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in {"Deployment", "Job"}:
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def _container_env(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment a container starts with: envFrom (ConfigMaps, Secrets) first, then env."""
    configmaps, secrets = _by_kind(objects, "ConfigMap"), _by_kind(objects, "Secret")
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]]["stringData"])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]
    return env


# Helm's own checks -----------------------------------------------------------------------------------------


def test_chart_lints_without_warnings() -> None:
    gpu = {"workerGpu": {"enabled": True}}
    http = {
        "workerDataAccess": "http",
        "secrets": {"workerApiKey": "k"},
        "persistence": {"accessModes": ["ReadWriteOnce"]},
    }
    for values in (REQUIRED, _merge(REQUIRED, gpu), _merge(REQUIRED, http)):
        report = helm.lint(str(CHART), values, strict=True, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


def test_values_yaml_is_valid_against_its_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        assert chart.values == values
    for bad in ({"workerGpu": {"gpus": 0}}, {"config": {"log_level": "INFO"}}, {"replicas": 2}):
        with pytest.raises(helm.HelmError, match="schema"):
            render(bad)


def test_templates_refer_only_to_declared_values() -> None:
    """A misspelt .Values path renders as empty in Go templates instead of failing: catch it here."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for template in sorted((CHART / "templates").glob("*")):
        for path in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
            node: Any = values
            for key in path.strip(".").split("."):
                assert isinstance(node, dict) and key in node, f"{template.name}: .Values{path} is not in values.yaml"
                node = node[key]


# The rendered objects ---------------------------------------------------------------------------------------


def test_kinds_and_api_versions() -> None:
    objects = render({"workerGpu": {"enabled": True}})
    for obj in objects:
        assert API_VERSIONS.get(obj["kind"]) == obj["apiVersion"], f"{obj['kind']} {obj['apiVersion']}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", obj["metadata"]["name"]), obj["metadata"]
    kinds = sorted(obj["kind"] for obj in objects)
    assert kinds == sorted(
        ["ConfigMap", "Secret", "Secret", "Service", "PersistentVolumeClaim", "Deployment", "Deployment"]
        + ["Deployment", "Job"]
    )


def test_every_environment_variable_is_a_setting() -> None:
    fields = set(Settings.model_fields)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    names = set(values["config"])
    http = {"workerDataAccess": "http", "secrets": {"workerApiKey": "k"}}
    for values in ({"workerGpu": {"enabled": True}}, http):
        objects = render(values)
        for _, spec in _pod_specs(objects):
            for container in spec["containers"]:
                names |= {name for name in _container_env(container, objects) if name.startswith(ENV_PREFIX)}
    assert len(names) > 10 and "INFERGATE_NODE_URL" in names
    unknown = sorted(name for name in names if name.removeprefix(ENV_PREFIX).lower() not in fields)
    assert not unknown, f"not Settings fields: {unknown}"


def test_each_container_environment_makes_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """What each process would read at its start: the Settings validators (authentication beyond loopback,
    list formats, TLS pairs) must accept it."""
    values = {"workerGpu": {"enabled": True}, "config": {"INFERGATE_PACS": "PACS@pacs.radiology:104"}}
    objects = render(values)
    checked = 0
    for name, spec in _pod_specs(objects):
        for container in spec["containers"]:
            env = _container_env(container, objects)
            with monkeypatch.context() as patch:
                for key, value in env.items():
                    patch.setenv(key, value)
                settings = get_settings()
            assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
            if container["name"] == "migrate":
                continue
            checked += 1
            assert str(settings.data_dir) == "/data", name
            assert settings.broker_url == "redis://redis:6379/0", name
            assert settings.auth_enabled and settings.auth_configured, name
            assert [p.ae_title for p in settings.pacs] == ["PACS"], name
    assert checked == 4  # scp, api, worker, worker-gpu


def test_commands_are_infergate_subcommands() -> None:
    paths = _cli_tree()
    commands = {}
    for name, spec in _pod_specs(render({"workerGpu": {"enabled": True}})):
        for container in spec["containers"]:
            commands[f"{name}/{container['name']}"] = container["command"]
    assert {tuple(c[:3]) for c in commands.values()} == {
        ("infergate", "scp"),
        ("infergate", "api"),
        ("infergate", "worker"),
        ("infergate", "db", "upgrade"),
    }
    for where, command in commands.items():
        assert _check_infergate_command(command, paths) is None, where


def test_service_exposes_the_node_pod_dicom_and_http() -> None:
    objects = render()
    (service,) = _by_kind(objects, "Service").values()
    (node,) = [d for d in _by_kind(objects, "Deployment").values() if d["metadata"]["name"].endswith("-node")]
    pod_labels = node["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert node["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p for c in node["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
    (config,) = _by_kind(objects, "ConfigMap").values()
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "dicom": (int(config["data"]["INFERGATE_SCP_PORT"]), "dicom"),
        "http": (int(config["data"]["INFERGATE_API_PORT"]), "http"),
    }
    assert ports["dicom"]["containerPort"] == int(config["data"]["INFERGATE_SCP_PORT"])
    assert ports["http"]["containerPort"] == int(config["data"]["INFERGATE_API_PORT"])
    containers = {c["name"]: c for c in node["spec"]["template"]["spec"]["containers"]}
    assert containers["api"]["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert containers["api"]["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert containers["scp"]["readinessProbe"]["tcpSocket"] == {"port": "dicom"}


def test_gpu_workers_get_gpus_and_cpu_workers_none() -> None:
    default = _by_kind(render(), "Deployment")
    assert not [name for name in default if name.endswith("-worker-gpu")], "the GPU worker is off by default"
    deployments = _by_kind(render({"workerGpu": {"enabled": True, "gpus": 2, "replicas": 3}}), "Deployment")
    gpu, cpu = deployments["pacs-ai-infergate-worker-gpu"], deployments["pacs-ai-infergate-worker"]
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "16Gi", "the GPU limit is added to the others"
    assert container["image"] == "infergate-worker-gpu:0.1.0"
    assert gpu["spec"]["replicas"] == 3
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["spec"]["template"]["spec"][
        "tolerations"
    ]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/var/cache/infergate/tensorrt" in mounts, "ORT_TENSORRT_CACHE_PATH of the GPU image"
    for other in (cpu, *[d for n, d in deployments.items() if n.endswith("-node")]):
        for c in other["spec"]["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}), other["metadata"]["name"]


def test_every_pod_mounts_the_shared_data_volume() -> None:
    objects = render({"workerGpu": {"enabled": True}})
    (claim,) = _by_kind(objects, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for name, spec in _pod_specs(objects):
        if name.endswith("-migrate"):
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
        for container in spec["containers"]:
            assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"], name
        assert spec["securityContext"]["fsGroup"] == 10001, f"{name}: uid 10001 of the images must write /data"
    existing = render({"persistence": {"existingClaim": "pacs-nfs"}})
    assert not _by_kind(existing, "PersistentVolumeClaim")
    for _, spec in _pod_specs(existing):
        for volume in spec.get("volumes", []):
            if volume["name"] == "data":
                assert volume["persistentVolumeClaim"]["claimName"] == "pacs-nfs"


def test_http_workers_reach_the_node_through_its_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """workerDataAccess: http: workers mount no shared volume, fetch and upload through the node's Service with
    a key the API accepts with the worker scope."""
    worker_key = "worker-secret-key"
    values = {"workerDataAccess": "http", "secrets": {"workerApiKey": worker_key}, "workerGpu": {"enabled": True}}
    objects = render(values)
    (service,) = _by_kind(objects, "Service").values()
    http_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    api_env = {}
    for name, spec in _pod_specs(objects):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            env = _container_env(container, objects)
            if "-worker" in name:
                assert "persistentVolumeClaim" not in volumes["data"] and volumes["data"]["emptyDir"]["sizeLimit"]
                assert env["INFERGATE_NODE_URL"] == f"http://{service['metadata']['name']}:{http_port}"
                assert env["INFERGATE_NODE_API_KEY"] == worker_key
                with monkeypatch.context() as patch:
                    for key, value in env.items():
                        patch.setenv(key, value)
                    assert get_settings().node_url == env["INFERGATE_NODE_URL"]
            elif container["name"] == "api":
                assert "persistentVolumeClaim" in volumes["data"]
                assert "INFERGATE_NODE_API_KEY" not in env, "the node pod does not get the workers' credential"
                api_env = env
    with monkeypatch.context() as patch:
        for key, value in api_env.items():
            patch.setenv(key, value)
        keys = {key.name: key for key in get_settings().api_keys}
    assert keys["workers"].sha256 == hashlib.sha256(worker_key.encode()).hexdigest()
    assert set(keys["workers"].scopes) == {"worker"} and "viewer" in keys
    with pytest.raises(helm.HelmError, match="workerApiKey"):
        render({"workerDataAccess": "http"})


def test_metrics_files_stay_on_each_pods_local_disk() -> None:
    """prometheus_client's multiprocess files are memory-mapped: an emptyDir per pod, never the shared volume."""
    objects = render({"workerGpu": {"enabled": True}})
    (config,) = _by_kind(objects, "ConfigMap").values()
    folder = config["data"]["INFERGATE_METRICS_DIR"]
    assert not folder.startswith("/data")
    for name, spec in _pod_specs(objects):
        if name.endswith("-migrate"):
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
            assert "emptyDir" in volumes[mount["name"]], name


def test_migration_runs_as_a_hook_before_install_and_upgrade() -> None:
    objects = render()
    (job,) = _by_kind(objects, "Job").values()
    hooks = job["metadata"]["annotations"]
    assert set(hooks["helm.sh/hook"].split(",")) == {"pre-install", "pre-upgrade"}
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["infergate", "db", "upgrade"]
    ref = container["env"][0]["valueFrom"]["secretKeyRef"]
    # a pre-install hook runs before the release's Secret exists: the one it reads must be an earlier hook
    secret = _by_kind(objects, "Secret")[ref["name"]]
    assert set(secret["metadata"]["annotations"]["helm.sh/hook"].split(",")) >= {"pre-install", "pre-upgrade"}
    assert int(secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(hooks["helm.sh/hook-weight"])
    assert secret["stringData"][ref["key"]] == REQUIRED["secrets"]["databaseUrl"]
    assert not _by_kind(render({"migrate": {"enabled": False}}), "Job")


def test_an_existing_secret_replaces_the_chart_secret() -> None:
    objects = render({"secrets": {"existingSecret": "infergate-vault"}}, required=False)
    assert not _by_kind(objects, "Secret")
    for _, spec in _pod_specs(objects):
        for container in spec["containers"]:
            refs = [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]
            refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e]
            assert refs == ["infergate-vault"], container["name"]


def test_prometheus_annotations_name_the_metrics_ports() -> None:
    objects = render({"workerGpu": {"enabled": True}})
    (config,) = _by_kind(objects, "ConfigMap").values()
    expected = {"node": config["data"]["INFERGATE_API_PORT"], "worker": config["data"]["INFERGATE_WORKER_METRICS_PORT"]}
    for name, deployment in _by_kind(objects, "Deployment").items():
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        ports = {str(p["containerPort"]) for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert annotations["prometheus.io/port"] in ports, name
        role = "node" if name.endswith("-node") else "worker"
        assert annotations["prometheus.io/port"] == expected[role], name
        assert {"checksum/config", "checksum/secret"} <= set(annotations), f"{name}: settings changes must roll it"
    for deployment in _by_kind(render({"metrics": {"podAnnotations": False}}), "Deployment").values():
        assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secrets": {"brokerUrl": "redis://redis:6379/0", "apiKeys": "x"}}, "secrets.databaseUrl is required"),
        ({"secrets": {"databaseUrl": "sqlite:////data/x.db", "brokerUrl": "redis://r", "apiKeys": "x"}}, "PostgreSQL"),
        ({"secrets": {"databaseUrl": "postgresql://db/x", "brokerUrl": "filesystem://", "apiKeys": "x"}}, "Redis"),
        ({"secrets": {"databaseUrl": "postgresql://db/x", "brokerUrl": "redis://r"}}, "needs authentication"),
        (_merge(REQUIRED, {"config": {"INFERGATE_DATA_DIR": "/srv"}}), "set by the chart"),
    ],
    ids=["no-database", "sqlite", "filesystem-broker", "no-authentication", "reserved-setting"],
)
def test_refuses_values_the_node_cannot_start_with(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values, required=False)


def test_chart_files_are_where_the_docs_say() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "infergate"
    version = re.search(r'^version = "([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    assert version and chart["appVersion"] == version[1], "appVersion is the default image tag: keep it in step"
    assert (CHART / "values.schema.json").is_file() and (CHART / "templates" / "NOTES.txt").is_file()
    assert Path(REPO_ROOT / "docs" / "deploy.md").read_text().count("docker/helm/infergate") >= 1
