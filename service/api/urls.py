"""Absolute URLs the API hands out (RetrieveURL, BulkDataURI, result links).

Behind a reverse proxy, or with clients that leave the port out of ``Host``, the request's own
address is not the one other systems can reach; ``INFERGATE_PUBLIC_BASE_URL`` names that address
once, and every URL the API writes starts with it.
"""

from __future__ import annotations

from fastapi import Request

from infergate.config import Settings


def public_base(request: Request) -> str:
    """The API's root as clients reach it, without a trailing slash."""
    settings: Settings = request.app.state.settings
    if settings.public_base_url:
        return settings.public_base_url
    return str(request.base_url).rstrip("/")


def public_url(request: Request, name: str, **path_params: str) -> str:
    """The absolute URL of the route called ``name`` (its function name) with ``path_params``."""
    return public_base(request) + str(request.app.url_path_for(name, **path_params))
