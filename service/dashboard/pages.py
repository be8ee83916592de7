"""What the dashboard's server side hands out: one HTML shell, a fixed set of assets, and their headers.

The dashboard is a small ES-module app in ``static/`` that calls the REST API from the browser, with the
credential the operator types in (kept in ``sessionStorage``, sent in a header, never in a URL). The files
served here hold no data at all, so they need no authentication of their own and cannot leak a study:
every job, finding and preview the page shows comes through the API's own checks, as it would for any
other client. That is also why the page needs no template engine: the only values written into the shell
are where its assets are and which credentials the API accepts, so that it can ask for one before its
first request rather than provoke a 401 (each of which is a failed login in the audit trail).

Nothing is fetched from outside the node: no CDN, no web fonts. The Content-Security-Policy says so to
the browser as well, and forbids inline script, so that a job's error text could never run as code even
if a rendering bug put it into the page as HTML.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from string import Template
from typing import Literal

from infergate.config import Settings

#: The files under ``static/`` the server hands out, with their media types; nothing else is served, so a
#: request can never name a path of its own (no traversal to guard against).
ASSETS: Mapping[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "format.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SHELL = "index.html"

#: Self only, no inline script or style, no plugins, not framable. ``img-src blob:`` is for the preview,
#: which the page fetches with the credential header (an ``<img src>`` cannot send one) and shows from a
#: blob URL; ``form-action 'none'`` because the login form is handled by script and never submitted.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # for browsers that ignore frame-ancestors
    "Cache-Control": "no-cache",  # revalidate: an upgraded node must not run yesterday's script
}

AuthMethod = Literal["api_key", "bearer"]
#: The page is served at three depths; each names the asset folder relative to itself, so the dashboard
#: works unchanged behind a reverse proxy that mounts the node under a path prefix.
Page = Literal["index", "index/", "job"]
_ASSET_PREFIX: Mapping[Page, str] = {"index": "dashboard/static/", "index/": "static/", "job": "../static/"}


def auth_methods(settings: Settings) -> tuple[AuthMethod, ...]:
    """The credentials the REST API accepts, as the login box offers them; empty when it needs none.

    Read from ``settings`` exactly as :class:`service.api.auth.Authenticator` reads them, so the page asks
    for a credential precisely when the API will want one.
    """
    if not settings.auth_enabled:
        return ()
    methods: list[AuthMethod] = []
    if settings.api_keys or settings.api_keys_file is not None:
        methods.append("api_key")
    if settings.jwt_configured:
        methods.append("bearer")
    return tuple(methods)


@cache
def read_static(name: str) -> bytes:
    """The bytes of ``static/<name>``, read once per process from the installed package.

    Raises
    ------
    KeyError
        If ``name`` is neither the shell nor one of :data:`ASSETS`.
    """
    if name != SHELL and name not in ASSETS:
        raise KeyError(name)
    return resources.files("service.dashboard").joinpath("static", name).read_bytes()


def render_shell(page: Page, methods: Sequence[AuthMethod], version: str) -> str:
    """The HTML shell of ``page``: which assets to load, and which credentials to ask for.

    Parameters
    ----------
    page
        Where it is served: ``/dashboard``, ``/dashboard/`` or ``/dashboard/jobs/{id}``; decides the
        relative path of the assets.
    methods
        :func:`auth_methods`; empty hides the login box.
    version
        The node's version, shown in the header.

    Raises
    ------
    ValueError
        If ``page`` or a method is unknown.
    """
    if page not in _ASSET_PREFIX:
        raise ValueError(f'Argument "page" should be one of {", ".join(_ASSET_PREFIX)}, not {page!r}.')
    unknown = [method for method in methods if method not in ("api_key", "bearer")]
    if unknown:
        raise ValueError(f'Argument "methods" holds unknown authentication methods: {unknown}.')
    template = Template(read_static(SHELL).decode("utf-8"))
    return template.substitute(
        assets=html.escape(_ASSET_PREFIX[page], quote=True),
        auth=html.escape(" ".join(methods), quote=True),
        version=html.escape(version, quote=True),
    )
