#!/usr/bin/env python3
"""N `vp-gguf serve` replicas behind HAProxy on one machine (docs/SCALING.md says when and why).

    python scripts/replicas.py -n 2 --port 8080 -- -m model.gguf --mmproj mmproj.gguf -t 4 -c 8192
    python scripts/replicas.py -n 2 --port 8080 --print-config     # the HAProxy config only

Replica i listens on 127.0.0.1:(--first-port + i); every argument after `--` goes to each of them.
Once every replica answers /health, HAProxy listens on --host:--port (the OpenAI API) and its stats
page on 127.0.0.1:--stats-port/stats (;csv for a machine). Ctrl-C or SIGTERM stops all of them. A
replica that dies is reported and left out by the balancer's health check; the rest keep serving.
With --print-config nothing is started: the config is for a HAProxy you already run (its server lines
name the replicas' addresses: adapt them, or pass --replica HOST:PORT for each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPLICA_HOST = "127.0.0.1"  # replicas on the balancer's machine listen on loopback only
TIMEOUT_S = 600  # the longest a reply may take: one that is not streamed arrives only when all of it is done
CHECK_EVERY_S = 2  # the balancer's health check; a replica is out after two failures, back after one success


def _json_error(status: int, message: str) -> str:
    """HAProxy's own error replies in the OpenAI shape the replicas use (single-quoted: no escapes)."""
    body = json.dumps({"error": {"message": message, "type": "balancer_error", "param": None, "code": status}})
    return f"    http-error status {status} content-type application/json string '{body}'"


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address in brackets


def haproxy_config(
    replicas: Sequence[tuple[str, int]],
    port: int,
    host: str = "127.0.0.1",
    stats_port: int = 8404,
    timeout_s: int = TIMEOUT_S,
) -> str:
    """The HAProxy config for these replicas (address, port): the one place its settings are chosen."""
    servers = "\n".join(f"    server r{i + 1} {_address(h, p)}" for i, (h, p) in enumerate(replicas))
    errors = "\n".join(
        (
            _json_error(502, "a replica failed while answering this request; it may be retried"),
            _json_error(503, "no replica can take this request now (all busy or down); retry later"),
            _json_error(504, "no replica answered in time"),
        )
    )
    return f"""# HAProxy in front of {len(replicas)} `vp-gguf serve` replicas (written by scripts/replicas.py)
global
    # no maxconn: HAProxy derives it from the open-file limit (a larger one fails to start unprivileged)

defaults
    mode http
    timeout connect 5s
    timeout http-request 30s
    # a reply that is not streamed comes only when its generation is done: allow the longest one
    timeout client {timeout_s}s
    timeout server {timeout_s}s
    timeout check 5s
    # retried on another replica: a refused connection (a replica gone before the health check saw it)
    # and a 503 (its queue is full): neither started a generation. A reply cut short is never
    # replayed: a request that brought one replica down would bring down the next.
    retries {max(2, len(replicas))}
    retry-on conn-failure 503
    option redispatch 1
    # the whole request read before a replica is picked: a retry needs all of it (without this, a 503
    # to a request whose body came in a second packet went to the client unretried)
    option http-buffer-request
{errors}

frontend vp_gguf
    bind {_address(host, port)}
    default_backend replicas

backend replicas
    # one generation at a time per replica: the fewest open requests is the shortest wait
    balance leastconn
    # /health is 200 when the replica can take a request, 503 while its queue is full
    option httpchk
    http-check send meth GET uri /health ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    # a replica bound to loopback answers only requests addressed to localhost (its DNS-rebinding guard)
    http-request set-header Host localhost
    default-server check inter {CHECK_EVERY_S}s fall 2 rise 1
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


def find_haproxy() -> str | None:
    """Debian installs it in /usr/sbin, which a user's PATH may not hold."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def serve_command(port: int, serve_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "vp_gguf.cli", "serve", *serve_args, "--host", REPLICA_HOST, "--port", str(port)]


