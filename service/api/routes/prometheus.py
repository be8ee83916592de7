"""``GET /metrics``: the node's Prometheus metrics (every process's, added up, and the SQL gauges).

It is protected like every other GET route: open while the API binds loopback without authentication,
otherwise it needs a credential with the ``read`` scope. The metrics hold no patient data, but AE
titles, destinations and job counts describe the hospital's network and workload, so an API that
checks credentials does not publish them to whoever can reach its port. Prometheus sends the
credential with ``authorization`` (a bearer token) or ``http_headers`` (``X-API-Key``) in its scrape
configuration (docs/observability.md).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from infergate import metrics
from service.api.deps import SettingsDep

router = APIRouter(tags=["observability"])

#: The text format every Prometheus reads (what prometheus_client answers a scraper that asks for nothing newer).
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition format 0.0.4.", "content": {"text/plain": {}}}},
)
def get_metrics(request: Request, settings: SettingsDep) -> Response:
    """Prometheus metrics of the node (docs/observability.md lists them)."""
    body = metrics.render(settings, request.app.state.session_factory)
    return Response(body, media_type=TEXT_0_0_4)
