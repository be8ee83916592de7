"""Stand-ins for :class:`infergate.jobs.JobQueue` (the broker is another process)."""

from __future__ import annotations


class RecordingQueue:
    """Records the job ids it was asked to send."""

    def __init__(self) -> None:
        self.runs: list[int] = []
        self.exports: list[int] = []
        self.retrievals: list[int] = []

    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        self.runs.append(job_id)

    def send_export(self, job_id: int, countdown: float | None = None) -> None:
        self.exports.append(job_id)

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None:
        self.retrievals.append(retrieval_id)


class BrokerDown(RecordingQueue):
    """A broker that refuses every connection."""

    def send_run(self, job_id: int, countdown: float | None = None) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    def send_export(self, job_id: int, countdown: float | None = None) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    def send_retrieve(self, retrieval_id: int, countdown: float | None = None) -> None:
        raise ConnectionRefusedError(111, "Connection refused")
