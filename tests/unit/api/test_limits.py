"""The request-body timeout (service.api.limits) against a real uvicorn server and raw sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvicorn

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from service.api.app import create_app
from tests.helpers.queues import RecordingQueue

TIMEOUT = 1.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def server(make_settings: Callable[..., Settings]) -> Iterator[tuple[int, Path]]:
    settings = make_settings(api_body_timeout_seconds=TIMEOUT)
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    port = _free_port()
    config = uvicorn.Config(
        create_app(settings, queue=RecordingQueue()), host="127.0.0.1", port=port, log_level="warning"
    )
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not instance.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield port, settings.data_path / "tmp"
    instance.should_exit = True
    thread.join(10)


def _post_head(port: int, length: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: multipart/related; type="application/dicom"; boundary=xyz\r\n'
        + f"Content-Length: {length}\r\n\r\n".encode()
    )
    return sock


def _status(sock: socket.socket) -> int:
    head = sock.recv(65536).split(b"\r\n", 1)[0]
    return int(head.split()[1])


def test_a_stalled_upload_is_answered_408_and_leaves_no_spool(server: tuple[int, Path]) -> None:
    port, spool_dir = server
    with _post_head(port, 100_000) as sock:
        sock.sendall(b"--xyz\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 100)
        started = time.monotonic()
        assert _status(sock) == 408
        waited = time.monotonic() - started
    assert TIMEOUT * 0.8 < waited < TIMEOUT + 5
    assert not spool_dir.exists() or not any(spool_dir.iterdir()), "the spool file of the stalled upload is gone"


def test_a_slow_but_steady_upload_is_not_cut(server: tuple[int, Path]) -> None:
    """Chunks keep arriving within the timeout, so the request ends normally (400: not a DICOM body)."""
    port, _ = server
    chunks = [b"--xyz\r\nContent-Type: application/dicom\r\n\r\n", b"x" * 10, b"x" * 10, b"\r\n--xyz--\r\n"]
    with _post_head(port, sum(map(len, chunks))) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(TIMEOUT * 0.6)
        assert _status(sock) not in (408, 500)
