"""OHIF's prebuilt viewer, fetched from npm and served from its own origin with a DICOMweb data source.

:func:`fetch_ohif` runs ``scripts/ohif/fetch.sh`` (``npm pack @ohif/app@<version>``, cached in
``.cache/ohif/<version>/dist``). :class:`OhifServer` serves that folder on loopback as a static site with the
single-page-app fallback OHIF needs (``/viewer?StudyInstanceUIDs=…`` is a client-side route, answered with
``index.html``) and replaces the shipped ``app-config.js`` with one whose only data source is the node's
DICOMweb. The viewer then calls the node cross-origin, as a hospital deployment does, so the node must list
this server's :attr:`~OhifServer.origin` in ``INFERGATE_CORS_ORIGINS``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = ["OHIF_VERSION", "OhifServer", "app_config", "app_config_js", "fetch_ohif"]

log = logging.getLogger(__name__)

#: The ``@ohif/app`` release whose ``dist/`` is served; ``scripts/ohif/fetch.sh`` pins the same one.
OHIF_VERSION = "3.13.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "ohif" / "fetch.sh"

#: Explicit types for what the bundle loads: module scripts and WebAssembly are refused by the browser
#: under a wrong type, whatever the platform's mime.types says.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".map": "application/json",
}


def fetch_ohif(version: str = OHIF_VERSION, timeout: float = 300.0) -> Path:
    """The ``dist`` folder of ``@ohif/app@version``, fetched with npm on first use.

    Raises
    ------
    RuntimeError
        If the fetch script fails (no npm, no registry); the message holds its output.
    """
    env = {**os.environ, "OHIF_VERSION": version}
    done = subprocess.run(
        ["bash", str(FETCH_SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{FETCH_SCRIPT} could not fetch @ohif/app@{version} (exit {done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    dist = Path(lines[-1])
    if not (dist / "index.html").is_file():
        raise RuntimeError(f"{FETCH_SCRIPT} printed {dist}, which holds no index.html.")
    return dist


def app_config(dicomweb_url: str) -> dict[str, Any]:
    """OHIF 3.13's ``window.config`` with one DICOMweb data source: the node at ``dicomweb_url``.

    The shape follows the ``app-config.js`` shipped in ``@ohif/app`` (``config/default.js``); only the data
    source differs. The node is a plain (not static) DICOMweb server: QIDO-RS honours ``includefield``, WADO-RS
    gives frames and bulk data, so thumbnails and images are both rendered from ``wadors`` frames.

    Raises
    ------
    ValueError
        If ``dicomweb_url`` is not an absolute http(s) URL.
    """
    url = urlsplit(dicomweb_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(
            f'Argument "dicomweb_url" should be an http(s) URL such as http://host:8000/dicomweb, got "{dicomweb_url}".'
        )
    root = dicomweb_url.rstrip("/")
    return {
        "routerBasename": None,
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 3,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "groupEnabledModesFirst": True,
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 25},
        "showErrorDetails": "always",
        "defaultDataSourceName": "infergate",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "infergate",
                "configuration": {
                    "friendlyName": "infergate node",
                    "name": "infergate",
                    "qidoRoot": root,
                    "wadoRoot": root,
                    "wadoUriRoot": root,
                    "qidoSupportsIncludeField": True,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "staticWado": False,
                    "bulkDataURI": {"enabled": True},
                    "omitQuotationForMultipartRequest": True,
                },
            }
        ],
    }


def app_config_js(dicomweb_url: str) -> bytes:
    """:func:`app_config` as the script OHIF's ``index.html`` loads first (JSON is valid JavaScript)."""
    body = json.dumps(app_config(dicomweb_url), indent=2)
    header = "/** @type {AppTypes.Config} */\n// Generated for infergate by tests/helpers/ohif_server.py\n"
    return f"{header}window.config = {body};\n".encode()


class _Handler(SimpleHTTPRequestHandler):
    """GET/HEAD of files under ``directory``; any other path is the app's ``index.html`` (SPA routes)."""

    config_js: bytes = b""

    def do_GET(self) -> None:
        self._send(head_only=False)

    def do_HEAD(self) -> None:
        self._send(head_only=True)

    def _send(self, *, head_only: bool) -> None:
        route = urlsplit(self.path).path
        if route == "/app-config.js":
            self._reply(self.config_js, _CONTENT_TYPES[".js"], head_only=head_only)
            return
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            path = Path(self.directory) / "index.html"
        content_type = _CONTENT_TYPES.get(path.suffix.lower()) or self.guess_type(str(path))
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            self._headers(content_type, size)
            if not head_only:
                shutil.copyfileobj(handle, self.wfile)

    def _reply(self, body: bytes, content_type: str, *, head_only: bool) -> None:
        self._headers(content_type, len(body))
        if not head_only:
            self.wfile.write(body)

    def _headers(self, content_type: str, length: int) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ohif server: " + format, *args)


class OhifServer:
    """OHIF's ``dist`` served on ``http://127.0.0.1:<port>`` in a background thread (a context manager).

    Parameters
    ----------
    dist
        The prebuilt app (see :func:`fetch_ohif`).
    dicomweb_url
        The node's DICOMweb root, e.g. ``http://127.0.0.1:8000/dicomweb``.
    port
        Loopback port to listen on; 0 picks a free one. The node's CORS setting must name the resulting
        :attr:`origin`, so choose the port before starting the node.
    """

    def __init__(self, dist: Path, dicomweb_url: str, port: int = 0) -> None:
        if not (Path(dist) / "index.html").is_file():
            raise ValueError(f'Argument "dist" should be OHIF\'s built app folder (with index.html), got "{dist}".')
        self.dist = Path(dist)
        handler = type("OhifHandler", (_Handler,), {"config_js": app_config_js(dicomweb_url)})

        def make_handler(*args: Any, **kwargs: Any) -> _Handler:
            return handler(*args, directory=str(self.dist), **kwargs)

        self._server = ThreadingHTTPServer(("127.0.0.1", port), make_handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        """The browser origin OHIF runs at; the node's ``INFERGATE_CORS_ORIGINS`` must list it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OhifServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
