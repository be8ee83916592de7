"""``/dashboard``: the operators' web page, outside the OpenAPI document (it is no API).

The routes are open, like ``/health``: they serve files that hold no data (see :mod:`service.dashboard.pages`),
and the page's script then authenticates to the API with the operator's credential.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import HTMLResponse

from infergate import __version__
from service.api.deps import SettingsDep
from service.api.schemas import RowId
from service.dashboard.pages import ASSETS, SECURITY_HEADERS, Page, auth_methods, read_static, render_shell

router = APIRouter(prefix="/dashboard", include_in_schema=False)


def _shell(page: Page, settings: SettingsDep) -> HTMLResponse:
    return HTMLResponse(render_shell(page, auth_methods(settings), __version__), headers=dict(SECURITY_HEADERS))


@router.get("")
def dashboard(settings: SettingsDep) -> HTMLResponse:
    """Recent studies and jobs, filtered and refreshed by the page's script."""
    return _shell("index", settings)


@router.get("/")
def dashboard_slash(settings: SettingsDep) -> HTMLResponse:
    """The same page with a trailing slash (the API does not redirect slashes)."""
    return _shell("index/", settings)


@router.get("/jobs/{job_id}")
def dashboard_job(job_id: RowId, settings: SettingsDep) -> HTMLResponse:
    """One job's page; the script reads the id from the URL and fetches the job itself."""
    return _shell("job", settings)


@router.get("/static/{name}")
def dashboard_asset(name: str) -> Response:
    """One of the page's scripts or its style sheet; any other name is 404."""
    media_type = ASSETS.get(name)
    if media_type is None:
        return Response("Not found", status_code=404, media_type="text/plain", headers=dict(SECURITY_HEADERS))
    return Response(read_static(name), media_type=media_type, headers=dict(SECURITY_HEADERS))
