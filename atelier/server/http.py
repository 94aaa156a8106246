"""The HTTP face of the servicer: a JSON API and the shoppers' web page, beside the gRPC port.

    GET  /                           the web page (atelier/server/web/: HTML, CSS, JavaScript; no build step)
    GET  /v1/schema                  GetSchema
    POST /v1/generate-and-retrieve   GenerateAndRetrieve
    POST /v1/retrieve-similar        RetrieveSimilar
    GET  /metrics                    the server's Prometheus metrics (telemetry.py), open like the page

A body is the gRPC request in protobuf's JSON mapping (`json_format`: the proto's JSON names,
`{"attributes": {"category": {"values": ["Dress"]}}, "topK": 5}`), and a response is the gRPC
response the same way (bytes as base64, uint64 as a string). A call runs the AtelierServicer's
own method with a small context (`HttpContext`: the deadline, and abort), so validation, limits,
admission, batching and deadlines are exactly gRPC's, and its status code becomes an HTTP status
(`STATUS`: INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404,
RESOURCE_EXHAUSTED 429, INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504). An error is
`{"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "..."}}`; a body that is not
JSON or not the message is 400 saying why, one longer than the server's `max_request_bytes` 413
(never read). The deadline is the `X-Timeout-Seconds` header (seconds, 0 or more), else
DEFAULT_TIMEOUT. Every answer carries the request's id in `X-Request-Id`: the one the client
sent in that header (when sane: telemetry.accept_request_id), else a fresh one; the servicer's
request log line carries the same id.

Security follows the gRPC port's `SecurityConfig`: with tokens, every API call needs
`Authorization: Bearer <token>` with the right its gRPC method needs, checked by the same code
(`TokenAuthInterceptor.check`); the page and its files are open (they hold no data). With TLS
the port speaks HTTPS with the same certificate and, with a client CA, asks for client
certificates the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, NoReturn
from urllib.parse import urlsplit

import grpc
from google.protobuf import json_format

from atelier.retrieval.service import Limits
from atelier.server.security import SecurityConfig, TokenAuthInterceptor, _is_loopback
from atelier.server.telemetry import CONTENT_TYPE as METRICS_CONTENT_TYPE
from atelier.server.telemetry import REQUEST_ID_KEY, Telemetry, accept_request_id
from atelier.server.wire import pb

log = logging.getLogger("atelier.server")
SERVICE = pb.DESCRIPTOR.services_by_name["Atelier"].full_name
DEFAULT_TIMEOUT = 60.0  # seconds, when a request has no X-Timeout-Seconds header
TIMEOUT_HEADER = "X-Timeout-Seconds"
REQUEST_ID_HEADER = "X-Request-Id"
METRICS_PATH = "/metrics"
IDLE_TIMEOUT = 30.0  # seconds a connection may wait between (or in the middle of) requests
STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
WEB_FILES = {  # path -> (file in atelier/server/web, content type); nothing else is served from there
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = {  # the page loads nothing from elsewhere; thumbnails and drawings are data: URLs
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Route:
    method: str  # the gRPC method, e.g. "GenerateAndRetrieve"
    request: type  # its request message class
    verb: str  # "GET" or "POST"

    @property
    def grpc_method(self) -> str:
        return f"/{SERVICE}/{self.method}"


ROUTES = {
    "/v1/generate-and-retrieve": Route("GenerateAndRetrieve", pb.GenerateAndRetrieveRequest, "POST"),
    "/v1/retrieve-similar": Route("RetrieveSimilar", pb.RetrieveSimilarRequest, "POST"),
    "/v1/schema": Route("GetSchema", pb.GetSchemaRequest, "GET"),
}


class HttpError(Exception):
    """An answer other than 200: the HTTP status, the gRPC status name and the message."""

    def __init__(self, status: int, name: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.name, self.message, self.headers = status, name, message, dict(headers or {})

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.status, "status": self.name, "message": self.message}}).encode()


def invalid(message: str) -> HttpError:
    return HttpError(400, grpc.StatusCode.INVALID_ARGUMENT.name, message)


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class HttpContext:
    """What the servicer asks of a grpc.ServicerContext: the time left, abort (which raises), and
    the request id as the call's metadata."""

    face = "http"  # how the servicer's telemetry labels the call

    def __init__(self, timeout: float, clock=time.monotonic, request_id: str = ""):
        self._clock = clock
        self._at = clock() + timeout
        self.request_id = request_id

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((REQUEST_ID_KEY, self.request_id),) if self.request_id else ()

    def set_trailing_metadata(self, metadata) -> None:
        pass  # the id is the face's own (the X-Request-Id header)

    def time_remaining(self) -> float:
        return max(0.0, self._at - self._clock())

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(code, details)


