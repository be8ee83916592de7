"""Row 24: REST abuse against a real ``infergate api`` process with authentication configured.

Missing, expired, wrong-audience and under-scoped tokens and a bad API key get 401/403 fast; a huge
declared body gets 413 before anything is read; a compressed body ("gzip bomb") gets 415 without
being inflated; ``../`` in paths is refused; a large garbage upload streams through a bounded amount
of memory; and none of it leaves a file in the data folder.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from infergate.config import Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine
from tests.helpers.node import NodeProcess, node_env, wait_for_http
from tests.helpers.peers import LOOPBACK, free_port

pytestmark = pytest.mark.timeout(180)

ISSUER, AUDIENCE = "https://idp.example.org", "infergate-test"
STUDY = "1.2.826.0.1.3680043.8.498.900"
FAST = 2.0  # seconds within which a refusal must come


@dataclass
class Api:
    base: str
    port: int
    pid: int
    data_dir: Path
    read_key: str
    submit_key: str
    private_key: rsa.RSAPrivateKey

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ris", "iat": now, "exp": now + 300, "scope": "read"}
        payload.update(claims)
        return jwt.encode(payload, self.private_key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("rest-abuse")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks = root / "jwks.json"
    jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    read_key, submit_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    keys = ",".join(
        f"{name}:{hashlib.sha256(value.encode()).hexdigest()}:{scopes}"
        for name, value, scopes in (("viewer", read_key, "read"), ("ris", submit_key, "read submit"))
    )
    data_dir = root / "var"
    settings = Settings(data_dir=data_dir)
    engine = make_engine(settings)
    upgrade(engine)
    engine.dispose()
    port = free_port()
    env = node_env(
        data_dir=data_dir,
        api_host=LOOPBACK,
        api_port=port,
        api_keys=keys,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwks_file=jwks,
        dicomweb_max_upload_bytes=512 * 1024**2,
        api_body_timeout_seconds=5,
    )
    process = NodeProcess(["api"], env, root / "api.log").start()
    try:
        wait_for_http(f"http://{LOOPBACK}:{port}/health", timeout=60)
        yield Api(f"http://{LOOPBACK}:{port}", port, process.pid, data_dir, read_key, submit_key, key)
    finally:
        process.stop()


def _request(
    api: Api, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, Any], float]:
    """One HTTP/1.1 request on a raw socket (so that nothing "fixes" a hostile path); status, JSON, seconds."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{api.port}", "Connection: close"]
    merged = {"Content-Length": str(len(body)), **(headers or {})}
    lines += [f"{name}: {value}" for name, value in merged.items()]
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, api.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        # The body goes from another thread: a node that answers before reading it (413, 415) closes
        # the connection while the body is still on its way, as it should.
        sender = threading.Thread(target=_send_quietly, args=(sock, body), daemon=True)
        sender.start()
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            if not raw:
                raise
        sender.join(10)
    elapsed = time.monotonic() - started
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        parsed = json.loads(payload) if payload.strip().startswith(b"{") else {}
    except ValueError:
        parsed = {}
    return status, parsed, elapsed


def _send_quietly(sock: socket.socket, body: bytes) -> None:
    try:
        sock.sendall(body)
    except OSError:
        pass  # the node answered and closed first


