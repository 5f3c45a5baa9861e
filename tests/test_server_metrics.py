"""What a load balancer and an operator read of `vp-gguf serve`: /health's ready and busy, and the
Prometheus text of /metrics (its format, its counters against what the replies reported)."""
from __future__ import annotations

import http.client
import json
import re
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import vp_gguf  # noqa: E402
from vp_gguf.server import Access, create_app  # noqa: E402
from support.serving import http_call as _http  # noqa: E402
from support.serving import serving, wait_ready  # noqa: E402

KEY = "metrics-key-1"
SAMPLE = re.compile(r'^([a-zA-Z_][a-zA-Z0-9_]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="[^"]*",?)*\})? (\S+)$')


@pytest.fixture(scope="module")
def vm(tiny_paths):
    model, mmproj = tiny_paths("qwen2vl")
    m = vp_gguf.VisionModel(model, mmproj, n_ctx=4096, n_threads=2)
    yield m
    m.close()


def _health(port):
    s, _, raw = _http(port, "GET", "/health")
    return s, json.loads(raw)


def _health_until(port, pred, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        s, b = _health(port)
        if pred(b):
            return s, b
        assert time.monotonic() < deadline, b
        time.sleep(0.02)


def parse_metrics(text):
    """{name{labels}: value} and {name: type}, checking the format as a scraper would: every sample
    line `name{labels} value`, every name with its HELP and TYPE before its samples."""
    assert text.endswith("\n")
    helps, types, samples = {}, {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, text_ = line[len("# HELP "):].partition(" ")
            assert text_ and name not in helps, line
            helps[name] = text_
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert name in helps and name not in types and kind in ("counter", "gauge"), line
            types[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, line
            assert m[1] in types, f"{m[1]} has no HELP/TYPE before its samples"
            samples[m[1] + (m[2] or "")] = float(m[3])
    assert set(helps) == set(types)
    for name, kind in types.items():
        assert name.startswith("vpgguf_") and (kind != "counter" or name.endswith("_total")), name
    return samples, types


def _metrics(port, key=None):
    s, ctype, raw = _http(port, "GET", "/metrics", key=key)
    assert s == 200, raw
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    return parse_metrics(raw.decode())


def _monotonic(before, after, types):
    for k, v in before.items():
        if types[k.partition("{")[0]] == "counter":
            assert after[k] >= v, (k, v, after[k])


def _chat_body(text="Say something.", max_tokens=4, **extra):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0, **extra}


def _image_body(images, **extra):
    import base64

    uri = "data:image/png;base64," + base64.b64encode(images["a"].read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "Describe the picture."}]}]
    return {"messages": msgs, "max_tokens": 6, "temperature": 0, **extra}


