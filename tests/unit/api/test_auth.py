"""Authentication and scopes of the REST API (service.api.auth), against the real app and database.

Tokens are minted here with a freshly generated key and checked against a JWKS file, or a JWKS served
by a local HTTP server on loopback; nothing is fetched from the network.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from infergate.config import ApiKey, Settings
from infergate.store.migrate import upgrade
from infergate.store.session import make_engine, make_session_factory
from service.api.app import create_app
from service.api.auth import PROTECTED, Authenticator, load_api_keys_file, require_scope
from tests.helpers.queues import RecordingQueue

ISSUER = "https://idp.example.org/realms/hospital"
AUDIENCE = "infergate"
KID = "test-key-1"
PATIENT_NAME = "DOE^JANE"  # a claim value that must never come back in a body or a log line
READ_ROUTE = "/api/v1/jobs"
SUBMIT_ROUTE = "/api/v1/jobs"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def jwks(signing_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
    return {"keys": [{**public, "kid": KID, "use": "sig", "alg": "RS256"}]}


@pytest.fixture
def jwks_file(tmp_path: Path, jwks: dict[str, Any]) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    return path


@pytest.fixture
def mint(signing_key: rsa.RSAPrivateKey) -> Callable[..., str]:
    """A token from the test issuer; keyword arguments override or drop (``None``) claims."""

    def _mint(key: rsa.RSAPrivateKey | None = None, kid: str = KID, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "user-42",
            "iat": now,
            "exp": now + 300,
            "scope": "read",
            "name": PATIENT_NAME,
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, key or signing_key, algorithm="RS256", headers={"kid": kid})

    return _mint


def _key_entry(name: str, scopes: str) -> tuple[str, str]:
    """A fresh random key and its settings entry (only the digest goes into settings)."""
    key = secrets.token_urlsafe(32)
    return key, f"{name}:{hashlib.sha256(key.encode()).hexdigest()}:{scopes}"


@pytest.fixture
def sqlite_factory(make_settings: Callable[..., Settings]) -> sessionmaker[Session]:
    """A migrated SQLite database; authentication does not depend on the database kind."""
    engine = make_engine(make_settings())
    upgrade(engine)
    return make_session_factory(engine)


@pytest.fixture
def make_client(
    make_settings: Callable[..., Settings], sqlite_factory: sessionmaker[Session]
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def _make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides), sqlite_factory, queue=RecordingQueue()))
        clients.append(client.__enter__())
        return client

    yield _make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def jwt_client(make_client: Callable[..., TestClient], jwks_file: Path) -> TestClient:
    """The API bound to all interfaces, accepting bearer tokens from the test issuer."""
    return make_client(api_host="0.0.0.0", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_file=jwks_file)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_clean(response: Any, *secrets_: str) -> None:
    """A refusal: a ``{"detail": ...}`` body with neither the credential nor the token's claims in it."""
    assert set(response.json()) == {"detail"}
    for secret in (*secrets_, PATIENT_NAME, "user-42"):
        assert secret not in response.text
        assert secret not in str(response.headers)


# Bearer tokens -----------------------------------------------------------------------------------


def test_missing_credentials_answer_401_with_a_challenge(jwt_client: TestClient) -> None:
    response = jwt_client.get(READ_ROUTE)
    assert response.status_code == 401
    assert response.json() == {"detail": "Authentication is required."}
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="infergate"'


def test_good_token_passes(jwt_client: TestClient, mint: Callable[..., str]) -> None:
    response = jwt_client.get(READ_ROUTE, headers=_bearer(mint()))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "another-api"}, "audience"),
        ({"iss": "https://evil.example.org"}, "issuer"),
        ({"exp": None}, '"exp" claim'),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
    ],
)
def test_invalid_token_answers_401(
    jwt_client: TestClient, mint: Callable[..., str], claims: dict[str, Any], reason: str
) -> None:
    token = mint(**claims)
    response = jwt_client.get(READ_ROUTE, headers=_bearer(token))
    assert response.status_code == 401
    assert reason in response.json()["detail"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    _assert_clean(response, token)


def test_token_signed_by_another_key_answers_401(jwt_client: TestClient, mint: Callable[..., str]) -> None:
    intruder = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = mint(key=intruder)  # same kid, other key: the signature does not verify
    response = jwt_client.get(READ_ROUTE, headers=_bearer(token))
    assert response.status_code == 401
    assert "signature" in response.json()["detail"]
    _assert_clean(response, token)
    unknown = jwt_client.get(READ_ROUTE, headers=_bearer(mint(key=intruder, kid="other")))
    assert unknown.status_code == 401 and "does not publish" in unknown.json()["detail"]


def test_tampered_and_malformed_tokens_answer_401(jwt_client: TestClient, mint: Callable[..., str]) -> None:
    header, payload, signature = mint().split(".")
    forged = jwt.utils.base64url_encode(json.dumps({"scope": "admin", "sub": "x"}).encode()).decode()
    for token in (f"{header}.{forged}.{signature}", "not-a-jwt", f"{header}.{payload}."):
        response = jwt_client.get(READ_ROUTE, headers=_bearer(token))
        assert response.status_code == 401, token
        _assert_clean(response, token)


def test_unsigned_and_symmetric_tokens_are_refused(jwt_client: TestClient, jwks: dict[str, Any]) -> None:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "scope": "admin"}
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": KID})
    # the classic confusion attack: HMAC keyed with the published public key (built by hand; PyJWT won't)
    segments = [
        jwt.utils.base64url_encode(json.dumps(part).encode()) for part in ({"alg": "HS256", "kid": KID}, claims)
    ]
    mac = hmac.new(json.dumps(jwks["keys"][0]).encode(), b".".join(segments), hashlib.sha256).digest()
    hs256 = b".".join([*segments, jwt.utils.base64url_encode(mac)]).decode()
    for token in (unsigned, hs256):
        response = jwt_client.get(READ_ROUTE, headers=_bearer(token))
        assert response.status_code == 401
        _assert_clean(response, token)


