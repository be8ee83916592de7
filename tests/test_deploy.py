"""Checks of the compose stack beyond the node itself: the GPU worker, scaling, the viewer and monitoring.

Docker does not run where the tests run, so, as in tests/test_compose.py, these checks stand in for a deploy:
the compose file against the Compose Specification (the ``compose-spec`` bindings of the Rust ``compose_spec``
parser, strict about unknown keys), Prometheus's targets against the services' ports, every PromQL expression
of the Grafana dashboard through a real PromQL parser (``promql-parser``) and against the node's metric names,
OHIF's configuration against the one tests/integration/test_ohif.py proves with OHIF, and the demo PACS's
auto-routing script in a real Orthanc.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.ohif_server import app_config
from tests.test_compose import COMPOSE_FILE, REPO_ROOT, _command, _environment, _instructions, _services

try:  # test dependencies (pyproject.toml, test group); a clear failure rather than a silent skip
    import promql_parser
    from compose_spec import PyCompose
except ImportError as exc:  # pragma: no cover - only without the test group installed
    raise ImportError(
        f"{exc.name} is missing: install the test group (pip install -e . --group test), which lists "
        "compose-spec and promql-parser"
    ) from exc

DOCKER = REPO_ROOT / "docker"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "infergate.json"
OHIF = DOCKER / "ohif"
GPU_DOCKERFILE = DOCKER / "worker-gpu.Dockerfile"
OPENAPI = REPO_ROOT / "openapi" / "openapi.json"

#: The node's metric families (name -> labels), as the metrics module defines them; a dashboard query that names
#: anything else shows "No data" forever.
METRICS: dict[str, set[str]] = {
    "infergate_instances_received_total": {"calling_ae", "sop_class"},
    "infergate_associations_total": {"calling_ae", "result"},
    "infergate_series_completed_total": set(),
    "infergate_jobs": {"state", "model"},
    "infergate_queue_depth": set(),
    "infergate_stage_seconds": {"stage", "model"},
    "infergate_export_failures_total": {"destination", "status"},
    "infergate_inference_provider": {"model", "provider"},
    "infergate_storage_free_bytes": set(),
}
HISTOGRAMS = {"infergate_stage_seconds"}
#: Series names a query may select: every family, and the _bucket/_sum/_count series of the histograms.
SELECTABLE = {
    name: family
    for family in METRICS
    for name in ([f"{family}_bucket", f"{family}_sum", f"{family}_count"] if family in HISTOGRAMS else [family])
}
#: The TensorRT minor release each onnxruntime-gpu minor release is built against (ONNX Runtime's TensorRT
#: execution provider requirements table); the GPU image must pin a matching pair.
ORT_TENSORRT = {"1.18": "10.0", "1.19": "10.2", "1.20": "10.4", "1.21": "10.8", "1.22": "10.9"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return _services(compose)


def _running(services: dict[str, dict[str, Any]], subcommand: str) -> list[str]:
    """Names of the services whose command is ``infergate <subcommand>``."""
    return sorted(name for name, spec in services.items() if _command(spec)[:2] == ["infergate", subcommand])


def _networks(service: dict[str, Any]) -> set[str]:
    networks = service.get("networks") or ["default"]
    return set(networks if isinstance(networks, list) else networks)


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> file or folder of the repository, for a service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes") or []:
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            mounts[target] = (REPO_ROOT / source).resolve()
    return mounts


# The compose file as a whole ---------------------------------------------------------------------------------


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    """Unknown keys (a misspelt ``capabilites``, ``intervall``) and wrong types fail here, not at deploy time.

    The parser lacks YAML merge keys (``<<``), which Compose supports; PyYAML resolves them first.
    """
    parsed = PyCompose.from_json(json.dumps(compose))
    assert set(parsed.service_names()) == set(compose["services"])


def test_images_pulled_from_registries_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, spec in services.items():
        if "build" in spec:
            continue
        image = str(spec["image"])
        tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
        assert tag and tag != "latest", f"{name}: {image} should name a version"


def test_redis_keeps_its_append_only_file(services: dict[str, dict[str, Any]]) -> None:
    """Queued job messages survive a Redis restart only with AOF persistence on its own volume."""
    command = _command(services["redis"])
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(volume).endswith(":/data") for volume in services["redis"]["volumes"])


def test_workers_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    """``docker compose up --scale worker=N`` needs replicas that are alike: no fixed name, no host port."""
    workers = _running(services, "worker")
    assert workers == ["worker", "worker-gpu"]
    for name in workers:
        assert "container_name" not in services[name], f"{name}: a container_name allows one replica only"
        assert not services[name].get("ports"), f"{name}: a published port allows one replica per host"
        assert "hostname" not in services[name], name


def test_gpu_worker_reserves_gpus_and_runs_the_gpu_image(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and d["capabilities"] == ["gpu"] for d in devices), devices
    assert gpu["profiles"] == ["gpu"]
    assert Path(gpu["build"]["dockerfile"]).resolve() == GPU_DOCKERFILE
    assert _environment(gpu)["INFERGATE_ONNX_PROVIDERS"] == "auto"
    # the engine cache the image points ONNX Runtime at is a volume, so engines outlive the container
    cache = re.search(r"ORT_TENSORRT_CACHE_PATH=(\S+)", GPU_DOCKERFILE.read_text())
    assert cache and any(str(volume).split(":")[1] == cache[1] for volume in gpu["volumes"])


def test_gpu_image_pins_a_matching_cuda_onnxruntime_and_tensorrt() -> None:
    instructions = list(_instructions(GPU_DOCKERFILE))
    (base,) = [args for keyword, args in instructions if keyword == "FROM"]
    match = re.fullmatch(r"nvidia/cuda:12\.(\d+)\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", base)
    assert match, f"the GPU image should start from a CUDA 12 runtime image with cuDNN, not {base}"
    args = dict(args.split("=", 1) for keyword, args in instructions if keyword == "ARG" and "=" in args)
    ort, trt = args["ONNXRUNTIME_GPU_VERSION"], args["TENSORRT_VERSION"]
    ort_minor = ".".join(ort.split(".")[:2])
    assert ORT_TENSORRT.get(ort_minor) == ".".join(trt.split(".")[:2]), (
        f"onnxruntime-gpu {ort} is built against TensorRT {ORT_TENSORRT.get(ort_minor)}, not {trt}"
    )
    assert int(match[1]) <= 8, "TensorRT 10.9 and onnxruntime-gpu 1.22 support CUDA 12.0 to 12.8"
    text = GPU_DOCKERFILE.read_text()
    assert "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" in text
    assert '"tensorrt-cu12-libs==${TENSORRT_VERSION}"' in text


# Prometheus ------------------------------------------------------------------------------------------------


def _scrape_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def test_prometheus_finds_the_api_and_every_worker_replica(services: dict[str, dict[str, Any]]) -> None:
    """DNS service discovery on the service names: each resolves to every replica's address."""
    prometheus = services["prometheus"]
    assert _bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"] == PROMETHEUS_CONFIG
    assert "--config.file=/etc/prometheus/prometheus.yml" in _command(prometheus)
    targets: dict[str, tuple[str, int, str]] = {}
    for name, job in _scrape_jobs().items():
        assert not job.get("static_configs"), f"{name}: static targets miss scaled replicas"
        for sd in job["dns_sd_configs"]:
            assert sd["type"] == "A"
            for host in sd["names"]:
                targets[host] = (name, int(sd["port"]), job.get("metrics_path", "/metrics"))
    (api,) = _running(services, "api")
    assert targets[api][1:] == (int(_environment(services[api])["INFERGATE_API_PORT"]), "/metrics")
    for worker in _running(services, "worker"):
        port = int(_environment(services[worker])["INFERGATE_WORKER_METRICS_PORT"])
        assert targets[worker][1:] == (port, "/metrics"), worker
    for host in targets:
        assert host in services, f"Prometheus looks up {host}, which is no compose service"
        assert _networks(services[host]) & _networks(prometheus), f"Prometheus cannot reach {host}"


