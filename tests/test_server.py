"""The OpenAI-compatible server over loopback: the openai client, SSE, concurrency, bad input."""
from __future__ import annotations

import base64
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import vp_gguf  # noqa: E402
from vp_gguf.server import create_app  # noqa: E402
from support.serving import serving  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_paths):
    model, mmproj = tiny_paths("qwen2vl")
    vm = vp_gguf.VisionModel(model, mmproj, n_ctx=4096, n_threads=2)
    app = create_app(vm, "tiny", default_vp=None, max_queue=8)
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"
    vm.close()


def _uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _msgs(images, text="Describe the picture."):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _uri(images["a"])}},
                                         {"type": "text", "text": text}]}]


def _client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def test_models_and_completion(server, images):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    r = c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert not (r.usage.model_extra or {}).get("visionpulse")  # the server's default here: off
    r5 = c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=6, temperature=0,
                                   extra_body={"visionpulse": {"mode": "fixed", "ratio": 0.25}})
    vp = r5.usage.model_extra["visionpulse"]
    assert vp["steps_pruned"] == 5 and 0.15 < vp["retention_mean"] <= 0.25
    # full budget: the same answer as dense, and no state leaks into the next request
    full = c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=6, temperature=0,
                                     extra_body={"visionpulse": {"mode": "fixed", "ratio": 1.0}})
    again = c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=6, temperature=0)
    assert full.choices[0].message.content == r.choices[0].message.content == again.choices[0].message.content


def test_streaming(server, images):
    c = _client(server)
    ref = c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=8, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=8, temperature=0,
                                            stream=True, extra_body={"visionpulse": 5}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.model_extra["visionpulse"]["steps_pruned"] == 7
    dense = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=_msgs(images), max_tokens=8, temperature=0, stream=True) if ch.choices)
    assert dense == ref.choices[0].message.content and text


def test_parallel_requests_equal_sequential(server, images):
    c = _client(server)
    prompts = ["Describe the picture.", "What colour?", "Count things.", "Describe the picture."]
    seq = [c.chat.completions.create(model="tiny", messages=_msgs(images, p), max_tokens=5, temperature=0,
                                     extra_body={"visionpulse": 5}).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(4) as ex:
        par = list(ex.map(lambda p: c.chat.completions.create(
            model="tiny", messages=_msgs(images, p), max_tokens=5, temperature=0,
            extra_body={"visionpulse": 5}).choices[0].message.content, prompts))
    assert par == seq


def _post(url, data: bytes):
    req = urllib.request.Request(url + "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,msg", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"messages": "hi"}).encode(), "non-empty list"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}).encode(), "integer"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "visionpulse": 7}).encode(), "preset"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "visionpulse": {"budget": 1}}).encode(),
     "unknown visionpulse field"),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"nope").decode()}},
        {"type": "text", "text": "x"}]}]}).encode(), "image"),
    (json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}}]}]}).encode(), "data:"),
])
def test_bad_requests_are_400_and_the_server_lives(server, images, body, msg):
    status, out = _post(server, body)
    assert status == 400 and msg in out["error"]["message"], out
    ok = _client(server).chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_client_disconnect_mid_stream(server, images):
    body = json.dumps({"messages": _msgs(images), "max_tokens": 200, "stream": True}).encode()
    req = urllib.request.Request(server + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    r = urllib.request.urlopen(req, timeout=60)
    r.readline()
    r.close()  # gone mid-stream
    ok = _client(server).chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=3)
    assert ok.usage.completion_tokens == 3


def test_a_video_url_part_and_the_kept_prefix(server, images, tmp_path):
    import shutil

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    from test_video import make_video

    video = make_video(tmp_path / "v", 8)
    uri = "data:video/x-matroska;base64," + base64.b64encode(video.read_bytes()).decode()
    msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri, "max_frames": 4}},
                                         {"type": "text", "text": "What happens?"}]}]
    c = _client(server)
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    again = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert again.choices[0].message.content == r.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    off = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                    extra_body={"cache_prompt": False})
    assert off.usage.prompt_tokens_details.cached_tokens == 0
    assert off.choices[0].message.content == r.choices[0].message.content
    # more frames than the server allows, a corrupt video: 400, and the server goes on
    too_many = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": uri, "max_frames": 10**6}}]}]
    status, body = _post(server, json.dumps({"messages": too_many}).encode())
    assert status == 400 and "max_frames" in body["error"]["message"]
    bad_uri = "data:video/mp4;base64," + base64.b64encode(b"not a video" * 50).decode()
    bad = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": bad_uri}},
                                        {"type": "text", "text": "Go."}]}]
    status, body = _post(server, json.dumps({"messages": bad}).encode())
    assert status == 400 and "read as a video" in body["error"]["message"]
    assert c.chat.completions.create(model="tiny", messages=_msgs(images), max_tokens=2).usage.completion_tokens == 2
