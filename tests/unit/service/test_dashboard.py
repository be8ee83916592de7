"""The dashboard's server side (service.dashboard): the shell, its assets, their headers, and what ships.

The page's behaviour in a browser is tested in ``tests/integration/test_dashboard.py``; here are the parts
that need no browser: what the server hands out, with which headers, and that it fetches nothing from
outside the node.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from infergate import __version__
from infergate.config import Settings
from service.api.app import create_app
from service.dashboard.pages import (
    ASSETS,
    CONTENT_SECURITY_POLICY,
    SHELL,
    auth_methods,
    read_static,
    render_shell,
)
from tests.helpers.queues import RecordingQueue

REPO_ROOT = Path(__file__).resolve().parents[3]
STATIC = REPO_ROOT / "service" / "dashboard" / "static"
KEY = "dashboard-test-key"
KEYS = f"ops:{hashlib.sha256(KEY.encode()).hexdigest()}:read"
PAGES = ["/dashboard", "/dashboard/", "/dashboard/jobs/7"]


@pytest.fixture
def client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    """The API with an API key configured (the dashboard needs no database)."""
    with TestClient(create_app(make_settings(api_keys=KEYS), queue=RecordingQueue())) as test_client:
        yield test_client


def _auth_attribute(html: str) -> str:
    found = re.search(r'<body data-auth="([^"]*)">', html)
    assert found is not None, html
    return found.group(1)


@pytest.mark.parametrize("path", PAGES + [f"/dashboard/static/{name}" for name in ASSETS])
def test_every_dashboard_answer_carries_the_security_headers(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


def test_the_policy_allows_nothing_inline_and_nothing_foreign() -> None:
    directives = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no host
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert all("http" not in value and "*" not in value for value in directives.values())


def test_the_pages_are_open_while_the_api_wants_a_key(client: TestClient) -> None:
    """The shell holds no data, so it needs no credential; the API it calls does."""
    for path in PAGES:
        assert client.get(path).status_code == 200
    assert client.get("/api/v1/jobs").status_code == 401


def test_the_shell_asks_for_the_credentials_the_api_accepts(client: TestClient) -> None:
    html = client.get("/dashboard").text
    assert _auth_attribute(html) == "api_key"
    assert f"v{__version__}" in html
    assert KEY not in html and hashlib.sha256(KEY.encode()).hexdigest() not in html


@pytest.mark.parametrize(
    ("path", "prefix"),
    [("/dashboard", "dashboard/static/"), ("/dashboard/", "static/"), ("/dashboard/jobs/7", "../static/")],
)
def test_assets_are_linked_relative_to_each_page(client: TestClient, path: str, prefix: str) -> None:
    """Relative links resolve to /dashboard/static/ from every page, also under a proxy's path prefix."""
    html = client.get(path).text
    assert f'<script type="module" src="{prefix}app.js"></script>' in html
    assert f'href="{prefix}dashboard.css"' in html


def test_assets_have_their_media_types(client: TestClient) -> None:
    """With nosniff, a module script served as anything but JavaScript would not run."""
    assert client.get("/dashboard/static/app.js").headers["content-type"] == "text/javascript; charset=utf-8"
    assert client.get("/dashboard/static/dashboard.css").headers["content-type"] == "text/css; charset=utf-8"
    assert client.get("/dashboard").headers["content-type"] == "text/html; charset=utf-8"


@pytest.mark.parametrize("name", ["index.html", "pages.py", "__init__.py", "nothing.js"])
def test_only_the_listed_assets_are_served(client: TestClient, name: str) -> None:
    response = client.get(f"/dashboard/static/{name}")
    assert response.status_code == 404
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize("name", ["..%2Fpages.py", "%2E%2E%2Froutes.py", "..%2F..%2Fapi%2Fauth.py"])
def test_no_path_leads_out_of_the_assets(client: TestClient, name: str) -> None:
    response = client.get(f"/dashboard/static/{name}")
    assert response.status_code == 404
    assert b"import" not in response.content


def test_a_job_page_needs_a_job_id(client: TestClient) -> None:
    assert client.get("/dashboard/jobs/0").status_code == 422
    assert client.get("/dashboard/jobs/abc").status_code == 422


def test_the_dashboard_is_not_in_the_openapi_document(client: TestClient) -> None:
    paths: dict[str, Any] = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if path.startswith("/dashboard")]


def test_auth_methods_follow_the_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    assert auth_methods(make_settings()) == ()  # loopback, nothing configured: the API is open
    assert auth_methods(make_settings(api_keys=KEYS)) == ("api_key",)
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("[]")
    assert auth_methods(make_settings(api_keys_file=keys_file, auth_required=True)) == ("api_key",)
    jwks = tmp_path / "jwks.json"
    jwt = {"jwt_issuer": "https://idp.example.org", "jwt_audience": "infergate", "jwks_file": jwks}
    assert auth_methods(make_settings(**jwt)) == ("bearer",)
    assert auth_methods(make_settings(api_keys=KEYS, **jwt)) == ("api_key", "bearer")


def test_a_node_without_auth_renders_no_login(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(), queue=RecordingQueue())) as open_client:
        assert _auth_attribute(open_client.get("/dashboard").text) == ""


def test_render_shell_escapes_and_checks_its_arguments() -> None:
    html = render_shell("job", ["api_key", "bearer"], '1.0"><script>alert(1)</script>')
    assert "<script>alert(1)" not in html and "&quot;&gt;&lt;script&gt;" in html
    assert _auth_attribute(html) == "api_key bearer"
    with pytest.raises(ValueError, match='Argument "page"'):
        render_shell("other", [], "1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='Argument "methods"'):
        render_shell("index", ["cookie"], "1")  # type: ignore[list-item]
    with pytest.raises(KeyError):
        read_static("../pages.py")


def test_every_static_file_is_served_and_packaged() -> None:
    """A file added to static/ but not to ASSETS would 404; one the package data misses would be absent from a wheel."""
    on_disk = {path.name for path in STATIC.iterdir() if path.is_file()}
    assert on_disk == set(ASSETS) | {SHELL}
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["service.dashboard"]
    assert all(any(fnmatch(f"static/{name}", pattern) for pattern in patterns) for name in on_disk), patterns


def test_scripts_import_only_served_modules_and_nothing_foreign() -> None:
    """Nothing from a CDN or the internet; no inline script or style a strict policy would block."""
    for name in [*ASSETS, SHELL]:
        text = (STATIC / name).read_text()
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'`)]*", text)
        assert urls in ([], ["http://www.w3.org/2000/svg"]), (name, urls)  # the SVG namespace is no fetch
        assert "@import" not in text and "url(" not in text, name
        if name.endswith(".js"):
            for module in re.findall(r'from "([^"]+)"', text):
                assert module.startswith("./") and module[2:] in ASSETS, (name, module)
            assert "innerHTML" not in text and "eval(" not in text, name
    shell = (STATIC / SHELL).read_text()
    assert re.findall(r"<script\b[^>]*>", shell) == ['<script type="module" src="${assets}app.js">']
    assert "<style" not in shell and " style=" not in shell and " on" + "click=" not in shell
