"""Who may talk to the server: TLS or mutual TLS from certificate files, bearer tokens with rights.

Without a `SecurityConfig` the server listens in plaintext and everyone may call everything
(the default, fine on localhost). With one:

- `tls_cert` + `tls_key` (PEM files) switch the port to TLS; `client_ca` as well makes it mutual
  TLS: a client must present a certificate signed by that CA or the handshake fails.
- `tokens` (token -> rights) turns on bearer-token checks: every call must carry the metadata
  `authorization: Bearer <token>`. No token, a malformed header or an unknown token is
  UNAUTHENTICATED; a known token without the right the method needs is PERMISSION_DENIED.
  Rights do not imply one another: an operator who queries and administers gets `query,admin`.
- `open_health` (default True): grpc health checks need no token, so load balancers and
  orchestrators can probe without a secret (they learn only SERVING / NOT_SERVING).
  `open_reflection` (default False): reflection needs a token with `query`, as GetSchema does
  (grpcurl sends its `-H` headers with reflection requests too). Both matter only with tokens;
  without tokens nothing needs one.

Tokens come from a file or from the environment variable ATELIER_TOKENS (see `load_security`),
in one format: `TOKEN RIGHT[,RIGHT...]` per entry, `#` starts a comment. Tokens are kept only as
SHA-256 digests, and a presented token is compared with every configured one by
`hmac.compare_digest`, without stopping at a match: the time taken says nothing about which
token matched, nor (digests being of equal length) how long the real tokens are.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import ssl
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger("atelier.server")

# The right each method needs. A method not listed (an admin RPC added later, say) needs
# DEFAULT_RIGHT: a new method is closed until someone decides who may call it.
METHOD_RIGHTS: dict[str, str] = {
    "/atelier.v1.Atelier/GenerateAndRetrieve": "query",
    "/atelier.v1.Atelier/GetSchema": "query",
    "/atelier.v1.Atelier/RetrieveSimilar": "query",
    "/atelier.v1.Atelier/ReloadIndex": "admin",
}
DEFAULT_RIGHT = "admin"
# Whole services by prefix: what they need when closed by configuration.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."  # v1alpha and v1
SERVICE_RIGHTS: dict[str, str] = {HEALTH_PREFIX: "query", REFLECTION_PREFIX: "query"}

TOKENS_ENV = "ATELIER_TOKENS"  # server: the tokens, in the tokens-file format, entries split by ';' or lines
TOKEN_ENV = "ATELIER_TOKEN"  # client (`atelier query`): the one token to send
MIN_TOKEN_LENGTH = 16
# RFC 6750's b64token: what may follow "Bearer " (and what gRPC metadata carries as is).
_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_GENERATE_HINT = "make one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def known_rights() -> set[str]:
    return {DEFAULT_RIGHT, *METHOD_RIGHTS.values(), *SERVICE_RIGHTS.values()}


class SecurityConfigError(ValueError):
    """A tokens file, tokens variable or certificate setting that the server refuses to start with."""


def required_right(method: str) -> str:
    for prefix, right in SERVICE_RIGHTS.items():
        if method.startswith(prefix):
            return right
    return METHOD_RIGHTS.get(method, DEFAULT_RIGHT)


def check_token(token: str, where: str = "") -> None:
    """Refuse an empty, short or oddly spelled token; the message never contains the token."""
    at = f"{where}: " if where else ""
    if not token:
        raise SecurityConfigError(f"{at}empty token")
    if not _TOKEN_RE.fullmatch(token):
        raise SecurityConfigError(f"{at}a token may contain only letters, digits and - . _ ~ + / (then = padding)")
    if len(token) < MIN_TOKEN_LENGTH:
        raise SecurityConfigError(f"{at}token too short ({len(token)} characters; at least {MIN_TOKEN_LENGTH}); "
                                  + _GENERATE_HINT)


def parse_tokens(text: str, source: str, separators: str = "\n") -> dict[str, frozenset[str]]:
    """Parse `TOKEN RIGHT[,RIGHT...]` entries (one per line, or split by any of `separators`).

    `#` starts a comment (a token cannot contain `#`), blank entries are skipped. Errors name
    the source and the entry number, never the token; an empty result is an error too (an
    empty tokens file is a mistake, not a wish to serve without checks).
    """
    tokens: dict[str, frozenset[str]] = {}
    first_seen: dict[str, int] = {}
    rights_known = known_rights()
    entries = re.split("[" + re.escape(separators) + "]", text)
    unit = "line" if separators == "\n" else "entry"
    for number, entry in enumerate(entries, 1):
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        where = f"{source} {unit} {number}"
        parts = entry.split()
        if len(parts) != 2:
            raise SecurityConfigError(f"{where}: expected 'TOKEN RIGHT[,RIGHT...]' (rights: "
                                      f"{', '.join(sorted(rights_known))}), found {len(parts)} fields")
        token, rights_text = parts
        check_token(token, where)
        rights = [r.strip() for r in rights_text.split(",")]
        unknown = [r for r in rights if r not in rights_known]
        if unknown or not rights:
            shown = ", ".join(repr(r) for r in unknown) or "none"
            raise SecurityConfigError(f"{where}: unknown right {shown}; known: {', '.join(sorted(rights_known))}")
        if token in tokens:
            raise SecurityConfigError(f"{where}: the same token as {unit} {first_seen[token]}")
        tokens[token] = frozenset(rights)
        first_seen[token] = number
    if not tokens:
        raise SecurityConfigError(f"no tokens in {source}: expected lines 'TOKEN RIGHT[,RIGHT...]'")
    return tokens


def load_tokens_file(path: Path) -> dict[str, frozenset[str]]:
    """Read a tokens file; refuse one that other users may read or write (as ssh does with keys)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"tokens file not found: {path}") from None
    if os.name == "posix":
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            raise SecurityConfigError(f"tokens file {path} is readable or writable by every user "
                                      f"(mode {stat.filemode(mode)}); run: chmod 600 {path}")
        if mode & (stat.S_IRGRP | stat.S_IWGRP):
            log.warning("tokens file %s is group-accessible (mode %s); chmod 600 is safer", path, stat.filemode(mode))
    return parse_tokens(path.read_text(encoding="utf-8"), str(path))


