"""The HTTP side door of every process: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``.

A tiny threaded server, so it answers even while the event loop is busy.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True
    ready = False
    alive = True
    #: why the process is not ready although it started (e.g. the ingest breaker is open)
    not_ready_reason: str | None = None


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, ctype, status = generate_latest(REGISTRY), CONTENT_TYPE_LATEST, 200
        elif path == "/healthz":
            ok = self.server.alive
            body, ctype, status = (b"ok\n" if ok else b"unhealthy\n"), "text/plain", 200 if ok else 503
        elif path == "/readyz":
            ok = self.server.ready and self.server.not_ready_reason is None
            why = self.server.not_ready_reason or "starting"
            body = b"ready\n" if ok else f"not ready: {why}\n".encode()
            ctype, status = "text/plain", 200 if ok else 503
        else:
            body, ctype, status = b"not found\n", "text/plain", 404
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence access logs
        return


def start_health_server(host: str, port: int) -> HealthServer:
    server = HealthServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