def _rss_kib(pid: int) -> int:
    """Anonymous resident memory: what the process holds itself (the spool's mapped pages are page cache)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _written_files(api: Api) -> list[Path]:
    """Files under the data folder other than the process's own bookkeeping (database, audit trail, metrics
    files, log salt): instances, results, spools."""
    metrics = api.data_dir / "metrics"
    return [
        p
        for p in api.data_dir.rglob("*")
        if p.is_file()
        and not p.name.startswith("infergate.db")
        and p.name not in ("audit.log", "log-salt")
        and metrics not in p.parents
    ]


def _uvicorn_pid(api: Api) -> int:
    """The process answering HTTP: ``infergate api`` execs into uvicorn in the same pid."""
    return api.pid


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no credentials", 401),
        ("bad API key", 401),
        ("expired token", 401),
        ("wrong audience", 401),
        ("wrong issuer", 401),
        ("HS256 token signed with the audience", 401),
        ("read key submitting a job", 403),
        ("read token submitting a job", 403),
    ],
)
def test_credentials_are_refused_fast_without_patient_data(api: Api, case: str, expected: int) -> None:
    method, path, body, headers = "GET", "/api/v1/jobs", b"", {}
    if case == "bad API key":
        headers = {"X-API-Key": api.read_key[:-2] + "xx"}
    elif case == "expired token":
        headers = {"Authorization": f"Bearer {api.token(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)}"}
    elif case == "wrong audience":
        headers = {"Authorization": f"Bearer {api.token(aud='another-service')}"}
    elif case == "wrong issuer":
        headers = {"Authorization": f"Bearer {api.token(iss='https://evil.example.org')}"}
    elif case == "HS256 token signed with the audience":
        forged = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 60}, AUDIENCE * 4, "HS256")
        headers = {"Authorization": f"Bearer {forged}"}
    elif case.endswith("submitting a job"):
        method, path = "POST", "/api/v1/jobs"
        body = json.dumps({"study_instance_uid": STUDY}).encode()
        credential = (
            {"X-API-Key": api.read_key}
            if case.startswith("read key")
            else {"Authorization": f"Bearer {api.token(scope='read')}"}
        )
        headers = {"Content-Type": "application/json", **credential}
    status, payload, elapsed = _request(api, method, path, headers, body)
    assert status == expected, payload
    assert elapsed < FAST
    assert set(payload) == {"detail"}


def test_the_right_credentials_work(api: Api) -> None:
    """The refusals above are not a node that refuses everything."""
    assert _request(api, "GET", "/api/v1/jobs", {"X-API-Key": api.read_key})[0] == 200
    assert _request(api, "GET", "/api/v1/jobs", {"Authorization": f"Bearer {api.token()}"})[0] == 200
    body = json.dumps({"study_instance_uid": STUDY}).encode()
    status, payload, _ = _request(
        api, "POST", "/api/v1/jobs", {"Content-Type": "application/json", "X-API-Key": api.submit_key}, body
    )
    assert status == 404 and "study" in payload["detail"].lower()  # authorised; the node holds no such study


def test_huge_declared_bodies_get_413_before_anything_is_read(api: Api) -> None:
    auth = {"X-API-Key": api.submit_key}
    stow = {**auth, "Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}
    for path, headers in (("/dicomweb/studies", stow), ("/api/v1/jobs", {**auth, "Content-Type": "application/json"})):
        # The body is never sent: the answer must come from the declared length alone.
        lines = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}", "Content-Length: 1000000000000"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        started = time.monotonic()
        with socket.create_connection((LOOPBACK, api.port), timeout=10) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = sock.recv(65536).split(b"\r\n", 1)[0]
        assert head.split()[1] == b"413", (path, head)
        assert time.monotonic() - started < FAST
    assert _written_files(api) == []


def test_a_gzip_bomb_is_refused_without_inflating_it(api: Api) -> None:
    bomb = gzip.compress(b"\0" * (256 * 1024**2), compresslevel=9)  # 256 MiB of zeros in ~250 KiB
    assert len(bomb) < 1024**2
    before = _rss_kib(_uvicorn_pid(api))
    for path, content_type in (
        ("/dicomweb/studies", 'multipart/related; type="application/dicom"; boundary=x'),
        ("/api/v1/jobs", "application/json"),
    ):
        status, payload, elapsed = _request(
            api,
            "POST",
            path,
            {"X-API-Key": api.submit_key, "Content-Type": content_type, "Content-Encoding": "gzip"},
            bomb if path.startswith("/dicomweb") else gzip.compress(b"{" * 2**20),
        )
        assert status == 415, payload
        assert "Content-Encoding" in payload["detail"] and elapsed < FAST
    assert _rss_kib(_uvicorn_pid(api)) - before < 32 * 1024
    assert _written_files(api) == []


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/..%2F..%2F..%2Fetc%2Fpasswd",
        "/dicomweb/studies/../../../etc/passwd",
        f"/dicomweb/studies/{STUDY}/series/..%2F..%2Fvar/instances/1.2",
        "/dicomweb/studies/%2e%2e%2f%2e%2e%2finfergate.db/metadata",
        f"/dicomweb/studies/{STUDY}/series/1.2/instances/%00/frames/1",
        "/api/v1/studies/..%2F..%2Fetc/results",
        "/api/v1/jobs/..%2F1",
        "/dicomweb/studies/" + "1" * 200,
    ],
)
def test_traversal_in_paths_is_refused(api: Api, path: str) -> None:
    status, payload, elapsed = _request(api, "GET", path, {"X-API-Key": api.read_key})
    assert status in (400, 404, 422), (path, status, payload)
    assert elapsed < FAST
    assert "root:" not in json.dumps(payload)


def test_a_large_garbage_upload_streams_in_bounded_memory(api: Api) -> None:
    """300 MiB of non-DICOM parts: refused with 400, never held in memory, and its spool removed."""
    boundary = "b0undary"
    part = b"x" * (1024**2)
    size = 300
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + size * len(part) + len(tail)
    pid = _uvicorn_pid(api)
    before, peak = _rss_kib(pid), 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with socket.create_connection((LOOPBACK, api.port), timeout=60) as sock:
            request = [
                "POST /dicomweb/studies HTTP/1.1",
                f"Host: {LOOPBACK}",
                f"X-API-Key: {api.submit_key}",
                f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}',
                f"Content-Length: {length}",
            ]
            sock.sendall(("\r\n".join(request) + "\r\n\r\n").encode() + head)
            for _ in range(size):
                sock.sendall(part)
            sock.sendall(tail)
            status = int(sock.recv(65536).split(b"\r\n", 1)[0].split()[1])
    finally:
        stop.set()
        sampler.join()
    assert status in (400, 409), status  # garbage parts: nothing stored
    growth_mib = (peak - before) / 1024
    assert growth_mib < 96, f"the API grew by {growth_mib:.0f} MiB while a 300 MiB body streamed through"
    deadline = time.monotonic() + 5
    while _written_files(api) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _written_files(api) == []
