"""An app served by uvicorn on a free loopback port, in a thread of the test process."""
from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator


@contextlib.contextmanager
def serving(app) -> Iterator[int]:
    """The port the app answers on, until the block ends (then the server stops)."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        if not th.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        th.join(10)


def wait_ready(proc, port: int, timeout_s: float = 60) -> list[str]:
    """Until `vp-gguf serve` (proc) answers /health 200; returns the states it said before
    ("loading" while the model loads). An exit or a state other than loading fails."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                c.request("GET", "/health")
                r = c.getresponse()
                status, body = r.status, json.loads(r.read())
            finally:
                c.close()
            if status == 200:
                return seen
            assert status == 503 and body["status"] == "loading", (status, body)
            seen.append(body["status"])
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)


def http_call(port, method, path, body=None, key=None, timeout=60):
    """(status, content type, raw body) of one request to 127.0.0.1:port; a dict body goes as JSON."""
    h = {"Content-Type": "application/json"}
    if key:
        h["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, data, h)
        r = c.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        c.close()
