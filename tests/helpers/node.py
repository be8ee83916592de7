"""Running the node's own processes (``infergate up|scp|api|worker``) from tests, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.helpers.peers import wait_for_port
from tests.helpers.phi_watch import WATCH

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NodeProcess:
    """One ``infergate`` subcommand in its own process group, logging to a file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NodeProcess:
        WATCH.watch_file(self.log_path)  # read for patient data when the run ends (phi_watch)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
        full_env.update(self.env)
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "infergate.cli", *self.command],
            env=full_env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        handle.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal_group(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, wait, SIGKILL what is left; returns the exit code."""
        if self.process is None:
            return None
        self.signal_group(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash, not a shutdown)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def node_env(**values: Any) -> dict[str, str]:
    """``INFERGATE_*`` variables from keyword arguments (``scp_port=11112`` -> ``INFERGATE_SCP_PORT``)."""
    return {f"INFERGATE_{key.upper()}": str(value) for key, value in values.items()}


def http_json(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def wait_for_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, _ = http_json(url, timeout=2)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout} s")
        time.sleep(0.2)


def wait_for_results(api: str, study_uid: str, timeout: float, *, jobs: int) -> dict[str, Any]:
    """Poll the results endpoint until ``jobs`` jobs are settled (done or failed)."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        status, body = http_json(f"{api}/api/v1/studies/{study_uid}/results")
        if status == 200:
            all_jobs = [job for series in body["series"] for job in series["jobs"]]
            if len(all_jobs) >= jobs and all(job["state"] in ("done", "failed") for job in all_jobs):
                return dict(body)
        time.sleep(0.5)
    raise TimeoutError(f"results not settled within {timeout} s; last answer: {body}")


__all__ = ["NodeProcess", "http_json", "node_env", "wait_for_http", "wait_for_port", "wait_for_results"]