@dataclass(frozen=True)
class SecurityConfig:
    """TLS, mutual TLS and bearer tokens for `start_server` (see the module docstring).

    `tokens` maps token -> rights; it is replaced at construction by a `TokenTable` that keeps
    digests only, and is left out of repr, so logging a config never prints a secret.
    """

    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    tokens: Mapping[str, Iterable[str]] | TokenTable = field(default_factory=dict, repr=False)
    open_health: bool = True
    open_reflection: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
        if self.client_ca is not None and self.tls_cert is None:
            raise SecurityConfigError("mutual TLS (--client-ca) needs TLS: give --tls-cert and --tls-key too")
        for name in ("tls_cert", "tls_key", "client_ca"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if not isinstance(self.tokens, TokenTable):
            object.__setattr__(self, "tokens", TokenTable(self.tokens))

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        """Read and check the PEM files now (at start), so a wrong file fails with a clear error
        (gRPC itself only says "Failed to bind to address" for a key that does not match)."""
        key, cert = _read_pem(self.tls_key, "private key"), _read_pem(self.tls_cert, "certificate")
        ca = _read_pem(self.client_ca, "certificate") if self.client_ca else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # The password callback keeps OpenSSL from prompting on a terminal for an encrypted key.
            context.load_cert_chain(self.tls_cert, self.tls_key, password=lambda: b"")
        except ssl.SSLError as error:
            raise SecurityConfigError(f"TLS certificate {self.tls_cert} and key {self.tls_key} are unusable "
                                      f"together ({error.reason or error}); the key must be the certificate's "
                                      "and unencrypted") from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as error:
                raise SecurityConfigError(f"client CA {self.client_ca} is unusable ({error.reason or error})") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The server interceptors this config needs (put them first: refuse before any other work)."""
        return [TokenAuthInterceptor(self.tokens, self.open_health, self.open_reflection)] if self.tokens else []

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Add the listening port, TLS or plaintext; returns the port (0 when it could not bind)."""
        if self.tls:
            return server.add_secure_port(address, self.server_credentials())
        if self.tokens and not _is_loopback(address):
            log.warning("bearer tokens over plaintext on %s: anyone on the network path can read them; "
                        "use --tls-cert/--tls-key", address)
        return server.add_insecure_port(address)

    def describe(self) -> str:
        parts = ["mutual TLS" if self.mutual_tls else "TLS" if self.tls else "plaintext"]
        if self.tokens:
            parts.append(f"{len(self.tokens)} bearer token(s)")
            parts.append(f"health {'open' if self.open_health else 'needs a token'}")
            parts.append(f"reflection {'open' if self.open_reflection else 'needs a token'}")
        else:
            parts.append("no tokens")
        return ", ".join(parts)


def load_security(
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    client_ca: Path | None = None,
    tokens_file: Path | None = None,
    open_health: bool = True,
    open_reflection: bool = False,
    environ: Mapping[str, str] | None = None,
) -> SecurityConfig | None:
    """What `atelier serve` builds from its flags; None when nothing asks for security.

    Tokens: `tokens_file` when given (ATELIER_TOKENS is then ignored, with a warning), else
    ATELIER_TOKENS when set (entries separated by ';' or newlines), else no token checks.
    """
    environ = os.environ if environ is None else environ
    tokens: Mapping[str, Iterable[str]] = {}
    env_tokens = environ.get(TOKENS_ENV)
    if tokens_file is not None:
        if env_tokens is not None:
            log.warning("%s is set but --tokens-file %s wins; the variable is ignored", TOKENS_ENV, tokens_file)
        tokens = load_tokens_file(tokens_file)
    elif env_tokens is not None:
        tokens = parse_tokens(env_tokens, f"${TOKENS_ENV}", separators=";\n")
    if not tokens and (not open_health or open_reflection):
        raise SecurityConfigError("closing health or opening reflection means something only with tokens "
                                  f"(--tokens-file or ${TOKENS_ENV})")
    if tls_cert is None and tls_key is None and client_ca is None and not tokens:
        return None
    return SecurityConfig(tls_cert, tls_key, client_ca, tokens, open_health, open_reflection)


class TokenTable:
    """Configured tokens as SHA-256 digests with their rights; `rights_of` compares against all."""

    def __init__(self, tokens: Mapping[str, Iterable[str]]):
        rights_known = known_rights()
        self._entries: list[tuple[bytes, frozenset[str]]] = []
        for number, (token, rights) in enumerate(tokens.items(), 1):
            check_token(token, f"token {number}")
            rights = frozenset([rights] if isinstance(rights, str) else rights)
            if not rights or not rights <= rights_known:
                raise SecurityConfigError(f"token {number}: rights {sorted(rights)} not a non-empty subset of "
                                          f"{sorted(rights_known)}")
            self._entries.append((_digest(token), rights))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenTable({len(self)} tokens)"

    def rights_of(self, presented: str) -> frozenset[str] | None:
        """The rights of `presented`, or None when it is no configured token.

        Every configured digest is compared, match or not, with hmac.compare_digest: the time
        taken does not depend on which token (if any) matched.
        """
        digest = _digest(presented)
        found = None
        for known, rights in self._entries:
            if hmac.compare_digest(digest, known):
                found = rights
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Checks `authorization: Bearer <token>` on every call before the call reaches a servicer."""

    def __init__(self, tokens: TokenTable, open_health: bool = True, open_reflection: bool = False):
        self.tokens = tokens
        self.open_prefixes = tuple(p for p, is_open in ((HEALTH_PREFIX, open_health),
                                                        (REFLECTION_PREFIX, open_reflection)) if is_open)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(self.open_prefixes):
            return continuation(handler_call_details)
        code, details = self.check(method, handler_call_details.invocation_metadata or ())
        if code is None:
            return continuation(handler_call_details)
        # The real handler only tells the shape (unary or streaming) of the refusal; it never runs.
        return _refusal(continuation(handler_call_details), method, code, details)

    def check(self, method: str, metadata) -> tuple[grpc.StatusCode | None, str]:
        """(None, "") when `metadata` (key, value pairs) carries a token with the right `method` needs,
        else the refusal's code and message; the HTTP face (server/http.py) checks its calls with this too."""
        headers = [value for key, value in metadata if key.lower() == "authorization"]
        if not headers:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token: send metadata 'authorization: Bearer <token>'"
        if len(headers) > 1:
            return grpc.StatusCode.UNAUTHENTICATED, "more than one authorization header"
        value = headers[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, "malformed authorization header: expected 'Bearer <token>'"
        rights = self.tokens.rights_of(token)
        if rights is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token"
        needed = required_right(method)
        if needed not in rights:
            return grpc.StatusCode.PERMISSION_DENIED, f"{method} needs the '{needed}' right, which this token lacks"
        return None, ""


def _refusal(handler: grpc.RpcMethodHandler | None, method: str, code: grpc.StatusCode, details: str):
    """A handler of the same shape as the real one (unary or streaming) that only aborts."""

    def deny(request_or_iterator, context):
        log.info("refused %s from %s: %s %s", method, context.peer(), code.name, details)
        context.abort(code, details)

    request_streaming = handler is not None and handler.request_streaming
    response_streaming = handler is not None and handler.response_streaming
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(request_streaming, response_streaming)]
    # The request is never read: no deserializer, so the server hands `deny` raw bytes.
    return make(deny)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"TLS {what} file not found: {path}") from None
    if b"-----BEGIN" not in data:
        raise SecurityConfigError(f"{path} is not a PEM {what} (no '-----BEGIN' line)")
    return data


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the client side (AtelierClient, `atelier query`) -------------------------------------------