def test_every_process_metrics_are_counted_once(services: dict[str, dict[str, Any]]) -> None:
    """The API's /metrics adds up every process writing into the shared DATA_DIR/metrics (SCP, API, watcher);
    a worker scraped on its own port must keep its files elsewhere, or its values would count twice."""
    for name in (*_running(services, "scp"), *_running(services, "api")):
        env = _environment(services[name])
        assert "INFERGATE_METRICS_DIR" not in env and not env.get("INFERGATE_WORKER_METRICS_PORT"), name
    for name in _running(services, "worker"):
        env = _environment(services[name])
        assert int(env["INFERGATE_WORKER_METRICS_PORT"]) > 0, name
        folder = Path(env["INFERGATE_METRICS_DIR"])
        assert not folder.is_relative_to(env["INFERGATE_DATA_DIR"]), f"{name}: {folder} is on the shared volume"


# Grafana ---------------------------------------------------------------------------------------------------


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, variables substituted."""
    variables = {item["name"]: item for item in dashboard["templating"]["list"]}
    substitutes = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h", **dict.fromkeys(variables, ".*")}

    def substitute(expr: str) -> str:
        def one(match: re.Match[str]) -> str:
            name = match[1] or match[2]
            assert name in substitutes, f"unknown dashboard variable ${name} in {expr}"
            return substitutes[name]

        return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)

    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield f'panel "{panel["title"]}" {target["refId"]}', substitute(target["expr"])
    for name, item in variables.items():
        if item["type"] == "query":
            query = item["query"]["query"] if isinstance(item["query"], dict) else item["query"]
            call = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert call, f"variable {name}: {query}"
            yield f"variable {name}", substitute(call[1])


def _selectors(expr: str) -> list[Any]:
    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = _bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()  # type: ignore[union-attr]
    assert host in services and _networks(services[host]) & _networks(grafana)
    assert any(str(p).endswith(f":{port}") for p in services[host]["ports"])
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "infergate.yml").read_text())["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]


def test_dashboard_queries_parse_and_use_only_the_node_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for where, expr in _queries(dashboard):
        try:
            selectors = _selectors(expr)
        except ValueError as exc:
            raise AssertionError(f"{where}: not PromQL: {expr} ({exc})") from exc
        assert selectors, f"{where}: selects no metric: {expr}"
        for selector in selectors:
            assert selector.name in SELECTABLE, f"{where}: {selector.name} is not one of the node's metrics"
            family = SELECTABLE[selector.name]
            labels = {m.name for m in selector.matchers.matchers} - {"__name__"}
            assert labels <= METRICS[family], f"{where}: {family} has no label {labels - METRICS[family]}"
            used.add(family)
    assert used == set(METRICS), f"no panel shows {sorted(set(METRICS) - used)}"


def test_dashboard_shows_stage_p50_and_p95_from_the_histogram() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    quantiles = set()
    for where, expr in _queries(dashboard):
        if "infergate_stage_seconds" not in expr:
            continue
        call = re.fullmatch(r"histogram_quantile\((0\.\d+), sum by \(le, stage\) \(rate\((.+)\)\)\)", expr)
        assert call, f"{where}: quantiles need histogram_quantile over summed _bucket rates by le: {expr}"
        assert call[2].startswith("infergate_stage_seconds_bucket"), where
        quantiles.add(call[1])
    assert quantiles == {"0.5", "0.95"}


def test_dashboard_layout_is_valid() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard))
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] >= 1 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f'panel "{panel["title"]}" overlaps another'
        cells |= area
    assert dashboard["uid"] and dashboard["title"]


# OHIF ------------------------------------------------------------------------------------------------------


def _ohif_config(origin: str) -> dict[str, Any]:
    """docker/ohif/app-config.js evaluated by Node.js as the browser would, opened at ``origin``."""
    node = shutil.which("node")
    assert node, "Node.js is needed to evaluate OHIF's app-config.js (Debian nodejs; scripts/test.sh installs npm)"
    script = (
        "const vm = require('vm'), fs = require('fs');"
        "const sandbox = {window: {location: {origin: process.argv[2]}}};"
        "vm.runInNewContext(fs.readFileSync(process.argv[1], 'utf8'), sandbox);"
        "process.stdout.write(JSON.stringify(sandbox.window.config));"
    )
    done = subprocess.run(
        [node, "-e", script, str(OHIF / "app-config.js"), origin], capture_output=True, text=True, check=True
    )
    return dict(json.loads(done.stdout))


def test_ohif_configuration_is_the_one_proven_with_ohif() -> None:
    """Same data source as tests/helpers/ohif_server.py's app_config(), on the viewer's own origin."""
    for origin in ("http://127.0.0.1:3000", "https://viewer.example.org"):
        assert _ohif_config(origin) == app_config(f"{origin}/dicomweb")


def test_ohif_proxy_reaches_the_node_dicomweb(services: dict[str, dict[str, Any]]) -> None:
    """nginx forwards /dicomweb/ (the node's DICOMweb prefix) to the api service with the read-only key."""
    assert any(path.startswith("/dicomweb/studies") for path in json.loads(OPENAPI.read_text())["paths"])
    template = (OHIF / "nginx.conf.template").read_text()
    location = re.search(r"location /dicomweb/ \{(.*?)\n    \}", template, re.S)
    assert location, "no location /dicomweb/ in nginx.conf.template"
    body = location[1]
    assert re.search(r"limit_except GET \{\s*deny all;\s*\}", body), "the proxy should pass reads only"
    assert re.search(r"set \$node_api \$\{NODE_API_URL\};", body) and "proxy_pass $node_api;" in body
    assert "proxy_set_header Host $http_host;" in body
    assert "include /etc/nginx/infergate/api-key.conf;" in body
    ohif = services["ohif"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", _environment(ohif)["NODE_API_URL"]).groups()  # type: ignore[union-attr]
    assert _running(services, "api") == [host]
    assert int(port) == int(_environment(services[host])["INFERGATE_API_PORT"])
    assert _networks(ohif) & _networks(services[host]), "OHIF cannot reach the API"
    assert "OHIF_API_KEY" in _environment(ohif)
    dockerfile = (DOCKER / "ohif.Dockerfile").read_text()
    assert "COPY docker/ohif/nginx.conf.template /etc/nginx/templates/default.conf.template" in dockerfile
    assert "COPY docker/ohif/app-config.js /usr/share/nginx/html/app-config.js" in dockerfile
    assert "/docker-entrypoint.d/" in dockerfile
    version = re.search(r"ARG OHIF_VERSION=(\S+)", dockerfile)
    fetch = re.search(
        r'version="\$\{OHIF_VERSION:-([^}]+)\}"', (REPO_ROOT / "scripts" / "ohif" / "fetch.sh").read_text()
    )
    assert version and fetch and version[1] == fetch[1], "the image should serve the OHIF release the tests prove"


@pytest.mark.parametrize(
    ("env", "written"),
    [
        ({"OHIF_API_KEY": "k3y_-abcDEF0123456789"}, 'proxy_set_header X-API-Key "k3y_-abcDEF0123456789";\n'),
        ({"OHIF_API_KEY_FILE": "{tmp}/secret"}, 'proxy_set_header X-API-Key "from-a-file";\n'),
        ({}, None),
        ({"OHIF_API_KEY": 'key"; deny all; #'}, None),
    ],
    ids=["variable", "file", "missing", "unsafe"],
)
def test_ohif_key_script(tmp_path: Path, env: dict[str, str], written: str | None) -> None:
    (tmp_path / "secret").write_text("from-a-file")
    env = {key: value.replace("{tmp}", str(tmp_path)) for key, value in env.items()}
    done = subprocess.run(
        ["sh", str(OHIF / "api-key.sh")],
        env={"PATH": "/usr/bin:/bin", "OHIF_NGINX_INCLUDE_DIR": str(tmp_path / "inc"), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    output = tmp_path / "inc" / "api-key.conf"
    if written is None:
        assert done.returncode == 1 and "ohif:" in done.stderr and not output.exists()
    else:
        assert done.returncode == 0, done.stderr
        assert output.read_text() == written
        assert output.stat().st_mode & 0o077 == 0, "the key file should be readable by its owner only"


# The demo PACS's auto-routing in a real Orthanc ------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_demo_pacs_routes_ct_and_mr_but_never_results_or_the_node_itself(tmp_path: Path) -> None:
    """docker/orthanc/autoroute.lua in Orthanc (Debian's 1.10): CT and MR go to the node; SEG, SR, other
    modalities and anything the node itself sent stay in the PACS."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    from tests.data.make_series import write_ct_series
    from tests.helpers.peers import LOOPBACK, Orthanc, free_port, run_storescu

    lua = (DOCKER / "orthanc" / "autoroute.lua").read_text()
    node_modality = re.search(r"NODE_MODALITY = '([^']+)'", lua)[1]  # type: ignore[index]
    node_aet = re.search(r"NODE_AET = '([^']+)'", lua)[1]  # type: ignore[index]

    received: list[str] = []
    lock = threading.Lock()

    def handle_store(event: Any) -> int:
        with lock:
            received.append(str(event.dataset.Modality))
        return 0x0000

    ae = AE(ae_title=node_aet)
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server((LOOPBACK, port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        series = write_ct_series(tmp_path / "ct", slices=2, size=16)
        first = sorted(series.folder.iterdir())[0]
        outgoing = {"PACS": tmp_path / "from-modality", node_aet: tmp_path / "from-node"}
        for folder in outgoing.values():
            folder.mkdir()
        # one image per (sender, modality); Orthanc routes on the Modality tag and the calling AE only
        for sender, modality in [
            ("PACS", "CT"),
            ("PACS", "MR"),
            ("PACS", "SEG"),
            ("PACS", "SR"),
            ("PACS", "CR"),
            (node_aet, "CT"),
            (node_aet, "SEG"),
        ]:
            ds = dcmread(first)
            ds.Modality = modality
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = generate_uid()
            ds.save_as(outgoing[sender] / f"{modality}.dcm")
        with Orthanc(
            tmp_path / "orthanc",
            modalities={node_modality: [node_aet, LOOPBACK, port]},
            extra_config={"LuaScripts": [str(DOCKER / "orthanc" / "autoroute.lua")]},
            dicomweb=False,
        ) as pacs:
            for sender, folder in outgoing.items():
                sent = run_storescu(folder, port=pacs.dicom_port, aet=sender, aec=pacs.aet)
                assert sent.returncode == 0, sent.stderr
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(received) < 2:
                time.sleep(0.1)
            time.sleep(2.0)  # anything routed by mistake arrives within this
            log = pacs.log_text()
    finally:
        server.shutdown()
    assert sorted(received) == ["CT", "MR"], f"routed {received}\n{log[-4000:]}"


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ohif_nginx_serves_the_viewer_and_reads_the_node_with_its_key(tmp_path: Path) -> None:
    """docker/ohif's nginx configuration in a real nginx (Debian's), in front of a node that enforces API keys:
    reads pass with the key nginx adds, writes are refused at the proxy, the page gets its isolation headers.

    The template is rendered as the image's entrypoint does (``${NODE_API_URL}``), moved onto loopback ports and
    a temporary folder; the browser side (OHIF listing and opening the study) is tests/integration/test_ohif.py,
    with the configuration test_ohif_configuration_is_the_one_proven_with_ohif compares.
    """
    import getpass
    import hashlib
    import urllib.error
    import urllib.request

    from tests.data.make_series import write_ct_series
    from tests.helpers.node import NodeProcess, node_env, wait_for_http
    from tests.helpers.peers import LOOPBACK, free_port, run_storescu, wait_for_port

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is needed (Debian nginx-core; scripts/test.sh installs it)"
    key = "viewer-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:32]
    scp_port, api_port, web_port = free_port(), free_port(), free_port()
    site = tmp_path / "html"
    site.mkdir()
    (site / "index.html").write_text("<!doctype html><title>OHIF</title>")
    shutil.copy(OHIF / "app-config.js", site / "app-config.js")
    template = (OHIF / "nginx.conf.template").read_text()
    rendered = (
        template.replace("${NODE_API_URL}", f"http://{LOOPBACK}:{api_port}")
        .replace("listen 80;", f"listen {LOOPBACK}:{web_port};")
        .replace("listen [::]:80;", "")
        .replace("root /usr/share/nginx/html;", f"root {site};")
        .replace("include /etc/nginx/infergate/api-key.conf;", f"include {tmp_path}/inc/api-key.conf;")
    )
    assert "${" not in rendered
    (tmp_path / "server.conf").write_text(rendered)
    subprocess.run(
        ["sh", str(OHIF / "api-key.sh")],
        env={"PATH": "/usr/bin:/bin", "OHIF_API_KEY": key, "OHIF_NGINX_INCLUDE_DIR": str(tmp_path / "inc")},
        check=True,
    )
    temp = " ".join(
        f"{kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        # workers as this user: the default (nobody) cannot read pytest's private temporary folder
        f"user {getpass.getuser()}; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log; daemon off;\n"
        "worker_processes 1;\n"
        "events {}\n"
        f"http {{ include /etc/nginx/mime.types; default_type application/octet-stream; "
        f"access_log off; {temp} include {tmp_path}/server.conf; }}\n"
    )
    checked = subprocess.run([nginx, "-t", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr

    def get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
        request = urllib.request.Request(url, method=method, headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as answer:
                return answer.status, answer.read(), answer.headers
        except urllib.error.HTTPError as error:
            return error.code, error.read(), error.headers

    digest = hashlib.sha256(key.encode()).hexdigest()
    env = node_env(data_dir=tmp_path / "var", scp_port=scp_port, api_port=api_port, api_keys=f"ohif:{digest}:read")
    node = NodeProcess(["up"], env, tmp_path / "up.log").start()
    proxy = subprocess.Popen([nginx, "-c", str(tmp_path / "nginx.conf")], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(LOOPBACK, scp_port, timeout=60)
        wait_for_http(f"http://{LOOPBACK}:{api_port}/health", timeout=60)
        wait_for_port(LOOPBACK, web_port, timeout=10)
        series = write_ct_series(tmp_path / "ct", slices=2, size=16)
        sent = run_storescu(series.folder, port=scp_port, aec="INFERGATE")
        assert sent.returncode == 0, sent.stderr
        query = f"/dicomweb/studies?StudyInstanceUID={series.study_uid}"
        assert get(f"http://{LOOPBACK}:{api_port}{query}")[0] == 401, "the node itself wants a key"
        status, body, headers = get(f"http://{LOOPBACK}:{web_port}{query}")
        assert status == 200, body[:500]
        (study,) = json.loads(body)
        assert study["0020000D"]["Value"] == [series.study_uid]
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        # the node builds links from the Host header nginx passes on: they lead back through the proxy
        status, body, _ = get(f"http://{LOOPBACK}:{web_port}/dicomweb/studies/{series.study_uid}/series")
        assert status == 200 and f"http://{LOOPBACK}:{web_port}/dicomweb/studies/" in body.decode()
        assert get(f"http://{LOOPBACK}:{web_port}/dicomweb/studies", method="POST")[0] == 403
        status, body, headers = get(f"http://{LOOPBACK}:{web_port}/viewer?StudyInstanceUIDs={series.study_uid}")
        assert status == 200 and b"<title>OHIF</title>" in body, "client-side routes get index.html"
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        status, body, headers = get(f"http://{LOOPBACK}:{web_port}/app-config.js")
        assert status == 200 and b"window.config" in body and headers["Cache-Control"] == "no-cache"
    finally:
        proxy.terminate()
        proxy.wait(10)
        node.stop()
