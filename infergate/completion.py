"""Series completion and routing: from "quiet for N seconds" to queued jobs.

There is no end-of-series signal in DICOM, so a series counts as complete once no instance has
arrived for ``series_quiet_seconds`` (Orthanc's ``StableAge``, mercure's completion timer). The
state lives in SQL, so a series received before a crash is routed after the restart, and the
claim is a guarded ``UPDATE`` so that several watchers never route a series twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from infergate import metrics
from infergate.jobs import JobSender
from infergate.manifest import ModelPackage
from infergate.routing import RoutingRules, SeriesFacts
from infergate.store import queries
from infergate.store.tables import Series, SeriesState, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutedSeries:
    series_id: int
    models: list[str]
    job_ids: list[int]


def facts_of(series: Series, findings: dict[str, str] | None = None) -> SeriesFacts:
    image_type = tuple(v for v in (series.image_type or "").split("\\") if v)
    return SeriesFacts(
        modality=series.modality,
        body_part_examined=series.body_part_examined,
        series_description=series.series_description,
        image_type=image_type,
        num_instances=series.num_instances,
        calling_ae=series.calling_ae,
        called_ae=series.called_ae,
        findings=findings or {},
    )


def route_series(
    session: Session,
    series_id: int,
    *,
    quiet: timedelta,
    rules: RoutingRules,
    packages: dict[str, ModelPackage],
) -> RoutedSeries | None:
    """Claim one quiet series and create its jobs; None if another watcher took it or it is not quiet."""
    series = session.get(Series, series_id)
    if series is None:
        return None
    models, rule_names = rules.route(facts_of(series))
    installed = [m for m in models if m in packages]
    missing = sorted(set(models) - set(installed))
    if installed:
        note = f"matched {', '.join(rule_names)}"
    elif models:
        note = f"matched {', '.join(rule_names)} but models not installed: {', '.join(missing)}"
    else:
        note = "no routing rule matched"
    state = SeriesState.routed if installed else SeriesState.unmatched
    if not queries.claim_series(session, series_id, utcnow() - quiet, state, note):
        return None
    job_ids = []
    for model_id in installed:
        job_id = queries.create_job(session, series_id, model_id, packages[model_id].manifest.version)
        if job_id is not None:
            job_ids.append(job_id)
    return RoutedSeries(series_id=series_id, models=installed, job_ids=job_ids)


def complete_quiet_series(
    factory: sessionmaker[Session],
    queue: JobSender,
    *,
    quiet: timedelta,
    rules: RoutingRules,
    packages: dict[str, ModelPackage],
) -> list[RoutedSeries]:
    """Route every series quiet for longer than ``quiet`` and enqueue the new jobs.

    Jobs are committed before they are sent, so a broker that is down loses nothing: the jobs stay
    ``queued`` in SQL and the reconciler sends them once the broker is back.
    """
    with factory() as session:
        candidates = queries.quiet_series_ids(session, utcnow() - quiet)
    routed: list[RoutedSeries] = []
    for series_id in candidates:
        with factory() as session, session.begin():
            result = route_series(session, series_id, quiet=quiet, rules=rules, packages=packages)
        if result is None:
            continue
        routed.append(result)
        metrics.series_completed()  # counted once committed: the claim makes it once per series
        log.info("series %d complete: models %s, jobs %s", series_id, result.models or "none", result.job_ids)
        for job_id in result.job_ids:
            try:
                queue.send_run(job_id)
            except Exception as exc:  # noqa: BLE001 - any broker failure: the reconciler re-sends
                log.warning("could not enqueue job %d (%s); the reconciler will retry", job_id, type(exc).__name__)
    return routed


def route_followups(
    session: Session, series_id: int, *, rules: RoutingRules, packages: dict[str, ModelPackage]
) -> list[int]:
    """Create the jobs that rules waiting for findings now call for; returns the new job ids.

    Called by the worker after a classification job of the series finished, so that e.g. only
    series classified as T1-weighted go on to brain extraction. Existing (series, model) jobs are
    never duplicated.
    """
    series = session.get(Series, series_id)
    if series is None or series.state == SeriesState.receiving:
        return []
    models, _ = rules.route(facts_of(series, queries.top_findings(session, series_id)))
    job_ids = []
    for model_id in models:
        if model_id in packages:
            job_id = queries.create_job(session, series_id, model_id, packages[model_id].manifest.version)
            if job_id is not None:
                job_ids.append(job_id)
    return job_ids