def health_status(host: str, port: int, timeout_s: float = 5) -> int | None:
    """/health's status code; None when nothing answers."""
    req = urllib.request.Request(f"http://{host}:{port}/health", headers={"Host": "localhost"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_healthy(proc: subprocess.Popen, port: int, timeout_s: float) -> None:
    """Until the replica's /health says 200; a replica that exits or takes too long is an error."""
    deadline = time.monotonic() + timeout_s
    while health_status(REPLICA_HOST, port) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"the replica on port {port} exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica on port {port} did not answer /health within {timeout_s:g} s")
        time.sleep(0.2)


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float = 10) -> None:
    """SIGTERM, then SIGKILL whatever is still running after the grace time."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def _parse_replica(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]"):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), _port(port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--replicas", type=int, default=2, help="how many replicas (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="the balancer's address (default loopback only)")
    p.add_argument("--port", type=_port, default=8080, help="the balancer's port: the API (default 8080)")
    p.add_argument("--first-port", type=_port, default=None, help="replica 1's port (default --port + 1)")
    p.add_argument("--stats-port", type=_port, default=8404, help="HAProxy's stats page, on loopback (default 8404)")
    p.add_argument("--timeout", type=int, default=TIMEOUT_S, help=f"the longest reply, seconds (default {TIMEOUT_S})")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds a replica may take to load (default 600)")
    p.add_argument("--print-config", action="store_true", help="print the HAProxy config and start nothing")
    p.add_argument(
        "--replica",
        action="append",
        type=_parse_replica,
        metavar="HOST:PORT",
        help="with --print-config: a replica running elsewhere (repeat; replaces -n and --first-port)",
    )
    p.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: the arguments of every `vp-gguf serve`")
    return p


def _supervise(procs: list[subprocess.Popen], balancer: subprocess.Popen) -> int:
    """Until a signal, or the balancer or the last replica exits: a dead replica is only reported."""
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    reported: set[int] = set()
    while not stop:
        if balancer.poll() is not None:
            print(f"replicas: haproxy exited with status {balancer.returncode}", file=sys.stderr)
            return 1
        for i, p in enumerate(procs):
            if p.poll() is not None and i not in reported:
                reported.add(i)
                print(f"replicas: replica r{i + 1} exited with status {p.returncode}", file=sys.stderr, flush=True)
        if len(reported) == len(procs):
            return 1
        time.sleep(0.2)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    serve_args = a.serve_args[1:] if a.serve_args[:1] == ["--"] else a.serve_args
    if a.replicas < 1:
        p.error("-n must be at least 1")
    first = a.first_port or a.port + 1
    ports = [first + i for i in range(a.replicas)]
    if ports[-1] > 65535:
        p.error(f"{a.replicas} replicas from port {first} go past port 65535")
    if a.print_config:
        replicas = a.replica or [(REPLICA_HOST, q) for q in ports]
        print(haproxy_config(replicas, a.port, a.host, a.stats_port, a.timeout), end="")
        return 0
    if a.replica:
        p.error("--replica is for --print-config: replicas started here listen on --first-port and up")
    if not serve_args:
        p.error("give the arguments of `vp-gguf serve` after --, at least -m MODEL")
    haproxy = find_haproxy()
    if haproxy is None:
        p.error("haproxy is not installed (Debian/Ubuntu: apt-get install haproxy)")
    procs: list[subprocess.Popen] = []
    try:
        for q in ports:
            procs.append(subprocess.Popen(serve_command(q, serve_args)))
            print(f"replicas: r{len(procs)} pid {procs[-1].pid} http://{REPLICA_HOST}:{q}", flush=True)
        for proc, q in zip(procs, ports):
            wait_healthy(proc, q, a.start_timeout)
        with tempfile.TemporaryDirectory(prefix="vp-gguf-replicas-") as tmp:
            cfg = Path(tmp) / "haproxy.cfg"
            cfg.write_text(haproxy_config([(REPLICA_HOST, q) for q in ports], a.port, a.host, a.stats_port, a.timeout))
            balancer = subprocess.Popen([haproxy, "-db", "-f", str(cfg)])  # -db: in the foreground, ours to stop
            procs.append(balancer)
            print(
                f"replicas: http://{a.host}:{a.port}/v1 -> {a.replicas} replicas "
                f"(haproxy pid {balancer.pid}, stats http://127.0.0.1:{a.stats_port}/stats)",
                flush=True,
            )
            return _supervise(procs[:-1], balancer)
    except RuntimeError as e:
        print(f"replicas: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before all were up
        return 130
    finally:
        stop_all(procs)


if __name__ == "__main__":
    sys.exit(main())
