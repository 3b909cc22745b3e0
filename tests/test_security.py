"""Issue 5, security: TLS, mutual TLS and bearer tokens on a real server on loopback.

Certificates are made here with ``cryptography``: a test CA, a server
certificate for localhost / 127.0.0.1, a client certificate from the same
CA, and a rogue CA with its own client certificate.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pairscore.v1 import scoring_pb2 as pb
from pairscore.v1 import scoring_pb2_grpc as pb_grpc
from pairscore_server.auth import TokenSet, bearer_token, parse_token_file
from pairscore_server.lifecycle import RunningServer, StartupError

from harness.fake_engine import FakeEngine
from harness.servers import ServerThread, make_config, metric_samples

TOKEN = "tok-3b1f0c9e5d"
REQUEST = pb.ScoreRequest(pairs=[pb.Pair(id="a", prompt="hello", response=" world")])


# --- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(cn: str) -> tuple[Pem, ec.EllipticCurvePrivateKey]:
    key = _key()
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key


def issue(ca: Pem, ca_key: ec.EllipticCurvePrivateKey, cn: str, *, server: bool) -> Pem:
    key = _key()
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    builder = _builder(cn, ca_cert.subject, key.public_key())
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    rogue_ca: Pem
    rogue_client: Pem
    files: dict[str, str]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_key = make_ca("pairscore test CA")
    rogue_ca, rogue_key = make_ca("rogue CA")
    server = issue(ca, ca_key, "localhost", server=True)
    client = issue(ca, ca_key, "pipeline-client", server=False)
    rogue_client = issue(rogue_ca, rogue_key, "intruder", server=False)
    root = tmp_path_factory.mktemp("pki")
    files = {}
    for name, data in [
        ("ca.crt", ca.cert),
        ("server.crt", server.cert),
        ("server.key", server.key),
    ]:
        (root / name).write_bytes(data)
        files[name] = str(root / name)
    return Pki(ca, server, client, rogue_ca, rogue_client, files)


# --- harness ------------------------------------------------------------------------------


@pytest.fixture
def launch() -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(**config: Any) -> ServerThread:
        st_ = ServerThread(FakeEngine(), **config)
        started.append(st_)
        return st_.start()

    yield start
    for st_ in reversed(started):
        st_.stop()


def tls_channel(
    target: str, pki: Pki, *, trust: Pem | None = None, client: Pem | None = None
) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(trust or pki.ca).cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(target, creds)


def score(channel: grpc.Channel, **kwargs: Any) -> pb.ScoreResponse:
    return pb_grpc.ScoringServiceStub(channel).Score(REQUEST, timeout=10, **kwargs)


def check_health(channel: grpc.Channel, **kwargs: Any) -> str:
    response = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=10, **kwargs
    )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def code_of(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


# --- TLS -------------------------------------------------------------------------------------


def test_tls_serves_trusting_clients_and_refuses_plaintext_and_untrusting_ones(
    launch: Callable[..., ServerThread], pki: Pki
) -> None:
    st_ = launch(tls_cert=pki.files["server.crt"], tls_key=pki.files["server.key"])
    target = f"localhost:{st_.server.port}"
    with tls_channel(target, pki) as channel:
        assert score(channel).results[0].HasField("scores")
        assert check_health(channel) == "SERVING"
    with grpc.insecure_channel(target) as plaintext:  # plaintext to a TLS port
        assert code_of(lambda: score(plaintext)) is grpc.StatusCode.UNAVAILABLE
    with tls_channel(target, pki, trust=pki.rogue_ca) as wrong_trust:  # server cert not trusted
        assert code_of(lambda: score(wrong_trust)) is grpc.StatusCode.UNAVAILABLE
    with tls_channel(target, pki) as channel:  # the server took no harm
        assert score(channel).results[0].HasField("scores")


def test_mutual_tls_needs_a_client_certificate_from_the_trusted_ca(
    launch: Callable[..., ServerThread], pki: Pki
) -> None:
    st_ = launch(
        tls_cert=pki.files["server.crt"],
        tls_key=pki.files["server.key"],
        tls_client_ca=pki.files["ca.crt"],
    )
    target = f"localhost:{st_.server.port}"
    with tls_channel(target, pki, client=pki.client) as channel:
        assert score(channel).results[0].HasField("scores")
    for client in (None, pki.rogue_client):  # no certificate / one from an untrusted CA
        with tls_channel(target, pki, client=client) as channel:
            assert code_of(lambda channel=channel: score(channel)) is grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(target) as plaintext:
        assert code_of(lambda: score(plaintext)) is grpc.StatusCode.UNAVAILABLE
    with tls_channel(target, pki, client=pki.client) as channel:
        assert check_health(channel) == "SERVING"


def test_the_plaintext_health_port_serves_probes_of_a_tls_server_and_nothing_else(
    launch: Callable[..., ServerThread], pki: Pki
) -> None:
    st_ = launch(
        tls_cert=pki.files["server.crt"],
        tls_key=pki.files["server.key"],
        tls_client_ca=pki.files["ca.crt"],
        health_port=0,
    )
    assert st_.server.health_port not in (None, st_.server.port)
    with grpc.insecure_channel(f"127.0.0.1:{st_.server.health_port}") as channel:
        assert check_health(channel) == "SERVING"
        assert code_of(lambda: score(channel)) is grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"tls_cert": "/nonexistent/server.crt", "tls_key": "server.key"}, "/nonexistent/server.crt"),
        ({"tls_cert": "server.key", "tls_key": "server.key"}, "not a PEM file holding a CERTIFICATE"),
        ({"tls_client_ca": "/nonexistent/ca.crt"}, "client CA bundle /nonexistent/ca.crt"),
    ],
)
def test_unusable_tls_files_stop_the_start_with_a_clear_error(
    pki: Pki, files: dict[str, str], message: str
) -> None:
    settings = {"tls_cert": pki.files["server.crt"], "tls_key": pki.files["server.key"]}
    settings.update({k: pki.files.get(v, v) for k, v in files.items()})
    server = RunningServer(make_config(**settings), engine=FakeEngine())
    with pytest.raises(StartupError, match=message):
        asyncio.run(server.start())
    assert server.port is None  # nothing was opened


# --- bearer tokens ---------------------------------------------------------------------------


def test_bearer_token_is_required_except_for_health_checks(
    launch: Callable[..., ServerThread],
) -> None:
    st_ = launch(auth_tokens=(TOKEN, "second-token"))
    good = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(st_.target) as channel:
        stub = pb_grpc.ScoringServiceStub(channel)
        assert score(channel, metadata=good).results[0].HasField("scores")
        assert score(channel, metadata=(("authorization", "bearer second-token"),)).results
        for metadata in [
            (),
            (("authorization", "Bearer wrong"),),
            (("authorization", f"Bearer {TOKEN}x"),),
            (("authorization", f"Basic {TOKEN}"),),
            (("authorization", TOKEN),),
            (("x-api-key", TOKEN),),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                score(channel, metadata=metadata)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, metadata
            assert "bearer token" in info.value.details()
            assert TOKEN not in info.value.details()
        unauthenticated = grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)) is unauthenticated
        stream = stub.ScoreStream(iter([REQUEST]), timeout=10)
        assert code_of(lambda: list(stream)) is unauthenticated
        # A refused caller's bytes are not even parsed: garbage gets UNAUTHENTICATED too.
        raw = channel.unary_unary("/pairscore.v1.ScoringService/Score")
        assert code_of(lambda: raw(b"\x0a\xff\xff", timeout=10)) is unauthenticated
        # Reflection needs the token; health checks do not (probes carry no secrets).
        with pytest.raises(Exception):  # noqa: B017 - reflection surfaces the RpcError its own way
            ProtoReflectionDescriptorDatabase(channel).get_services()
        assert check_health(channel) == "SERVING"
        assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=good).model_name
    samples = metric_samples(st_.metrics_text())
    assert samples[("pairscore_requests_total", (("code", "UNAUTHENTICATED"), ("method", "Score")))] >= 7
    assert TOKEN not in st_.metrics_text()


def test_tokens_travel_as_call_credentials_over_tls(launch: Callable[..., ServerThread], pki: Pki) -> None:
    st_ = launch(tls_cert=pki.files["server.crt"], tls_key=pki.files["server.key"], auth_tokens=(TOKEN,))
    target = f"localhost:{st_.server.port}"
    channel_creds = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    with grpc.secure_channel(
        target,
        grpc.composite_channel_credentials(channel_creds, grpc.access_token_call_credentials(TOKEN)),
    ) as channel:
        assert score(channel).results[0].HasField("scores")
    with grpc.secure_channel(target, channel_creds) as channel:
        assert code_of(lambda: score(channel)) is grpc.StatusCode.UNAUTHENTICATED


def test_a_token_file_is_read_at_start_and_a_missing_or_empty_one_stops_the_start(
    launch: Callable[..., ServerThread], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# pipeline team\n{TOKEN}\n\n")
    st_ = launch(auth_token_file=str(tokens))
    with grpc.insecure_channel(st_.target) as channel:
        assert score(channel, metadata=(("authorization", f"Bearer {TOKEN}"),)).results
        assert code_of(lambda: score(channel)) is grpc.StatusCode.UNAUTHENTICATED

    for path, message in [(tmp_path / "missing", "cannot read"), (tmp_path / "empty", "holds none")]:
        if path.name == "empty":
            path.write_text("# no tokens yet\n")
        server = RunningServer(make_config(auth_token_file=str(path)), engine=FakeEngine())
        with pytest.raises(StartupError, match=message):
            asyncio.run(server.start())


def test_token_set_reloads_its_file_when_it_changes(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "tokens"
    path.write_text("alpha\n")
    tokens = TokenSet(("from-env",), file=str(path), recheck_s=1.0, clock=lambda: now[0])
    assert tokens.accepts("alpha") and tokens.accepts("from-env")
    assert not tokens.accepts("beta") and not tokens.accepts("alph") and not tokens.accepts("")

    path.write_text("beta\ngamma\n")
    os.utime(path, ns=(10**18, 10**18))
    assert tokens.accepts("alpha")  # not re-read before recheck_s has passed
    now[0] = 2.0
    assert tokens.accepts("beta") and tokens.accepts("gamma") and not tokens.accepts("alpha")

    path.unlink()  # a file that vanished (mid-rotation) keeps the tokens last read
    now[0] = 4.0
    assert tokens.accepts("beta")

    path.write_text("")  # an emptied file revokes its tokens; the fixed ones stay
    now[0] = 6.0
    assert not tokens.accepts("beta") and tokens.accepts("from-env")


def test_token_helpers() -> None:
    assert parse_token_file("# c\n  a  \n\nb\n#d\n") == ["a", "b"]
    assert bearer_token([("authorization", "Bearer  abc ")]) == "abc"
    assert bearer_token([("Authorization", "BEARER abc")]) == "abc"
    assert bearer_token([("authorization", "Bearer")]) is None
    assert bearer_token([("other", "Bearer abc")]) is None
    assert bearer_token(None) is None
    with pytest.raises(ValueError, match="no token"):
        TokenSet(())
