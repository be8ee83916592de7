"""DICOM TLS (issue 5, rows 23 and 25): BCP 195 peers with client certificates work, everyone else is refused.

A throwaway CA, the node's server certificate and a sender's client certificate are made with
``cryptography`` for each test module, plus a second CA that the node does not trust. The SCP is a real
``infergate scp`` process; DCMTK's ``echoscu``/``storescu`` (``+tls``) and Python's ``ssl`` play the peers.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from service.scp.ae import BCP195_TLS12_CIPHERS
from tests.data.make_series import write_ct_series
from tests.helpers.dul import A_ASSOCIATE_AC, ScpProcess, associate_rq, descriptions, read_pdu, release_rq, wait_closed
from tests.helpers.node import node_env
from tests.helpers.peers import LOOPBACK, free_port, port_is_listening

pytestmark = pytest.mark.integration

TIMEOUT = 3.0


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA the node does not trust
    rogue_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("infergate test CA", ca_key, None, ca=True)
    rogue_ca = _cert("someone else's CA", rogue_ca_key, None, ca=True)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    return Pki(
        ca=_write_cert(ca, folder / "ca.pem"),
        server_cert=_write_cert(
            _cert("localhost", server_key, (ca.subject, ca_key), server=True), folder / "server.pem"
        ),
        server_key=_write_key(server_key, folder / "server.key"),
        client_cert=_write_cert(_cert("MODALITY-1", client_key, (ca.subject, ca_key)), folder / "client.pem"),
        client_key=_write_key(client_key, folder / "client.key"),
        rogue_cert=_write_cert(_cert("MODALITY-X", rogue_key, (rogue_ca.subject, rogue_ca_key)), folder / "rogue.pem"),
        rogue_key=_write_key(rogue_key, folder / "rogue.key"),
    )


@pytest.fixture(scope="module")
def scp(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScpProcess]:
    process = ScpProcess.start(
        tmp_path_factory.mktemp("tls-scp"),
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_ca_file=pki.ca,
        scp_acse_timeout_seconds=TIMEOUT,
        scp_network_timeout_seconds=TIMEOUT,
        min_free_bytes=1,
    )
    try:
        yield process
    finally:
        process.stop()
        print(process.process.log_text()[-6000:])  # noqa: T201 - shown when a test failed


def _dcmtk(
    tool: str, port: int, tls: list[str], *, options: tuple[str, ...] = (), files: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    command = [tool, *tls, *options, "-aet", "MODALITY", "-aec", "INFERGATE", LOOPBACK, str(port), *files]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _client_context(
    pki: Pki,
    *,
    cert: bool = True,
    rogue: bool = False,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.ca)
    context.check_hostname = False  # the node's certificate names localhost and 127.0.0.1; checked below
    if cert:
        context.load_cert_chain(
            pki.rogue_cert if rogue else pki.client_cert, pki.rogue_key if rogue else pki.client_key
        )
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def _tls_associate(port: int, context: ssl.SSLContext) -> tuple[str, ssl.SSLSocket]:
    """Handshake and send an A-ASSOCIATE-RQ; returns what came back (AC, or the refusal) and the socket."""
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    try:
        sock = context.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError) as exc:
        raw.close()
        raise _Refused(f"handshake: {type(exc).__name__}") from None
    try:
        sock.sendall(associate_rq("MODALITY"))
        answer = read_pdu(sock, 10)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise _Refused(f"after handshake: {type(exc).__name__}") from None
    if answer is None:
        sock.close()
        raise _Refused("closed")
    return ("AC" if answer[0] == A_ASSOCIATE_AC else f"PDU {answer[0]:#x}"), sock


class _Refused(Exception):
    pass


# Row 23 ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_dcmtk_tls_peers_with_client_certificates_echo_and_store(scp: ScpProcess, pki: Pki, tmp_path: Path) -> None:
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    echo = _dcmtk("echoscu", scp.port, tls)
    assert echo.returncode == 0, echo.stderr
    info = write_ct_series(tmp_path / "ct", slices=3, size=32)
    stored = _dcmtk("storescu", scp.port, tls, options=("+sd", "+r"), files=(str(info.folder),))
    assert stored.returncode == 0, stored.stderr
    assert len(list((scp.data_dir / "instances" / info.study_uid).rglob("*.dcm"))) == 3
    accepted = [d for d in descriptions(scp.audit()) if d.startswith("association accepted (TLSv1.")]
    assert accepted and all("client certificate CN=MODALITY-1" in d for d in accepted), accepted
    transferred = [r for r in scp.audit() if r["EventIdentification"]["EventID"]["csd-code"] == "110104"]
    assert transferred[-1]["ParticipantObjectIdentification"][0]["ParticipantObjectID"] == info.study_uid


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls12_and_tls13_clients_with_a_certificate_associate(
    scp: ScpProcess, pki: Pki, version: ssl.TLSVersion
) -> None:
    answer, sock = _tls_associate(scp.port, _client_context(pki, version=version))
    try:
        assert answer == "AC"
        assert sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        cipher = sock.cipher()
        assert cipher is not None
        if version == ssl.TLSVersion.TLSv1_2:
            assert cipher[0] in BCP195_TLS12_CIPHERS.split(":"), cipher
        # the node presented the certificate the CA signed for it
        peer = sock.getpeercert()
        assert peer and ("DNS", "localhost") in peer["subjectAltName"]
        sock.sendall(release_rq())
        assert (reply := read_pdu(sock, 10)) is not None and reply[0] == 0x06
    finally:
        sock.close()


def _assert_refused(scp: ScpProcess, pki: Pki, context: ssl.SSLContext) -> str:
    try:
        answer, sock = _tls_associate(scp.port, context)
    except _Refused as refused:
        return str(refused)
    sock.close()
    raise AssertionError(f"the node answered {answer}")


@pytest.mark.timeout(60)
def test_clients_without_a_trusted_certificate_are_refused(scp: ScpProcess, pki: Pki) -> None:
    before = len(scp.audit())
    assert _assert_refused(scp, pki, _client_context(pki, cert=False))
    assert _assert_refused(scp, pki, _client_context(pki, rogue=True))
    time.sleep(0.5)
    alerts = [r for r in scp.audit()[before:] if r["EventIdentification"]["EventID"]["csd-code"] == "110113"]
    assert len(alerts) == 2, descriptions(scp.audit()[before:])
    assert all(a["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110126" for a in alerts)
    assert all("TLS handshake failed" in d for d in descriptions(alerts))


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls11_clients_are_refused(scp: ScpProcess, pki: Pki) -> None:
    before = len(scp.audit())
    context = _client_context(pki)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("ALL:@SECLEVEL=0")  # let OpenSSL offer TLS 1.1 at all; the node must still refuse
    assert "handshake" in _assert_refused(scp, pki, context)
    time.sleep(0.5)
    assert any("TLS handshake failed" in d for d in descriptions(scp.audit()[before:]))  # refused by the node


@pytest.mark.timeout(60)
def test_plain_dicom_clients_are_refused(scp: ScpProcess) -> None:
    echo = subprocess.run(
        ["echoscu", "-aet", "MODALITY", "-aec", "INFERGATE", LOOPBACK, str(scp.port)],
        capture_output=True,
        text=True,
        timeout=3 * TIMEOUT + 20,
        check=False,
    )
    assert echo.returncode != 0
    sock = socket.create_connection((LOOPBACK, scp.port), timeout=10)
    sock.sendall(associate_rq("MODALITY"))
    answer = read_pdu(sock, 3 * TIMEOUT + 5)
    assert answer is None or answer[0] != A_ASSOCIATE_AC
    sock.close()


@pytest.mark.timeout(60)
def test_a_silent_connection_does_not_block_other_tls_senders(scp: ScpProcess, pki: Pki) -> None:
    """pynetdicom shakes hands inside its accept loop, without a timeout: one silent socket used to stop
    every other sender. Here the handshake runs in the connection's own thread and times out."""
    silent = socket.create_connection((LOOPBACK, scp.port), timeout=10)
    try:
        time.sleep(0.3)
        started = time.monotonic()
        answer, sock = _tls_associate(scp.port, _client_context(pki))
        assert answer == "AC" and time.monotonic() - started < TIMEOUT
        sock.sendall(release_rq())
        sock.close()
        closed_after = wait_closed(silent, 3 * TIMEOUT + 10)
        assert closed_after is not None and closed_after < 2 * TIMEOUT + 3, closed_after
    finally:
        silent.close()


