"""``python -m service.api``: the REST API under uvicorn."""

from __future__ import annotations

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from infergate import metrics
from infergate.config import get_settings
from infergate.logs import setup_logging
from service.api.app import create_app


def main() -> int:
    settings = get_settings()
    setup_logging(settings, "api")
    metrics.enable(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_keep_alive=max(1, round(settings.api_keepalive_seconds)),
        # JSON lines: uvicorn's loggers go through the root handler rather than uvicorn's own text one.
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
