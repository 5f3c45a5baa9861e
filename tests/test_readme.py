"""Every command and snippet in the README runs as written, tiny models standing in.

The tiny Qwen2-VL-style model plays `model.gguf`/`mmproj.gguf` and, behind a local server
that answers like the hub (HF_ENDPOINT), the catalog's qwen2.5-vl-3b. `make` lines are
what CI itself runs.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[1]
QWEN_REPO = "ggml-org/Qwen2.5-VL-3B-Instruct-GGUF"


def blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def world(tiny_paths, images, tmp_path_factory):
    model, mmproj = tiny_paths("qwen2vl")
    files = {"Qwen2.5-VL-3B-Instruct-Q4_K_M.gguf": model.read_bytes(),
             "mmproj-Qwen2.5-VL-3B-Instruct-f16.gguf": mmproj.read_bytes()}
    tmp = tmp_path_factory.mktemp("readme")
    with FakeHub({QWEN_REPO: files}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp / "hf"), VP_GGUF_CACHE=str(tmp / "vp"),
                   HF_HUB_DISABLE_TELEMETRY="1")
        items = tmp / "items.jsonl"
        items.write_text('{"id": "q1", "image": "%s", "question": "Describe.", "answer": "x", "max_tokens": 4}\n'
                         % images["a"])
        from test_video import make_video

        clip = make_video(tmp / "clip", 12)
        subs = [("clip.mp4", str(clip)), ("items.jsonl", str(items)), ("file:///path/to/photo.jpg", images["a"].resolve().as_uri()),
                ("photo.jpg", str(images["a"])), ("mmproj.gguf", str(mmproj)), ("model.gguf", str(model))]
        yield env, subs, tmp


def _sub(text: str, subs) -> str:
    for old, new in subs:
        text = re.sub(rf"(?<![\w/.-]){re.escape(old)}", lambda _m: new, text)
    return text


def _commands():
    out = []
    for b in blocks("sh"):
        for line in b.replace("\\\n", " ").splitlines():
            if line.strip().startswith("vp-gguf"):
                out.append(line.strip())
    return out


@pytest.mark.parametrize("line", _commands())
def test_readme_command(world, line):
    env, subs, cwd = world
    argv = shlex.split(_sub(line, subs), comments=True)
    if argv[1] == "serve":
        return _serve(argv, env, cwd)
    photo = dict(subs)["photo.jpg"]
    stdin = f"/image {photo}\nWhat is this?\n/stats\n/quit\n" if argv[1] == "chat" else None
    r = subprocess.run([sys.executable, "-m", "vp_gguf.cli", *argv[1:]], env=env, input=stdin, cwd=cwd,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"


def _serve(argv, env, cwd):
    """The server runs until stopped: start it, ask it for its models, stop it."""
    import json
    import socket
    import time
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [a if a != "8080" else str(port) for a in argv]
    p = subprocess.Popen([sys.executable, "-m", "vp_gguf.cli", *argv[1:]], env=env, cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    assert json.loads(r.read())["data"]
                    return
            except OSError:
                assert p.poll() is None, p.stderr.read()[-2000:]
                assert time.time() < deadline, "the server did not come up"
                time.sleep(0.3)
    finally:
        p.terminate()
        p.wait(30)


@pytest.mark.parametrize("idx", range(len(blocks("python"))))
def test_readme_python(world, idx):
    env, subs, cwd = world
    code = _sub(blocks("python")[idx], subs)
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{code}\n{r.stderr[-2000:]}"


def test_every_block_is_covered():
    assert len(_commands()) >= 6 and len(blocks("python")) >= 3