# Row 25 (DICOM part) -------------------------------------------------------------------------------------


def _start_scp(tmp_path: Path, **settings: object) -> subprocess.CompletedProcess[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERGATE_")}
    env.update(node_env(data_dir=tmp_path / "var", scp_port=port, **settings))
    result = subprocess.run(
        [sys.executable, "-m", "infergate.cli", "scp", "--no-watcher"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,  # a refusal takes a few seconds; a node that starts anyway runs until killed
        check=False,
    )
    assert not port_is_listening(port)
    return result


@pytest.mark.timeout(120)
def test_tls_without_client_certificates_refuses_to_start_with_a_clear_message(pki: Pki, tmp_path: Path) -> None:
    result = _start_scp(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key)
    assert result.returncode == 2
    assert "INFERGATE_TLS_CA_FILE" in result.stderr and "without client certificates" in result.stderr, result.stderr

    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("not a certificate\n")
    result = _start_scp(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.server_key, tls_ca_file=garbage)
    assert result.returncode == 2
    assert "INFERGATE_TLS_CA_FILE could not be loaded" in result.stderr, result.stderr

    result = _start_scp(tmp_path, tls_cert_file=pki.server_cert, tls_key_file=pki.client_key, tls_ca_file=pki.ca)
    assert result.returncode == 2
    assert "INFERGATE_TLS_CERT_FILE/INFERGATE_TLS_KEY_FILE could not be loaded" in result.stderr, result.stderr