def parse_request(message_class: type, body: bytes):
    """The JSON body as a `message_class`; an empty body is the empty message (as on gRPC)."""
    name = message_class.DESCRIPTOR.full_name
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise invalid(f"the request body is not UTF-8 text ({error.reason} at byte {error.start}); send JSON") from None
    if not text.strip():
        return message_class()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise invalid(f"the request body is not JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except RecursionError:
        raise invalid("the request body is not JSON this server reads: nested too deeply") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object (a {name}), not a JSON {type(data).__name__}")
    try:
        return json_format.ParseDict(data, message_class())
    except (json_format.ParseError, RecursionError) as error:
        raise invalid(f"the request body is not a valid {name}: {error}") from None


def split_address(address: str) -> tuple[str, int, socket.AddressFamily]:
    """HOST:PORT (an IPv6 host in brackets) as (host, port, address family)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"an HTTP address is HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080), got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port), socket.AF_INET6 if ":" in host else socket.AF_INET


def tls_context(security: SecurityConfig | None) -> ssl.SSLContext | None:
    """The gRPC port's certificate (and client CA) for HTTPS; None for plaintext."""
    if security is None or not security.tls:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(security.tls_cert, security.tls_key, password=lambda: b"")
    if security.mutual_tls:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=security.client_ca)
    return context


def load_web() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("atelier.server").joinpath("web")
    return {path: (folder.joinpath(name).read_bytes(), kind) for path, (name, kind) in WEB_FILES.items()}


