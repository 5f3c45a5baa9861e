"""Replicas behind HAProxy (scripts/replicas.py, docs/SCALING.md): requests are spread over the
replicas and answered as one server answers them; a replica that dies mid-run fails only what it
held; a replica that refuses (503, its queue full) has its requests taken by another, and when none
can take one the client hears a clear 503. Every wait is bounded; every process is killed at the end.

These prove routing and correctness, not speed: on a 2-core machine N replicas share the same cores."""
from __future__ import annotations

import base64
import contextlib
import csv
import http.client
import io
import json
import os
import queue
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import replicas  # noqa: E402  (scripts/, on the path by conftest)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(replicas.find_haproxy() is None,
                                reason="haproxy is not installed (apt-get install haproxy; CI installs it)")

REQUEST_S = 180  # one request, on a loaded 2-core machine
START_S = 300  # replicas and balancer up
# a generation that runs for seconds: greedy, the tiny model never ends it before max_tokens
LONG = {"messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 3000, "stream": True,
        "temperature": 0}


def _free_block(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise AssertionError("no block of free ports")


def _post(port: int, body: dict, host: str | None = None, timeout: float = REQUEST_S) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", "Host": host or f"127.0.0.1:{port}"}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def _stats(port: int) -> dict[str, dict[str, str]]:
    """HAProxy's counters, by server name (r1, r2, ...; FRONTEND and BACKEND for the totals)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/stats;csv")
    text = c.getresponse().read().decode().lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return {r["svname"]: r for r in rows if r["pxname"] in ("vp_gguf", "replicas")
            and not (r["pxname"] == "vp_gguf" and r["svname"] == "BACKEND")}


def _poll(what: str, ok, timeout: float = 60, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = ok()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(every)


def _kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait(30)


def _serve_args(tiny_paths, *extra: str) -> list[str]:
    model, mmproj = tiny_paths("qwen2vl")
    return ["-m", str(model), "--mmproj", str(mmproj), "-t", "1", "-c", "4096", *extra]


def _prompts(images) -> list[dict]:
    grad = "data:image/png;base64," + base64.b64encode(images["grad"].read_bytes()).decode()
    texts = ["Say something about the sea.", "Count to five.", "Hi"]
    msgs = [[{"role": "user", "content": t}] for t in texts]
    msgs.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": grad}},
                                              {"type": "text", "text": "Describe the image."}]}])
    return [{"messages": m, "temperature": 0, "max_tokens": 8} for m in msgs]


def _answer(out: dict) -> tuple:
    """What must not depend on the replica: the text, why it ended, the tokens counted."""
    ch = out["choices"][0]
    return ch["message"]["content"], ch["finish_reason"], out["usage"]["prompt_tokens"], out["usage"]["completion_tokens"]


def _expected(port: int, prompts: list[dict]) -> list[tuple]:
    """One replica asked directly, one request at a time: the single server's answers."""
    out = []
    for body in prompts:
        status, reply = _post(port, body)
        assert status == 200, reply
        out.append(_answer(reply))
    return out


@contextlib.contextmanager
def _script(serve_args: list[str], n: int, log: Path) -> Iterator[tuple[subprocess.Popen, int, list[int], list[int], int]]:
    """scripts/replicas.py as a user runs it: (its process, balancer port, replica ports, replica
    pids, stats port) once every replica is up in the balancer's view; all of it killed at the end."""
    base = _free_block(n + 2)
    port, stats = base, base + n + 1
    cmd = [sys.executable, str(ROOT / "scripts" / "replicas.py"), "-n", str(n), "--port", str(port),
           "--stats-port", str(stats), "--", *serve_args]
    with open(log, "w") as err:
        # its own session: the whole group (script, replicas, haproxy) is killed at the end, whatever happens
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        pids: list[int] = []
        deadline = time.monotonic() + START_S
        while True:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the replicas did not start"
                continue
            if m := re.match(r"replicas: r\d+ pid (\d+) ", line):
                pids.append(int(m[1]))
            if f"-> {n} replicas" in line:
                break
        _poll("every replica UP in the balancer", lambda: _all_up(stats, n), START_S)
        yield proc, port, list(range(port + 1, port + 1 + n)), pids, stats
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _all_up(stats: int, n: int) -> bool:
    try:
        rows = _stats(stats)
    except OSError:
        return False
    return all(rows[f"r{i + 1}"]["status"] == "UP" for i in range(n))


def _burst(port: int, prompts: list[dict], n: int, workers: int, hosts=(None,)):
    """n requests through the balancer, `workers` at a time: [(prompt index, status, reply, seconds)]."""
    def one(i: int):
        t = time.perf_counter()
        status, reply = _post(port, prompts[i % len(prompts)], host=hosts[i % len(hosts)])
        return i % len(prompts), status, reply, time.perf_counter() - t

    with ThreadPoolExecutor(workers) as ex:
        futs = [ex.submit(one, i) for i in range(n)]
        done, pending = wait(futs, timeout=REQUEST_S * (n // workers + 2))
        assert not pending, "requests hung"
        return [f.result() for f in futs]


def test_requests_are_spread_over_replicas_and_answered_as_one_server(tiny_paths, images, tmp_path):
    prompts = _prompts(images)
    with _script(_serve_args(tiny_paths), 2, tmp_path / "replicas.log") as (_proc, port, rports, _pids, stats):
        expected = _expected(rports[0], prompts)
        t0 = time.perf_counter()
        # half of them addressed to the balancer by a public name: the replicas (loopback-bound,
        # answering only requests addressed to localhost) get it rewritten
        results = _burst(port, prompts, 40, 10, hosts=(None, f"vp.example.org:{port}"))
        wall = time.perf_counter() - t0
        for k, status, reply, _ in results:
            assert status == 200, reply
            assert _answer(reply) == expected[k]
        rows = _stats(stats)
        served = {r: int(rows[r]["hrsp_2xx"]) for r in ("r1", "r2")}
        assert all(v > 0 for v in served.values()), served
        assert sum(served.values()) == 40 and int(rows["FRONTEND"]["hrsp_2xx"]) == 40, rows
        lat = sorted(x[3] for x in results)
        print(f"\nreplicas: 40 requests, 10 at a time: {wall:.2f} s through 2 replicas ({served}); "
              f"latency median {statistics.median(lat):.3f} s, max {lat[-1]:.3f} s")


def _open_stream(port: int, body: dict) -> http.client.HTTPResponse:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    _poll("the first event", lambda: r.readline().startswith(b"data:"), 60, 0)
    return r


def _follow(r: http.client.HTTPResponse, budget_s: float) -> str:
    """'done' ([DONE] came), 'cut' (the reply ended without it, or broke) or 'alive' (still
    streaming when the budget ran out)."""
    end = time.monotonic() + budget_s
    try:
        while time.monotonic() < end:
            line = r.readline()
            if not line:
                return "cut"
            if line.strip() == b"data: [DONE]":
                return "done"
        return "alive"
    except (OSError, http.client.HTTPException):
        return "cut"
    finally:
        r.close()


def test_a_replica_killed_mid_run_fails_only_what_it_held(tiny_paths, images, tmp_path):
    prompts = _prompts(images)
    log = tmp_path / "replicas.log"
    # the pool outside: on a failure the processes die first, so no request waits out its time-out
    with ThreadPoolExecutor(10) as ex, _script(_serve_args(tiny_paths), 2, log) as (proc, port, rports, pids, stats):
        expected = _expected(rports[1], prompts)
        # one long generation on each replica (least connections), then short requests queued behind them
        streams = [_open_stream(port, LONG) for _ in range(2)]
        assert [int(_stats(stats)[r]["scur"]) for r in ("r1", "r2")] == [1, 1]
        futs = [ex.submit(_post, port, prompts[i % len(prompts)]) for i in range(20)]
        _poll("short requests queued on r1", lambda: int(_stats(stats)["r1"]["scur"]) >= 2)
        os.kill(pids[0], signal.SIGKILL)
        verdicts = [_follow(r, 10) for r in streams]  # the survivor's is closed: its queue moves on
        assert verdicts.count("cut") == 1, verdicts  # the other is "alive" or "done"
        done, pending = wait(futs, timeout=REQUEST_S * 3)
        assert not pending, "requests hung after the kill"
        ok = failed = 0
        for i, f in enumerate(futs):
            try:
                status, reply = f.result()
            except (OSError, http.client.HTTPException):  # cut off with the replica
                failed += 1
                continue
            if status == 200:
                assert _answer(reply) == expected[i % len(prompts)]
                ok += 1
            else:
                assert status == 502 and "replica failed" in reply["error"]["message"], (status, reply)
                failed += 1
        assert failed >= 1 and ok >= 1, (ok, failed)
        # everything after the kill is served by the rest, correctly
        before = int(_stats(stats)["r2"]["hrsp_2xx"])
        for k, status, reply, _ in _burst(port, prompts, 20, 10):
            assert status == 200, reply
            assert _answer(reply) == expected[k]
        assert int(_stats(stats)["r2"]["hrsp_2xx"]) - before == 20
        _poll("r1 DOWN in the balancer", lambda: _stats(stats)["r1"]["status"] == "DOWN", 30)
        assert proc.poll() is None  # the script keeps serving with what is left, and says what died
        _poll("the script reports the dead replica", lambda: "replica r1 exited with status -9" in log.read_text(), 10)
        print(f"\nreplicas: killed r1 mid-run: {failed} of 20 queued requests failed cleanly, {ok} answered; "
              "20 afterwards all answered by r2")


@contextlib.contextmanager
def _cluster(tiny_paths, per_replica: list[list[str]], tmp_path: Path) -> Iterator[tuple[int, list[int], int, list]]:
    """Replicas with different flags, started with the script's own pieces: (balancer port, replica
    ports, stats port, the replica processes)."""
    n = len(per_replica)
    base = _free_block(n + 2)
    port, rports, stats = base, [base + 1 + i for i in range(n)], base + n + 1
    procs: list[subprocess.Popen] = []
    try:
        for i, (q, extra) in enumerate(zip(rports, per_replica)):
            with open(tmp_path / f"r{i + 1}.log", "w") as err:
                procs.append(subprocess.Popen(replicas.serve_command(q, _serve_args(tiny_paths, *extra)), stderr=err))
        for p, q in zip(procs, rports):
            replicas.wait_healthy(p, q, START_S)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(replicas.haproxy_config([(replicas.REPLICA_HOST, q) for q in rports], port, stats_port=stats))
        with open(tmp_path / "haproxy.log", "w") as err:
            procs.append(subprocess.Popen([replicas.find_haproxy(), "-db", "-f", str(cfg)], stderr=err))
        _poll("every replica UP in the balancer", lambda: _all_up(stats, n), START_S)
        yield port, rports, stats, procs[:n]
    finally:
        _kill_all(procs)


def test_a_full_replica_503_goes_elsewhere_and_none_left_is_a_clear_503(tiny_paths, images, tmp_path):
    prompts = [dict(p, max_tokens=16) for p in _prompts(images)[:3]]  # text only: small enough to replay
    with _cluster(tiny_paths, [["--max-queue", "1"], ["--max-queue", "64"]], tmp_path) as (port, rports, stats, procs):
        expected = _expected(rports[1], prompts)
        for k, status, reply, _ in _burst(port, prompts, 40, 16):
            assert status == 200, reply  # nothing lost: r1's refusals were taken by r2
            assert _answer(reply) == expected[k]
        rows = _stats(stats)
        assert int(rows["BACKEND"]["wretr"]) + int(rows["BACKEND"]["wredis"]) > 0, rows["BACKEND"]
        assert int(rows["FRONTEND"]["hrsp_5xx"]) == 0
        # r2 gone: r1 alone, flooded; what it cannot take is a 503 with a message, at once
        procs[1].kill()
        _poll("r2 DOWN", lambda: _stats(stats)["r2"]["status"] == "DOWN", 30)
        long = [dict(LONG, stream=False, max_tokens=200)]  # each holds r1 long enough for the others to find it full
        results = _burst(port, long, 12, 12)
        statuses = sorted(s for _, s, _, _ in results)
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        for _, status, reply, _ in results:
            if status == 503:
                assert "retry" in reply["error"]["message"], reply
        refused = [t for _, s, _, t in results if s == 503]
        print(f"\nreplicas: r1 alone, 12 at once: {statuses.count(200)} answered, {len(refused)} refused "
              f"with 503 in at most {max(refused):.3f} s")


def test_the_printed_config_is_one_haproxy_accepts_and_bad_flags_are_one_line(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "replicas.py")]
    cfg = subprocess.run([*script, "--print-config", "--port", "8080", "--replica", "10.0.0.2:8080",
                          "--replica", "[::1]:8081"], capture_output=True, text=True, timeout=60)
    assert cfg.returncode == 0, cfg.stderr
    assert "server r1 10.0.0.2:8080" in cfg.stdout and "server r2 [::1]:8081" in cfg.stdout
    (tmp_path / "haproxy.cfg").write_text(cfg.stdout)
    check = subprocess.run([replicas.find_haproxy(), "-c", "-f", str(tmp_path / "haproxy.cfg")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    for bad, says in ((["--replica", "nohost"], "HOST:PORT"), (["--port", "70000"], "1 to 65535"),
                      (["-n", "3", "--first-port", "65534", "--", "-m", "x"], "past port 65535"),
                      (["-n", "2"], "after --")):
        r = subprocess.run([*script, *bad], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr)
