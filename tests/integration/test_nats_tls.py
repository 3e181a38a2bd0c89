"""TLS between the services and NATS, against a real nats-server configured by the project's own code
(``server_config(..., tls=ServerTls(...))``, the block infra/nats/nats-tls.conf uses), with a CA and
certificates made here. The client (``shared.bus.connect``) verifies the server against
``WARMSERVE_NATS_TLS_CA`` and starts TLS before anything else, so no password crosses in clear: not to a
server without TLS, not to one whose certificate another CA signed."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared import bus
from shared.settings import NatsSettings
from tooling.localcluster.infra import nats_server_binary
from tooling.localcluster.nats_auth import OPERATOR, NatsUsers, ServerTls, server_config
from tooling.localcluster.processes import free_port, wait_port

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.integration
CONNECT_S = 20  # bound on any connect here: a hang is a failure, not a stuck suite


# ---- a throwaway PKI -------------------------------------------------------------------------------------

def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


@dataclass
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    pem: Path

    @classmethod
    def make(cls, folder: Path, cn: str) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False, data_encipherment=False,
                                             key_agreement=False, encipher_only=False, decipher_only=False),
                               critical=True)
                .sign(key, hashes.SHA256()))
        pem = folder / f"{cn}.pem"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, pem)

    def issue(self, folder: Path, cn: str, *, server: bool) -> tuple[Path, Path]:
        """A leaf certificate and its key: for localhost and 127.0.0.1 (server), or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path = folder / f"{cn}-cert.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, _write_key(key, folder / f"{cn}-key.pem")


@pytest.fixture
def pki(tmp_path) -> dict:
    ca = Ca.make(tmp_path, "warmserve-test-ca")
    rogue = Ca.make(tmp_path, "someone-else")
    return {"ca": ca, "server": ca.issue(tmp_path, "server", server=True),
            "client": ca.issue(tmp_path, "client", server=False),
            "rogue_server": rogue.issue(tmp_path, "rogue-server", server=True)}


@dataclass
class Server:
    base: str
    port: int
    users: NatsUsers
    log: Path

    def url(self, user: str = OPERATOR) -> str:
        return self.users.url(self.base, user)


@pytest.fixture
def start_server(tmp_path):
    """Start a nats-server with the local cluster's users and the given TLS (or none)."""
    procs = []

    def start(tls: ServerTls | None) -> Server:
        users = NatsUsers.load_or_create(tmp_path / "users.json")
        port = free_port()
        root = tmp_path / f"nats-{port}"
        (root / "js").mkdir(parents=True)
        (root / "nats.conf").write_text(server_config(port, root / "js", users, tls=tls))
        log = root / "nats-server.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen([nats_server_binary(), "-c", str(root / "nats.conf")],
                                          stdout=out, stderr=subprocess.STDOUT))
        assert wait_port(port, 10.0, proc=procs[-1]), log.read_text()
        return Server(f"nats://127.0.0.1:{port}", port, users, log)

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _tls(pki: dict, *, client_cert: bool = False) -> NatsSettings:
    cert, key = pki["client"] if client_cert else (None, None)
    return NatsSettings(nats_tls_ca=pki["ca"].pem, nats_tls_cert=cert, nats_tls_key=key)


async def _round_trip(nc) -> None:
    sub = await nc.subscribe("tls.check")
    await nc.publish("tls.check", b"over tls")
    msg = await sub.next_msg(timeout=5)
    assert msg.data == b"over tls"


# ---- the tests ---------------------------------------------------------------------------------------------

async def test_a_service_reaches_a_tls_server_with_the_ca_from_the_environment(pki, start_server, monkeypatch):
    cert, key = pki["server"]
    server = start_server(ServerTls(cert_file=str(cert), key_file=str(key)))
    monkeypatch.setenv("WARMSERVE_NATS_TLS_CA", str(pki["ca"].pem))  # what compose.tls.yml sets for each service
    nc = await asyncio.wait_for(bus.connect(server.url(), "tls-test", deadline_s=10), CONNECT_S)
    try:
        assert nc._server_info.get("tls_required") is True
        await _round_trip(nc)
    finally:
        await bus.close(nc)


async def test_a_tls_server_refuses_plain_text(pki, start_server):
    cert, key = pki["server"]
    server = start_server(ServerTls(cert_file=str(cert), key_file=str(key)))
    password = server.users.password(OPERATOR)
    received = await asyncio.wait_for(asyncio.to_thread(_plain_text_exchange, server.port, password), CONNECT_S)
    assert "PONG" not in received and "+OK" not in received, received  # the connection ended unanswered
    # a client that lets the server pick (no CA set, nats://) cannot verify this server either
    with pytest.raises(bus.BusError) as err:
        await asyncio.wait_for(bus.connect(server.url(), "plain", deadline_s=5,
                                           tls=NatsSettings(nats_tls_ca=None)), CONNECT_S)
    assert err.value.code == "nats_tls", err.value


