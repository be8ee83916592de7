"""The watcher: turns quiet series into jobs and re-sends lost work.

It runs as a thread of ``infergate scp`` (or alone as ``infergate watcher``). Everything it does is
a guarded SQL update, so several watchers may run at once without routing a series twice.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker

from infergate.completion import RoutedSeries, complete_quiet_series
from infergate.config import Settings
from infergate.jobs import JobSender
from infergate.manifest import load_all
from infergate.reconcile import reconcile
from infergate.routing import load_rules

log = logging.getLogger(__name__)


class Watcher:
    """Series completion and reconciliation on a timer."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], queue: JobSender) -> None:
        self.settings = settings
        self.factory = factory
        self.queue = queue
        self.packages = load_all(settings.models_dir)
        self.rules = load_rules(settings.routing_rules_path, known_models=set(self.packages))
        self._last_reconcile = 0.0

    def run_once(self) -> list[RoutedSeries]:
        routed = complete_quiet_series(
            self.factory,
            self.queue,
            quiet=timedelta(seconds=self.settings.series_quiet_seconds),
            rules=self.rules,
            packages=self.packages,
        )
        now = time.monotonic()
        if now - self._last_reconcile >= self.settings.reconcile_interval_seconds:
            self._last_reconcile = now
            reconcile(self.factory, self.queue, requeue_after=timedelta(seconds=self.settings.requeue_after_seconds))
        return routed

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; a failing pass is logged and retried on the next tick."""
        log.info(
            "watcher started: quiet period %.1f s, %d models, %d rules",
            self.settings.series_quiet_seconds,
            len(self.packages),
            len(self.rules.rules),
        )
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("watcher pass failed; retrying")
            stop.wait(self.settings.watcher_interval_seconds)

    def start_thread(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name="watcher", daemon=True)
        thread.start()
        return thread