def test_under_scoped_token_answers_403(jwt_client: TestClient, mint: Callable[..., str]) -> None:
    token = mint(scope="read")
    response = jwt_client.post(SUBMIT_ROUTE, json={}, headers=_bearer(token))
    assert response.status_code == 403
    assert response.json() == {"detail": 'This operation needs the "submit" scope.'}
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    _assert_clean(response, token)


def test_submit_does_not_imply_read_but_admin_implies_both(jwt_client: TestClient, mint: Callable[..., str]) -> None:
    assert jwt_client.get(READ_ROUTE, headers=_bearer(mint(scope="submit"))).status_code == 403
    # with submit, the request gets past authorisation to the route's own validation
    assert jwt_client.post(SUBMIT_ROUTE, json={}, headers=_bearer(mint(scope="submit"))).status_code == 422
    assert jwt_client.get(READ_ROUTE, headers=_bearer(mint(scope="admin"))).status_code == 200
    assert jwt_client.post(SUBMIT_ROUTE, json={}, headers=_bearer(mint(scope="admin"))).status_code == 422
    scp_list = mint(scope=None, scp=["read", "unknown"])  # Azure AD / Okta style
    assert jwt_client.get(READ_ROUTE, headers=_bearer(scp_list)).status_code == 200
    for odd in ({"scope": None, "scp": 7}, {"scope": {"read": True}}, {"scope": None}):
        assert jwt_client.get(READ_ROUTE, headers=_bearer(mint(**odd))).status_code == 403


def test_health_stays_open(jwt_client: TestClient) -> None:
    assert jwt_client.get("/health").status_code == 200


