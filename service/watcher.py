"""The watcher: turns quiet series into jobs, re-sends lost work and applies the retention policy.

It runs as a thread of ``infergate scp`` (or alone as ``infergate watcher``). Everything it does is
a guarded SQL update, so several watchers may run at once without routing a series twice or
removing one twice. Retention (:mod:`infergate.retention`) runs on a thread of its own, every
``INFERGATE_CLEANUP_INTERVAL_SECONDS`` while a ``INFERGATE_RETAIN_*_DAYS`` is set: a pass may
remove months of studies the first time, and must never hold up series completion meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from infergate.audit import Auditor
from infergate.catalog import Catalog, fingerprint, load_catalog
from infergate.completion import RoutedSeries, complete_quiet_series
from infergate.config import Settings
from infergate.errors import InfergateError
from infergate.jobs import JobSender
from infergate.reconcile import reconcile
from infergate.retention import CleanupReport, cutoffs, run_cleanup
from infergate.store.queries import oldest_receiving_at
from infergate.store.tables import utcnow

log = logging.getLogger(__name__)

_MIN_WAIT_SECONDS = 0.02
"""The shortest pause between passes, and how far past a series' quiet deadline it is claimed."""


class _RememberingSender:
    """The queue, remembering the jobs whose send failed so that they go out once the broker is back."""

    def __init__(self, queue: JobSender) -> None:
        self.queue = queue
        self.unsent: set[int] = set()

    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        try:
            self.queue.send_run(job_id, countdown)
        except Exception:
            self.unsent.add(job_id)
            raise
        self.unsent.discard(job_id)

    def send_export(self, job_id: int, countdown: float | None = None) -> None:
        self.queue.send_export(job_id, countdown)

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None:
        self.queue.send_retrieve(retrieval_id, countdown)


class Watcher:
    """Series completion and reconciliation on a timer."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        queue: JobSender,
        auditor: Auditor | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.auditor = auditor
        self.queue = _RememberingSender(queue)
        self._fingerprint = fingerprint(settings)
        self.catalog: Catalog = load_catalog(settings)
        self._last_reconcile = 0.0

    def refresh_catalog(self) -> None:
        """Reload models and rules when the models folder or the rules changed (``infergate models add``).

        A broken change is logged and the previous catalog kept, so routing never stops.
        """
        current = fingerprint(self.settings)
        if current == self._fingerprint:
            return
        self._fingerprint = current
        try:
            self.catalog = load_catalog(self.settings)
        except InfergateError as exc:
            log.error("models or routing rules changed but are invalid; keeping the previous ones: %s", exc)
            return
        log.info("reloaded %d models and %d routing rules", len(self.catalog.packages), len(self.catalog.rules.rules))

    def run_once(self) -> list[RoutedSeries]:
        self.refresh_catalog()
        routed = complete_quiet_series(
            self.factory,
            self.queue,
            quiet=timedelta(seconds=self.settings.series_quiet_seconds),
            rules=self.catalog.rules,
            packages=self.catalog.packages,
        )
        now = time.monotonic()
        # While sends fail (the broker is down) every tick tries again, so that the jobs waiting in
        # SQL go out within a tick of the broker's return rather than a reconcile period later.
        if self.queue.unsent or now - self._last_reconcile >= self.settings.reconcile_interval_seconds:
            self._last_reconcile = now
            report = reconcile(
                self.factory,
                self.queue,
                requeue_after=timedelta(seconds=self.settings.requeue_after_seconds),
                retrieval_lease=timedelta(seconds=self.settings.job_lease_seconds),
                unsent=sorted(self.queue.unsent),
            )
            self.queue.unsent = set(report.unsent)
        return routed

    def cleanup(self) -> CleanupReport | None:
        """One retention pass (None when retention is off): every delete is guarded, so watchers may race."""
        inputs_before, results_before = cutoffs(self.settings)
        if inputs_before is None and results_before is None:
            return None
        return run_cleanup(
            self.factory,
            self.settings.data_path,
            inputs_before=inputs_before,
            results_before=results_before,
            auditor=self.auditor,
        )

    def run_cleanup_loop(self, stop: threading.Event) -> None:
        """A retention pass now and every ``cleanup_interval_seconds`` until ``stop``; a failure is retried then."""
        while not stop.is_set():
            try:
                self.cleanup()
            except Exception:
                log.exception("retention pass failed; retrying in %.0f s", self.settings.cleanup_interval_seconds)
            stop.wait(self.settings.cleanup_interval_seconds)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; a failing pass is logged and retried on the next tick."""
        log.info(
            "watcher started: quiet period %.1f s, %d models, %d rules",
            self.settings.series_quiet_seconds,
            len(self.catalog.packages),
            len(self.catalog.rules.rules),
        )
        if self.settings.retain_inputs or self.settings.retain_results:
            log.info(
                "retention: inputs %s, results %s, a pass every %.0f s",
                f"{self.settings.retain_inputs_days:g} days" if self.settings.retain_inputs else "kept",
                f"{self.settings.retain_results_days:g} days" if self.settings.retain_results else "kept",
                self.settings.cleanup_interval_seconds,
            )
            threading.Thread(target=self.run_cleanup_loop, args=(stop,), name="retention", daemon=True).start()
        while not stop.is_set():
            wait = self.settings.watcher_interval_seconds
            try:
                self.run_once()
                wait = self.next_wait()
            except Exception:
                log.exception("watcher pass failed; retrying")
            stop.wait(wait)

    def next_wait(self) -> float:
        """Seconds to the next pass: the interval, or less when a series turns quiet sooner.

        A series is complete ``series_quiet_seconds`` after its last instance. Waking at that moment
        rather than at the next tick of the interval takes up to one interval (1 s by default) off
        every study's wait for its results, which matters most to a radiograph, done in a fraction
        of a second. A series that starts receiving after this look turns quiet no sooner than one
        quiet period from now, so the interval still bounds the wait.
        """
        interval = self.settings.watcher_interval_seconds
        with self.factory() as session:
            oldest = oldest_receiving_at(session)
        if oldest is None:
            return interval
        due = oldest + timedelta(seconds=self.settings.series_quiet_seconds) - utcnow()
        # just past the deadline: the claim needs last_received_at strictly before the cutoff
        return min(interval, max(_MIN_WAIT_SECONDS, due.total_seconds() + _MIN_WAIT_SECONDS))

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="watcher", daemon=True)
        thread.start()
        return thread
