"""A local HTTP server that answers like the Hugging Face hub's file API (for HF_ENDPOINT).

Serves ``GET /api/models/{repo}/revision/{rev}`` (model info with file sizes and
LFS sha256) and ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` (ETag / X-Linked-Etag,
X-Repo-Commit, sizes, HTTP ranges for resumed downloads). Faults on demand:
``cut[file] = n`` ends the next download of a file after n bytes; ``lie[file] =
data`` serves other bytes than the advertised sha256; ``stop_after[file] = n`` sends n bytes of
the file, then the whole server goes away (a hub that stopped answering mid-download);
``gone_at.add(file)``: the next request for the file is not answered and the server goes away;
``status = 503``: every request is answered with that HTTP error (a hub that is down).
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]) -> None:
        self.repos = repos
        self.cut: dict[str, int] = {}
        self.lie: dict[str, bytes] = {}
        self.stop_after: dict[str, int] = {}
        self.gone_at: set[str] = set()
        self.status: int | None = None
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _error(self, code: int, err: str) -> None:
                body = json.dumps({"error": err}).encode()
                self.send_response(code)
                self.send_header("X-Error-Code", err)
                self.send_header("X-Error-Message", err)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _route(self, head: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if hub.status is not None:
                    return self._error(hub.status, "ServiceUnavailable")
                m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/([^/]+)$", path)
                if m:
                    return self._info(m.group(1))
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m.group(1), m.group(3), head)
                self._error(404, "EntryNotFound")

            def _info(self, repo: str) -> None:
                files = hub.repos.get(repo)
                if files is None:
                    return self._error(404, "RepoNotFound")
                sib = [{"rfilename": n, "size": len(d), "blobId": hashlib.sha1(d).hexdigest(),
                        "lfs": {"size": len(d), "sha256": hashlib.sha256(d).hexdigest(), "pointerSize": 134}}
                       for n, d in files.items()]
                body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                                   "siblings": sib}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, repo: str, name: str, head: bool) -> None:
                files = hub.repos.get(repo)
                if files is None:
                    return self._error(404, "RepoNotFound")
                if name not in files:
                    return self._error(404, "EntryNotFound")
                if name in hub.gone_at:
                    hub.gone_at.discard(name)
                    self.close_connection = True
                    threading.Thread(target=hub.stop).start()
                    return
                data = files[name]
                sha = hashlib.sha256(data).hexdigest()
                served = hub.lie.get(name, data)
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(re.match(r"bytes=(\d+)-", rng).group(1))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{sha}"')
                self.send_header("X-Linked-Etag", f'"{sha}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(served) - 1}/{len(served)}")
                self.send_header("Content-Length", str(len(served) - start))
                self.end_headers()
                if head:
                    return
                body = served[start:]
                n = hub.stop_after.pop(name, None)
                if n is not None:  # the server goes away, this connection with it
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    threading.Thread(target=hub.stop).start()  # shutdown() waits for the serving loop
                    return
                n = hub.cut.pop(name, None)
                if n is not None:  # a dropped connection mid-file
                    self.wfile.write(body[:n])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        """No more answers: the listening socket is closed (new connections are refused)."""
        self.server.shutdown()
        self.server.server_close()

    def __exit__(self, *exc) -> None:
        self.stop()