ATELIER_SERVICE = "atelier.v1.Atelier"
# Schemes gRPC's own resolvers take: a target with one is handed over unchanged.
RESOLVER_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")
TARGET_FORMS = ("HOST:PORT (one server), a comma-separated list of IP:PORT, all IPv4 (10.0.0.5:50051,10.0.0.6:50051) "
                "or all IPv6 ([fd00::5]:50051,[fd00::6]:50051), or dns:///NAME:PORT (every address NAME resolves to)")
# Retrying on UNAVAILABLE is safe for every Atelier method: GetSchema and RetrieveSimilar only read,
# GenerateAndRetrieve changes nothing (the same seed, the same answer) and ReloadIndex serves what is
# published. gRPC retries only an attempt that got no response headers, one never answered.
# 5 attempts in all, waiting a random time up to 0.1, 0.2, 0.4, 0.8 s before each retry.
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}


def channel_target(target: str) -> str:
    """The gRPC target for a server target as a user gives it (`atelier query --target`).

    One HOST:PORT, and the forms of gRPC's resolvers (dns:///NAME:PORT, ipv4:..., unix:PATH), stay
    as they are; a comma-separated list of IP:PORT becomes gRPC's ipv4: or ipv6: multi-address
    target. Host names are not taken in a list (gRPC's address lists hold IP addresses only): a
    name that stands for several servers is dns:///NAME:PORT, which gRPC resolves and re-resolves.
    """
    target = target.strip()
    if target.startswith(RESOLVER_SCHEMES):
        return target
    entries = [entry.strip() for entry in target.split(",")]
    if not all(entries):
        raise ValueError(f"server target {target!r} has an empty entry; give {TARGET_FORMS}")
    if len(entries) == 1:
        return entries[0]
    families = {_address_family(entry, target) for entry in entries}
    if len(families) > 1:
        raise ValueError(f"server target {target!r} mixes IPv4 and IPv6 addresses; give {TARGET_FORMS}")
    return f"{families.pop()}:{','.join(entries)}"