def test_failures_are_logged_without_the_token(
    jwt_client: TestClient, mint: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    token = mint(exp=int(time.time()) - 3600)
    with caplog.at_level(logging.DEBUG):
        jwt_client.get(READ_ROUTE, headers=_bearer(token))
    assert "expired" in caplog.text
    assert token not in caplog.text and PATIENT_NAME not in caplog.text


def test_jwks_from_a_url(
    make_client: Callable[..., TestClient], jwks: dict[str, Any], mint: Callable[..., str]
) -> None:
    body = json.dumps(jwks).encode()
    fetches: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            fetches.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/realms/hospital/certs"
        client = make_client(api_host="0.0.0.0", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_url=url)
        assert fetches == []  # fetched when the first token arrives, not at start
        assert client.get(READ_ROUTE, headers=_bearer(mint())).status_code == 200
        assert client.get(READ_ROUTE, headers=_bearer(mint())).status_code == 200
        assert fetches == ["/realms/hospital/certs"]  # cached
        assert client.get(READ_ROUTE, headers=_bearer(mint(aud="x"))).status_code == 401
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_jwks_url_answers_503(make_client: Callable[..., TestClient], mint: Callable[..., str]) -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    client = make_client(
        api_host="0.0.0.0", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_url=f"http://127.0.0.1:{port}/certs"
    )
    response = client.get(READ_ROUTE, headers=_bearer(mint()))
    assert response.status_code == 503
    assert "unreachable" in response.json()["detail"]


# API keys ----------------------------------------------------------------------------------------


def test_api_keys(make_client: Callable[..., TestClient]) -> None:
    reader, reader_entry = _key_entry("viewer", "read")
    sender, sender_entry = _key_entry("pacs", "submit")
    client = make_client(api_host="0.0.0.0", api_keys=f"{reader_entry},{sender_entry}")
    assert client.get(READ_ROUTE, headers={"X-API-Key": reader}).status_code == 200
    refused = client.get(READ_ROUTE, headers={"X-API-Key": sender})
    assert refused.status_code == 403 and "WWW-Authenticate" not in refused.headers
    assert client.post(SUBMIT_ROUTE, json={}, headers={"X-API-Key": reader}).status_code == 403
    assert client.post(SUBMIT_ROUTE, json={}, headers={"X-API-Key": sender}).status_code == 422
    bad = client.get(READ_ROUTE, headers={"X-API-Key": reader + "x"})
    assert bad.status_code == 401
    assert bad.json() == {"detail": "The API key is not valid."}
    assert bad.headers["WWW-Authenticate"] == 'ApiKey realm="infergate", header="X-API-Key"'
    _assert_clean(bad, reader)
    missing = client.get(READ_ROUTE)
    assert missing.status_code == 401 and "X-API-Key" in missing.headers["WWW-Authenticate"]


def test_dicomweb_search_needs_read_and_store_needs_submit(make_client: Callable[..., TestClient]) -> None:
    reader, reader_entry = _key_entry("viewer", "read")
    sender, sender_entry = _key_entry("modality", "submit")
    client = make_client(api_host="0.0.0.0", api_keys=f"{reader_entry},{sender_entry}")
    stow = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}
    assert client.get("/dicomweb/studies").status_code == 401
    assert client.get("/dicomweb/studies", headers={"X-API-Key": sender}).status_code == 403
    assert client.get("/dicomweb/studies", headers={"X-API-Key": reader}).status_code in (200, 204)
    refused = client.post("/dicomweb/studies", content=b"--x--", headers={**stow, "X-API-Key": reader})
    assert refused.status_code == 403  # refused before the body is read
    accepted = client.post("/dicomweb/studies", content=b"--x--", headers={**stow, "X-API-Key": sender})
    assert accepted.status_code not in (401, 403)


