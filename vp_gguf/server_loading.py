"""While `vp-gguf serve` loads its model, its port already answers: 503 in llama-server's shape
("Loading model", `unavailable_error`), /health with `"status": "loading"`. A balancer then sees a
replica that is starting, not a dead one, and a client gets a reason instead of a refused
connection. The stand-in is the standard library's HTTP server, closed the moment the model is in,
just before the app binds the same port; every request gets the same answer and nothing is read
(a body is not even received), so it shows nothing the app would refuse to show.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .server_metrics import loading_health


class _Loading(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        status, body = loading_health()
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "1")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = do_OPTIONS = _answer

    def log_message(self, format: str, *args: object) -> None:  # quiet, as the app's own log is
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


@contextmanager
def answering_loading(host: str, port: int) -> Iterator[None]:
    """Answer 503 loading on host:port until the block ends (OSError at once if the port is taken)."""
    srv = (_Server6 if ":" in host else _Server)((host, port), _Loading)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield
    finally:
        srv.shutdown()
        srv.server_close()
        t.join()