def _address_family(entry: str, target: str) -> str:
    """'ipv4' or 'ipv6' for one IP:PORT entry of a list, else a ValueError naming the entry."""
    host, colon, port = entry.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        hint = f"; for a host name give dns:///{entry}" if colon and host and not bracketed else ""
        raise ValueError(f"{entry!r} in server target {target!r} is not IP:PORT{hint}; "
                         f"give {TARGET_FORMS}") from None
    if not (port.isdigit() and 0 < int(port) < 65536) or bracketed != (ip.version == 6):
        raise ValueError(f"{entry!r} in server target {target!r} is not IP:PORT (a port 1-65535; an IPv6 "
                         f"address in brackets, as [::1]:50051); give {TARGET_FORMS}")
    return f"ipv{ip.version}"


def channel_options(server_name: str | None = None) -> list[tuple[str, str | int]]:
    """The options of every client channel: round robin over all the addresses its target names,
    and calls that get UNAVAILABLE (a server gone or still loading) retried on another (RETRY_POLICY)."""
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": [{"service": ATELIER_SERVICE}], "retryPolicy": RETRY_POLICY}],
    }
    options: list[tuple[str, str | int]] = [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.enable_retries", 1),
        # this config, not one a DNS TXT record might carry
        ("grpc.service_config_disable_resolution", 1),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _is_loopback_target(target: str) -> bool:
    """Whether every server a target names is on this machine (for the plaintext token warning)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    addresses = re.sub(r"^(dns:(//[^/]*)?/|ipv4:|ipv6:)", "", target)
    return all(_is_loopback(address) for address in addresses.split(","))


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_ca: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    server_name: str | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A channel to `target` (one HOST:PORT, a list IP:PORT,IP:PORT or dns:///NAME:PORT: see
    channel_target), balanced and retried as channel_options says: TLS when `tls` or any
    certificate file is given, else plaintext.

    `root_ca`: trust this CA (default: the system's roots); `client_cert` + `client_key`: present
    this certificate (mutual TLS); `server_name`: the name expected in the server's certificate
    when it differs from the target's host. `token` goes out as `authorization: Bearer <token>`:
    on TLS as call credentials; on plaintext (which gRPC refuses call credentials on, since
    anyone on the path can read them) as plain metadata added to every call.
    """
    if (client_cert is None) != (client_key is None):
        raise SecurityConfigError("a client certificate needs its key: give both --cert and --key")
    if token is not None:
        token = token.strip()
        if not token or not _TOKEN_RE.fullmatch(token):
            raise SecurityConfigError("the token is empty or has characters a bearer token cannot have")
    tls = tls or root_ca is not None or client_cert is not None
    target = channel_target(target)
    if tls and not server_name and target.startswith(("ipv4:", "ipv6:")) and "," in target:
        # gRPC would check the certificate against the whole list as one name, which never matches
        raise SecurityConfigError("TLS to a list of addresses needs the name in the servers' certificate: "
                                  "give --server-name NAME (or one HOST:PORT, or dns:///NAME:PORT)")
    options = channel_options(server_name)
    if token and not tls and not _is_loopback_target(target):
        log.warning("sending a bearer token over plaintext to %s: anyone on the network path can read it; "
                    "use TLS (--ca or --tls)", target)
    if not tls:
        channel = grpc.insecure_channel(target, options=options)
        return grpc.intercept_channel(channel, _BearerMetadata(token)) if token else channel
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read_pem(root_ca, "certificate") if root_ca else None,
        private_key=_read_pem(client_key, "private key") if client_key else None,
        certificate_chain=_read_pem(client_cert, "certificate") if client_cert else None,
    )
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, credentials, options=options)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)
        self.metadata = metadata


class _BearerMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a plaintext channel."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):
        return _CallDetails(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