def test_one_credential_and_known_schemes_only(
    make_client: Callable[..., TestClient], jwks_file: Path, mint: Callable[..., str]
) -> None:
    key, entry = _key_entry("viewer", "read")
    client = make_client(
        api_host="0.0.0.0", api_keys=entry, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_file=jwks_file
    )
    both = client.get(READ_ROUTE, headers={"X-API-Key": key, **_bearer(mint())})
    assert both.status_code == 401 and "not both" in both.json()["detail"]
    basic = client.get(READ_ROUTE, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert basic.status_code == 401 and "Only the Bearer" in basic.json()["detail"]
    token = mint()
    schemeless = client.get(READ_ROUTE, headers={"Authorization": token})  # the token pasted without "Bearer"
    assert schemeless.status_code == 401
    _assert_clean(schemeless, token)
    for refused in ({"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": key}, {"Authorization": "Bearer "}):
        assert client.get(READ_ROUTE, headers=refused).status_code == 401
    assert basic.headers["WWW-Authenticate"].startswith('Bearer realm="infergate"')
    assert "ApiKey" in basic.headers["WWW-Authenticate"]
    assert client.get(READ_ROUTE, headers={"X-API-Key": key}).status_code == 200
    assert client.get(READ_ROUTE, headers=_bearer(mint())).status_code == 200


def test_api_keys_file(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    key, entry = _key_entry("viewer", "read admin")
    name, digest, scopes = entry.split(":")
    path = tmp_path / "keys.yaml"
    path.write_text(f"- name: {name}\n  sha256: {digest.upper()}\n  scopes: [{scopes.replace(' ', ', ')}]\n")
    assert load_api_keys_file(path) == [ApiKey.parse(entry)]
    client = make_client(api_host="0.0.0.0", api_keys_file=path)
    assert client.get(READ_ROUTE, headers={"X-API-Key": key}).status_code == 200
    assert client.get(READ_ROUTE, headers={"X-API-Key": "wrong"}).status_code == 401


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "lists no keys"),
        ("keys: []\n", "should hold a list"),
        ("- name: viewer\n  sha256: my-raw-secret-key\n  scopes: [read]\n", "entry 1: sha256"),
        ("- name: viewer\n  sha256: " + "a" * 64 + "\n  scopes: [root]\n", "entry 1: scopes"),
    ],
)
def test_unusable_api_keys_file_stops_the_start(
    make_settings: Callable[..., Settings], tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as raised:
        Authenticator(make_settings(api_host="0.0.0.0", api_keys_file=path))
    assert "my-raw-secret-key" not in str(raised.value)


def test_missing_files_stop_the_start(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read"):
        Authenticator(make_settings(api_host="0.0.0.0", api_keys_file=tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match="JWKS file"):
        Authenticator(make_settings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_file=tmp_path / "absent.json"))


# Scopes on a route of its own --------------------------------------------------------------------


def test_require_scope_on_a_route(make_settings: Callable[..., Settings]) -> None:
    """A route asking for admin on top of the method default: both must pass."""
    reader, reader_entry = _key_entry("viewer", "read submit")
    admin, admin_entry = _key_entry("operator", "admin")
    router = APIRouter()

    @router.post("/purge", dependencies=[require_scope("admin")])
    def purge() -> dict[str, str]:
        return {"status": "purged"}

    app = FastAPI()
    app.state.authenticator = Authenticator(make_settings(api_host="0.0.0.0", api_keys=f"{reader_entry},{admin_entry}"))
    app.include_router(router, **PROTECTED)
    with TestClient(app) as client:
        assert client.post("/purge", headers={"X-API-Key": reader}).status_code == 403
        assert client.post("/purge", headers={"X-API-Key": admin}).json() == {"status": "purged"}
    with pytest.raises(ValueError, match="scope"):
        require_scope("root")  # type: ignore[arg-type]


# Settings and start-up ---------------------------------------------------------------------------


def test_loopback_default_needs_no_auth(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert not client.app.state.settings.auth_enabled  # type: ignore[attr-defined]
    assert client.get(READ_ROUTE).status_code == 200
    assert client.post(SUBMIT_ROUTE, json={}).status_code == 422  # anonymous holds every scope


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "infergate.hospital.org"])
def test_network_bind_without_auth_refuses_to_start(host: str) -> None:
    with pytest.raises(ValidationError, match="no authentication is configured") as raised:
        Settings(api_host=host)
    assert host in str(raised.value) and "INFERGATE_API_KEYS" in str(raised.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts(host: str) -> None:
    assert not Settings(api_host=host).auth_enabled


def test_network_bind_with_auth_starts(jwks_file: Path) -> None:
    _, entry = _key_entry("viewer", "read")
    assert Settings(api_host="0.0.0.0", api_keys=entry).auth_enabled
    assert Settings(
        api_host="0.0.0.0", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_url="https://idp.example.org/certs"
    ).auth_enabled
    assert Settings(api_host="0.0.0.0", jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwks_file=jwks_file).auth_enabled


def test_auth_required_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    _, entry = _key_entry("viewer", "read")
    assert Settings(api_keys=entry).auth_enabled  # configured keys are enforced on loopback too
    assert not Settings(api_keys=entry, auth_required=False).auth_enabled
    with pytest.raises(ValidationError, match='"auth_required" is true'):
        Settings(auth_required=True)
    with pytest.raises(ValidationError, match="only when the REST API binds loopback"):
        Settings(api_host="0.0.0.0", api_keys=entry, auth_required=False)
    monkeypatch.setenv("INFERGATE_API_HOST", "0.0.0.0")
    monkeypatch.setenv("INFERGATE_API_KEYS", entry)
    assert Settings().api_keys == [ApiKey.parse(entry)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"jwt_issuer": ISSUER, "jwks_url": "https://idp/certs"}, "jwt_audience"),
        ({"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}, "exactly one"),
        (
            {"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, "jwks_url": "https://a/c", "jwks_file": "/k.json"},
            "exactly one",
        ),
        ({"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, "jwks_url": "http://idp.example.org/certs"}, "https"),
        ({"jwt_issuer": ISSUER, "jwt_audience": AUDIENCE, "jwks_url": "file:///etc/jwks.json"}, "https"),
        ({"jwt_algorithms": "RS256,HS256"}, "HS256"),
        ({"jwt_algorithms": "none"}, "asymmetric"),
        ({"api_keys": "viewer:my-raw-secret-key:read"}, "never the key itself"),
        ({"api_keys": "viewer:" + "a" * 64}, "name:sha256hex:scopes"),
        ({"api_keys": "viewer:" + "a" * 64 + ":read,other:" + "a" * 64 + ":read"}, "repeats"),
    ],
)
def test_unsafe_auth_settings_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message) as raised:
        Settings(**overrides)
    assert "my-raw-secret-key" not in str(raised.value)


def test_openapi_documents_the_schemes(make_client: Callable[..., TestClient]) -> None:
    document = make_client().get("/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": schemes["bearerAuth"]["description"],
    }
    assert schemes["apiKeyAuth"]["in"] == "header" and schemes["apiKeyAuth"]["name"] == "X-API-Key"
    jobs = document["paths"]["/api/v1/jobs"]["get"]
    assert {"bearerAuth": []} in jobs["security"] and {"apiKeyAuth": []} in jobs["security"]
    assert {"401", "403"} <= set(jobs["responses"])
    assert "security" not in document["paths"]["/health"]["get"]