def _plain_text_exchange(port: int, password: str) -> str:
    """Send CONNECT and PING in clear and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f'CONNECT {{"user":"{OPERATOR}","pass":"{password}","verbose":true}}\r\nPING\r\n'.encode())
        data = b""
        while chunk := s.recv(4096):  # ends at EOF (the server hung up) or raises on the 10 s timeout
            data += chunk
    return data.decode(errors="replace")


async def test_a_tls_client_sends_no_password_to_a_server_without_tls():
    """A server (or a man in the middle) that answers in plain text gets a TLS hello and nothing else."""
    received = bytearray()
    got_bytes = asyncio.Event()

    async def fake_nats(reader, writer):
        writer.write(b'INFO {"server_id":"fake","version":"2.10.0","auth_required":true,"max_payload":1048576}\r\n')
        await writer.drain()
        while data := await reader.read(4096):
            received.extend(data)
            got_bytes.set()
        writer.close()

    server = await asyncio.start_server(fake_nats, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"tls://{OPERATOR}:secret-password-123@127.0.0.1:{port}"
        with pytest.raises(bus.BusError) as err:
            await asyncio.wait_for(bus.connect(url, "tls-client", deadline_s=5, tls=NatsSettings()), CONNECT_S)
        # the hello's answer never comes (the plain INFO was read before TLS started): given up at the deadline
        assert err.value.code in {"nats_tls", "nats_unreachable"} and "TLS" in str(err.value), err.value
        assert got_bytes.is_set()  # the client did talk: a TLS hello
        assert received[:1] == b"\x16"  # a TLS handshake record
        assert b"secret-password-123" not in received and b"CONNECT" not in received
    finally:
        server.close()
        await server.wait_closed()


async def test_a_server_certificate_from_another_ca_is_refused(pki, start_server):
    cert, key = pki["rogue_server"]
    server = start_server(ServerTls(cert_file=str(cert), key_file=str(key)))
    with pytest.raises(bus.BusError) as err:
        await asyncio.wait_for(bus.connect(server.url(), "tls-test", deadline_s=5, tls=_tls(pki)), CONNECT_S)
    assert err.value.code == "nats_tls" and "CERTIFICATE_VERIFY_FAILED" in str(err.value)


async def test_a_server_that_verifies_clients_needs_their_certificate(pki, start_server):
    cert, key = pki["server"]
    server = start_server(ServerTls(cert_file=str(cert), key_file=str(key), ca_file=str(pki["ca"].pem)))
    nc = await asyncio.wait_for(bus.connect(server.url(), "mtls", deadline_s=10, tls=_tls(pki, client_cert=True)),
                                CONNECT_S)
    try:
        await _round_trip(nc)
    finally:
        await bus.close(nc)
    with pytest.raises(bus.BusError) as err:
        await asyncio.wait_for(bus.connect(server.url(), "no-cert", deadline_s=5, tls=_tls(pki)), CONNECT_S)
    assert err.value.code in {"nats_tls", "nats_unreachable"}, err.value  # an alert, or a hang-up then the deadline


def test_tls_settings_are_checked_before_connecting(pki, tmp_path, monkeypatch):
    cert, _ = pki["client"]
    monkeypatch.setenv("WARMSERVE_NATS_TLS_CERT", str(cert))  # without its key
    with pytest.raises(bus.BusError) as err:
        bus.tls_context("nats://127.0.0.1:4222")
    assert err.value.code == "nats_tls_config" and "WARMSERVE_NATS_TLS_KEY" in str(err.value)
    monkeypatch.delenv("WARMSERVE_NATS_TLS_CERT")
    monkeypatch.setenv("WARMSERVE_NATS_TLS_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(bus.BusError) as err:
        bus.tls_context("nats://127.0.0.1:4222")
    assert "WARMSERVE_NATS_TLS_CA" in str(err.value)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    monkeypatch.setenv("WARMSERVE_NATS_TLS_CA", str(not_pem))
    with pytest.raises(bus.BusError) as err:
        bus.tls_context("nats://127.0.0.1:4222")
    assert err.value.code == "nats_tls_config"
    monkeypatch.delenv("WARMSERVE_NATS_TLS_CA")
    assert bus.tls_context("nats://127.0.0.1:4222") is None  # nothing set, nats://: plain text as before
    assert bus.tls_context("tls://127.0.0.1:4222") is not None  # tls:// alone: the system's CAs