def _usage_of_stream(raw: bytes):
    events = [json.loads(line[len("data: "):]) for line in raw.decode().splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    return events[-1]["usage"]


def _gate(vm, monkeypatch):
    """Generated tokens held until the returned event is set: a generation that stays generating."""
    gate = threading.Event()
    piece = vm._piece

    def held_piece(tok, special):
        gate.wait(60)
        return piece(tok, special)

    monkeypatch.setattr(vm, "_piece", held_piece)
    return gate


def test_health_ready_busy_and_the_outcomes(vm, monkeypatch):
    app = create_app(vm, "tiny", max_queue=1, metrics=True)
    gate = _gate(vm, monkeypatch)
    try:
        with serving(app) as port:
            assert _health(port) == (200, {"status": "ok", "generating": 0, "waiting": 0, "queue_limit": 1})
            replies = {}

            def post(tag):
                replies[tag] = _http(port, "POST", "/v1/chat/completions", _chat_body())

            first = threading.Thread(target=post, args=("first",))
            first.start()
            s, b = _health_until(port, lambda b: b["generating"] == 1 and b["waiting"] == 0)
            assert s == 200 and b["status"] == "ok"  # generating with room in the queue: still taken
            second = threading.Thread(target=post, args=("second",))
            second.start()
            s, b = _health_until(port, lambda b: b["waiting"] == 1)
            assert s == 503, b  # the queue is full: the next request would be refused
            assert b["status"] == "busy" and b["generating"] == 1 and b["queue_limit"] == 1
            assert b["error"]["code"] == 503 and b["error"]["type"] == "unavailable_error"
            assert _http(port, "POST", "/v1/chat/completions", _chat_body())[0] == 503  # as /health said
            m, _ = _metrics(port)
            assert m["vpgguf_requests_processing"] == 1 and m["vpgguf_requests_deferred"] == 1
            assert m["vpgguf_requests_queue_limit"] == 1
            gate.set()
            first.join(60)
            second.join(60)
            assert replies["first"][0] == replies["second"][0] == 200
            assert _health_until(port, lambda b: b["generating"] == 0)[0] == 200

            # a client that leaves while its request generates: counted cancelled, its tokens not counted
            gate.clear()
            before, _ = _metrics(port)
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request("POST", "/v1/chat/completions", json.dumps(_chat_body()), {"Content-Type": "application/json"})
            _health_until(port, lambda b: b["generating"] == 1)
            c.close()
            deadline = time.monotonic() + 30
            while _metrics(port)[0]['vpgguf_requests_total{outcome="cancelled"}'] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            gate.set()
            _health_until(port, lambda b: b["generating"] == 0)
            after, _ = _metrics(port)
            assert after["vpgguf_tokens_predicted_total"] == before["vpgguf_tokens_predicted_total"]
            outcomes = {k: v for k, v in after.items() if k.startswith("vpgguf_requests_total")}
            assert outcomes == {'vpgguf_requests_total{outcome="ok"}': 2,
                                'vpgguf_requests_total{outcome="client_error"}': 0,
                                'vpgguf_requests_total{outcome="server_error"}': 0,
                                'vpgguf_requests_total{outcome="cancelled"}': 1,
                                'vpgguf_requests_total{outcome="rejected"}': 1}
    finally:
        gate.set()


def test_metrics_count_what_the_replies_reported(vm, images):
    app = create_app(vm, "tiny", default_vp=None, metrics=True)
    with serving(app) as port:
        m0, types = _metrics(port)
        assert "vpgguf_visionpulse_last_retention_mean" not in m0  # no VisionPulse request yet
        assert m0["vpgguf_requests_processing"] == 0 and m0["vpgguf_requests_deferred"] == 0

        s, _, raw = _http(port, "POST", "/v1/chat/completions", _image_body(images))
        assert s == 200, raw
        u1 = json.loads(raw)["usage"]
        m1, types = _metrics(port)
        _monotonic(m0, m1, types)
        cached = u1["prompt_tokens_details"]["cached_tokens"]
        assert m1["vpgguf_prompt_tokens_total"] - m0["vpgguf_prompt_tokens_total"] == u1["prompt_tokens"] - cached
        assert m1["vpgguf_prompt_tokens_cached_total"] - m0["vpgguf_prompt_tokens_cached_total"] == cached
        assert m1["vpgguf_tokens_predicted_total"] - m0["vpgguf_tokens_predicted_total"] == u1["completion_tokens"]
        assert m1["vpgguf_prompt_seconds_total"] > m0["vpgguf_prompt_seconds_total"]
        assert m1["vpgguf_tokens_predicted_seconds_total"] > m0["vpgguf_tokens_predicted_seconds_total"]
        assert m1["vpgguf_visionpulse_requests_total"] == 0  # dense
        assert m1['vpgguf_requests_total{outcome="ok"}'] == m0['vpgguf_requests_total{outcome="ok"}'] + 1

        # the same picture again, streamed, with VisionPulse: the cache holds the prompt's start
        s, ctype, raw = _http(port, "POST", "/v1/chat/completions",
                              _image_body(images, stream=True, visionpulse={"mode": "fixed", "ratio": 0.25}))
        assert s == 200 and ctype.startswith("text/event-stream"), raw
        u2 = _usage_of_stream(raw)
        vp = u2["visionpulse"]
        m2, types = _metrics(port)
        _monotonic(m1, m2, types)
        cached = u2["prompt_tokens_details"]["cached_tokens"]
        assert cached > 0
        assert m2["vpgguf_prompt_tokens_total"] - m1["vpgguf_prompt_tokens_total"] == u2["prompt_tokens"] - cached
        assert m2["vpgguf_prompt_tokens_cached_total"] - m1["vpgguf_prompt_tokens_cached_total"] == cached
        assert m2["vpgguf_tokens_predicted_total"] - m1["vpgguf_tokens_predicted_total"] == u2["completion_tokens"]
        assert m2['vpgguf_requests_total{outcome="ok"}'] == m1['vpgguf_requests_total{outcome="ok"}'] + 1
        assert m2["vpgguf_visionpulse_requests_total"] == 1
        steps = m2["vpgguf_visionpulse_steps_total"]
        assert steps == vp["steps_pruned"] > 0
        assert m2["vpgguf_visionpulse_visual_tokens_total"] == steps * vp["visual_tokens"]
        kept_share = m2["vpgguf_visionpulse_kept_tokens_total"] / m2["vpgguf_visionpulse_visual_tokens_total"]
        assert kept_share == pytest.approx(vp["retention_mean"])
        assert m2["vpgguf_visionpulse_last_retention_mean"] == pytest.approx(vp["retention_mean"], rel=1e-12)

        # a body that is not JSON: counted as the client's error, and nothing generated
        assert _http(port, "POST", "/v1/chat/completions", b"{")[0] == 400
        m3, types = _metrics(port)
        _monotonic(m2, m3, types)
        assert m3['vpgguf_requests_total{outcome="client_error"}'] == m2['vpgguf_requests_total{outcome="client_error"}'] + 1
        assert m3["vpgguf_tokens_predicted_total"] == m2["vpgguf_tokens_predicted_total"]


def test_metrics_off_by_default_and_behind_the_key(vm):
    with serving(create_app(vm, "tiny")) as port:
        s, _, raw = _http(port, "GET", "/metrics")
        assert s == 404 and "--metrics" in json.loads(raw)["error"]["message"], raw
    with serving(create_app(vm, "tiny", metrics=True, access=Access(api_key=KEY))) as port:
        s, _, raw = _http(port, "GET", "/metrics")
        assert s == 401, raw
        assert _http(port, "GET", "/metrics", key="wrong")[0] == 401
        m, _ = _metrics(port, key=KEY)
        assert m["vpgguf_requests_processing"] == 0
        assert _health(port)[0] == 200  # /health stays public


def test_serve_metrics_flag(tiny_paths):
    import os
    import socket
    import subprocess
    import sys

    model, mmproj = tiny_paths("qwen2vl")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VP_GGUF_API")}
    p = subprocess.Popen([sys.executable, "-m", "vp_gguf.cli", "serve", "-m", str(model), "--mmproj", str(mmproj),
                          "--port", str(port), "-t", "2", "-c", "1024", "--max-queue", "3", "--metrics"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_ready(p, port)  # through "loading" while the model loads
        m, _ = _metrics(port)
        assert m["vpgguf_requests_queue_limit"] == 3  # serve's own flags reach the app
    finally:
        p.kill()
        p.wait()


def test_health_says_loading_while_the_model_loads():
    """`serve` answers on its port before the model is in: 503 loading, then frees the port for the app."""
    import socket

    from vp_gguf.server_loading import answering_loading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with answering_loading("127.0.0.1", port):
        status, body = _health(port)
        assert status == 503 and body["status"] == "loading"
        assert body["error"] == {"code": 503, "message": "Loading model", "type": "unavailable_error"}
        status, ctype, raw = _http(port, "POST", "/v1/chat/completions", {"messages": []})
        assert status == 503 and ctype == "application/json" and json.loads(raw)["status"] == "loading"
        with pytest.raises(OSError):  # the port is taken: serve fails at once, before loading a model
            with answering_loading("127.0.0.1", port):
                pass
    with socket.socket() as s:  # and free again for the app (which binds as uvicorn does, reusing the address)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
