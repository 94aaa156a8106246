"""The gRPC face of retrieval: the servicer (thin: messages in, RetrievalService, messages out),
the server (health, reflection, admission control, index hot swap, TLS and bearer tokens), its
HTTP/JSON face and web page (`http`, `web/`), its metrics and request log (`telemetry`) and the client. The message code is generated from
proto/ (`protogen`) and imported through `wire`.
"""

from atelier.exports import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "serve": "atelier.server.app",
    "start_server": "atelier.server.app",
    "RunningServer": "atelier.server.app",
    "AtelierClient": "atelier.server.client",
    "AtelierServicer": "atelier.server.servicer",
    "HttpFace": "atelier.server.http",
    "Telemetry": "atelier.server.telemetry",
    "load_security": "atelier.server.security",
    "SecurityConfig": "atelier.server.security",
})