class HttpFace:
    """The HTTP server on its own thread (`start`), calling `servicer` (the gRPC server's own)."""

    def __init__(self, servicer, address: str, limits: Limits, security: SecurityConfig | None = None,
                 default_timeout: float = DEFAULT_TIMEOUT):
        host, port, family = split_address(address)
        self.servicer, self.limits, self.default_timeout = servicer, limits, default_timeout
        self.security = security
        self.tokens = TokenAuthInterceptor(security.tokens) if security is not None and security.tokens else None
        self.web = load_web()
        self.telemetry: Telemetry | None = getattr(servicer, "telemetry", None)
        self.closing = False
        self._inflight, self._idle = 0, threading.Condition()
        if self.tokens is not None and not security.tls and not _is_loopback(address):
            log.warning("bearer tokens over plaintext HTTP on %s: anyone on the network path can read them; "
                        "use --tls-cert/--tls-key", address)
        try:
            self.httpd = _Server((host, port), family, tls_context(security))
        except OSError as error:
            raise OSError(f"cannot listen for HTTP on {address}: {error.strerror or error}") from error
        self.httpd.face = self
        self.host, self.port = host, self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host or "0.0.0.0"
        return f"{'https' if self.security is not None and self.security.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> HttpFace:
        self._thread.start()
        return self

    def stop(self, grace: float | None = 5.0) -> None:
        """Take no new connections or requests, let in-flight calls finish for up to `grace` s, close."""
        self.closing = True
        if self._thread.is_alive():
            self.httpd.shutdown()
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=grace)
        self.httpd.server_close()

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def authorize(self, route: Route, headers) -> None:
        """The gRPC port's token check, on the Authorization header(s)."""
        if self.tokens is None:
            return
        metadata = [("authorization", value) for value in headers.get_all("Authorization", [])]
        code, details = self.tokens.check(route.grpc_method, metadata)
        if code is not None:
            extra = {"WWW-Authenticate": 'Bearer realm="atelier"'} if code == grpc.StatusCode.UNAUTHENTICATED else {}
            raise HttpError(STATUS[code], code.name, details, extra)

    def timeout_of(self, headers) -> float:
        raw = headers.get(TIMEOUT_HEADER)
        if raw is None:
            return self.default_timeout
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds >= 0):
            raise invalid(f"{TIMEOUT_HEADER} must be a number of seconds, 0 or more; got {raw[:40]!r}")
        return seconds

    def call(self, route: Route, body: bytes, timeout: float, request_id: str = "") -> dict[str, Any]:
        """Parse `body`, run the servicer's method as gRPC would, and return the response as JSON."""
        request = parse_request(route.request, body)
        with self._counted():
            try:
                response = getattr(self.servicer, route.method)(request, HttpContext(timeout, request_id=request_id))
            except _Aborted as aborted:
                raise HttpError(STATUS.get(aborted.code, 500), aborted.code.name, aborted.details) from None
        return json_format.MessageToDict(response)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has its Content-Length
    server_version = "atelier"
    timeout = IDLE_TIMEOUT
    _consumed = True  # whether the request's body has been read (else the connection cannot be reused)
    _request_id = ""  # this request's id (X-Request-Id), set as it is handled
    _status = 0  # the status sent, for the metrics

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()  # here, in the connection's own thread, not in accept()

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _handle(self, verb: str) -> None:
        face: HttpFace = self.server.face
        self._consumed = "Content-Length" not in self.headers and "Transfer-Encoding" not in self.headers
        self._request_id = accept_request_id(self.headers.get(REQUEST_ID_HEADER))
        self._status = 0
        path = urlsplit(self.path).path
        known = path in face.web or path in ROUTES or path == METRICS_PATH
        self._route_label, self._counted = path if known else "other", False
        try:
            self._route(face, verb, path)
        finally:
            self._count()  # a request that ended without an answer (status 0)

    def _count(self) -> None:
        telemetry = self.server.face.telemetry
        if telemetry is not None and not getattr(self, "_counted", True):  # True: not a request _handle took
            self._counted = True
            telemetry.http_request(self._route_label, self._status)

    def _route(self, face: HttpFace, verb: str, path: str) -> None:
        try:
            if face.closing:
                raise HttpError(503, grpc.StatusCode.UNAVAILABLE.name, "the server is shutting down")
            if path in face.web or (path == METRICS_PATH and face.telemetry is not None):
                if verb != "GET":
                    raise HttpError(405, "METHOD_NOT_ALLOWED", f"{path} takes GET", {"Allow": "GET"})
                if path == METRICS_PATH:
                    return self._send(200, face.telemetry.exposition(), METRICS_CONTENT_TYPE)
                return self._send(200, *face.web[path], PAGE_HEADERS)
            route = ROUTES.get(path)
            if route is None:
                raise HttpError(404, grpc.StatusCode.NOT_FOUND.name, f"no such path {path[:100]!r}; the API: "
                                + ", ".join(f"{r.verb} {p}" for p, r in ROUTES.items())
                                + f"; the web page: GET /; metrics: GET {METRICS_PATH}")
            if verb != route.verb:
                raise HttpError(405, "METHOD_NOT_ALLOWED", f"{path} takes {route.verb}", {"Allow": route.verb})
            face.authorize(route, self.headers)  # before any other work, as the gRPC interceptor does
            timeout = face.timeout_of(self.headers)
            body = self._body(face.limits.max_request_bytes) if verb == "POST" else b""
            answer = json.dumps(face.call(route, body, timeout, self._request_id)).encode()
            if len(answer) > face.limits.max_response_bytes:  # as the gRPC port refuses an over-size message
                raise HttpError(400, grpc.StatusCode.RESOURCE_EXHAUSTED.name,
                                f"the answer of {len(answer)} bytes exceeds the server's limit of "
                                f"{face.limits.max_response_bytes} bytes (max_response_bytes; atelier serve "
                                "--max-response-bytes): ask for fewer images or products, or none returned")
            self._send(200, answer, "application/json")
        except HttpError as error:
            self._send(error.status, error.body(), "application/json", error.headers)
        except Exception:  # a bug: a 500 the client can read, and the connection goes on
            log.exception("HTTP %s %s failed", verb, path)
            self._send(500, HttpError(500, "INTERNAL", "internal error; see the server log").body(), "application/json")

    def _body(self, limit: int) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise HttpError(411, "LENGTH_REQUIRED", "send the body with a Content-Length (no Transfer-Encoding)")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpError(411, "LENGTH_REQUIRED", "a POST needs a Content-Length header and a JSON body")
        if not raw.strip().isdigit():
            raise invalid(f"Content-Length {raw[:40]!r} is not a number of bytes")
        length = int(raw)
        if length > limit:
            raise HttpError(413, grpc.StatusCode.RESOURCE_EXHAUSTED.name,
                            f"request body of {length} bytes exceeds the server's limit of {limit} bytes "
                            "(max_request_bytes; atelier serve --max-request-bytes)")
        self._consumed = True
        return self.rfile.read(length)

    def _send(self, status: int, body: bytes, kind: str, headers: Mapping[str, str] | None = None) -> None:
        if not self._consumed or self.server.face.closing:
            self.close_connection = True  # an unread body would be taken for the next request
        self._status = status
        self._count()  # before the answer leaves: a client that has it finds it counted
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header(REQUEST_ID_HEADER, self._request_id)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client has gone

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (the base class's name)
        log.debug("http %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    face: HttpFace

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, tls: ssl.SSLContext | None):
        self.address_family, self.tls = family, tls
        super().__init__(address, _Handler)

    def get_request(self):
        sock, peer = super().get_request()
        if self.tls is not None:  # the handshake runs in the handler's thread (_Handler.setup)
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, peer

    def handle_error(self, request, client_address) -> None:
        log.debug("http connection from %s failed", client_address, exc_info=True)
