"""llama.cpp's RPC backend: a tiny model split over two rpc-servers on 127.0.0.1 (started with
`vp-gguf rpc-server`) generates what a local run does, token for token and kept set for kept set,
with every op of the selection computed on the servers; unreachable and lost servers are errors
naming the host, never a hang or a crash, and the process stays usable."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rpc_check import _free_port, local_servers  # noqa: E402  (scripts/, on the path by conftest)

import vp_gguf
from vp_gguf import VisionPulse, rpc
from vp_gguf.errors import InvalidArgumentError, RpcError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "<__media__>\nDescribe the picture."
MODES = {
    "visionpulse": VisionPulse(mode="visionpulse", budget_min=0.2, budget_max=0.4),
    "fixed": VisionPulse(mode="fixed", ratio=0.3),
}

pytestmark = pytest.mark.skipif(not rpc.supported(), reason="built with GGML_RPC=OFF")


def _run(m, images, vp):
    res = m.generate(PROMPT, images=[images["a"]], max_tokens=12, visionpulse=vp)
    steps = res.visionpulse.steps
    assert steps and any(len(s.kept) < s.n_visual for s in steps)  # the selection dropped tokens
    return res.tokens, [s.kept for s in steps]


@pytest.mark.parametrize("family,flash_attn", [("qwen2vl", "on"), ("qwen2vl", "off"), ("gemma3", "off")])
def test_split_over_two_servers_equals_a_local_run(tiny_paths, images, family, flash_attn):
    model, mmproj = tiny_paths(family)
    # this machine with the servers' kernels: one thread as each server has, weights not repacked
    local = vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=1, flash_attn=flash_attn, repack=False)
    want = {name: _run(local, images, vp) for name, vp in MODES.items()}
    local.close()
    with local_servers(2) as (endpoints, _):
        m = vp_gguf.VisionModel(
            model, mmproj, n_ctx=1024, n_threads=1, flash_attn=flash_attn, rpc=",".join(endpoints), n_gpu_layers="all"
        )
        try:
            assert m.n_gpu_layers == m.n_layer + 1
            m.trace_backends()
            for name, vp in MODES.items():
                tokens, kept = _run(m, images, vp)
                assert tokens == want[name][0], name
                assert kept == want[name][1], name
                ops = m.op_backends()
                assert ops, "no op of the selection was traced"
                used = {b for per_op in ops.values() for b in per_op}
                # every op VisionPulse built ran on a server, and the layers were split over both
                assert all(b.startswith("RPC") for b in used), ops
                assert {ep for ep in endpoints if any(ep in b for b in used)} == set(endpoints), ops
            assert {"TOP_K", "GET_ROWS"} <= set(ops), ops
        finally:
            m.close()


def test_unreachable_and_wrong_servers_are_errors_naming_the_host(tiny_paths):
    model, mmproj = tiny_paths("qwen2vl")
    nobody = f"127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RpcError, match=f"RPC server {nobody}: cannot connect"):
        vp_gguf.VisionModel(model, mmproj, rpc=nobody, n_gpu_layers="all")
    assert time.monotonic() - t0 < rpc.CONNECT_TIMEOUT_S + 5
    with pytest.warns(UserWarning, match="n_gpu_layers=0 offloads no layer"), pytest.raises(RpcError):
        vp_gguf.VisionModel(model, mmproj, rpc=nobody)  # servers named, nothing sent to them: said
    # something listens there but is no rpc-server: it hangs up on the handshake
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        stop = threading.Event()

        def hang_up():
            srv.settimeout(0.1)
            while not stop.is_set():
                try:
                    srv.accept()[0].close()
                except OSError:
                    pass

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        wrong = f"127.0.0.1:{srv.getsockname()[1]}"
        try:
            with pytest.raises(RpcError, match=f"RPC server {wrong}: handshake failed"):
                vp_gguf.VisionModel(model, mmproj, rpc=[wrong], n_gpu_layers="all")
        finally:
            stop.set()
            t.join()
    for bad in ("localhost", "127.0.0.1:0", "127.0.0.1:99999", "[::1]:50052", "", "a:1,a:1"):
        with pytest.raises(InvalidArgumentError):
            vp_gguf.VisionModel(model, mmproj, rpc=bad)


@pytest.mark.parametrize("dies", [0, 1])  # the anchor's server, or the pruned layers' and the output's
def test_a_server_lost_mid_generation(tiny_paths, images, dies):
    model, mmproj = tiny_paths("qwen2vl")
    with local_servers(2) as (endpoints, procs):
        m = vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, rpc=endpoints, n_gpu_layers="all")
        pieces = 0
        t0 = time.monotonic()
        with pytest.raises(RpcError, match=f"RPC server {endpoints[dies]} was lost"):
            for _ in m.stream(PROMPT, images=[images["a"]], max_tokens=400, visionpulse=MODES["visionpulse"]):
                pieces += 1
                if pieces == 3:
                    procs[dies].kill()
                    procs[dies].wait()
        assert pieces < 400 and time.monotonic() - t0 < 60
        with pytest.raises(RpcError, match=endpoints[dies]):  # and at once at every later call
            m.generate(PROMPT, images=[images["a"]], max_tokens=2)
        m.close()
    # the process is still usable: a model on this machine generates
    with vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2) as local:
        assert local.generate(PROMPT, images=[images["a"]], max_tokens=2).tokens


def test_a_server_that_stops_answering_times_out(tiny_paths, images, monkeypatch):
    """Its host still acknowledges (keep-alives pass) but the process is frozen: GGML_RPC_TIMEOUT."""
    model, mmproj = tiny_paths("qwen2vl")
    monkeypatch.setenv("GGML_RPC_TIMEOUT", "3")  # read when the connection is made
    with local_servers(2) as (endpoints, procs):
        m = vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, rpc=endpoints, n_gpu_layers="all")
        t_stop = None
        try:
            with pytest.raises(RpcError, match=f"RPC server {endpoints[1]} was lost"):
                for i, _ in enumerate(m.stream(PROMPT, images=[images["a"]], max_tokens=400)):
                    if i == 2:
                        procs[1].send_signal(signal.SIGSTOP)
                        t_stop = time.monotonic()
            assert t_stop is not None and 2.5 < time.monotonic() - t_stop < 30
        finally:
            procs[1].send_signal(signal.SIGCONT)
            m.close()


def test_cli_run_with_rpc_prints_the_local_answer(tiny_paths, images):
    model, mmproj = tiny_paths("qwen2vl")
    base = [sys.executable, "-m", "vp_gguf.cli", "run", "-m", str(model), "--mmproj", str(mmproj), "--image"]
    base += [str(images["a"]), "-p", PROMPT, "-n", "8", "--temp", "0", "--json", "-t", "1", "-nr", "--visionpulse", "5"]
    base += ["--vp-min-pruned-layers", "0"]
    env = dict(os.environ)  # VP_GGUF_LIB_DIR too, where `make sanitize` points it

    def answer(*extra: str) -> dict:
        r = subprocess.run(base + list(extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    want = answer()
    with local_servers(2) as (endpoints, _):
        got = answer("--rpc", ",".join(endpoints), "-ngl", "all")
    assert got["tokens"] == want["tokens"]
    assert [s["kept"] for s in got["visionpulse"]["steps"]] == [s["kept"] for s in want["visionpulse"]["steps"]]
    r = subprocess.run(base + ["--rpc", "nohost"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "host:port" in r.stderr and "Traceback" not in r.stderr


def test_serve_reports_a_lost_server_without_naming_it(tiny_paths, images):
    pytest.importorskip("fastapi")
    from support.serving import http_call, serving

    from vp_gguf.server import create_app

    model, mmproj = tiny_paths("qwen2vl")
    with local_servers(2) as (endpoints, procs):
        m = vp_gguf.VisionModel(model, mmproj, n_ctx=1024, n_threads=2, rpc=endpoints, n_gpu_layers="all")
        try:
            with serving(create_app(m, "tiny", metrics=True)) as port:
                assert http_call(port, "GET", "/health")[0] == 200
                procs[0].kill()
                procs[0].wait()
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                status, _, raw = http_call(port, "POST", "/v1/chat/completions", body, timeout=120)
                reply = json.loads(raw)
                assert status == 503, reply
                assert "RPC server" in reply["error"]["message"] and "127.0.0.1" not in json.dumps(reply)
                status, _, raw = http_call(port, "GET", "/health")
                health = json.loads(raw)
                assert status == 503 and health["status"] == "error" and "127.0.0.1" not in json.dumps(health)
                metrics = http_call(port, "GET", "/metrics")[2].decode()  # a failure, not a refusal for a full queue
                assert 'vpgguf_requests_total{outcome="server_error"} 1' in metrics, metrics
                assert 'vpgguf_requests_total{outcome="rejected"} 0' in metrics, metrics
        finally:
            m.close()
