"""Model fetching against a local server that mimics the hub (HF_ENDPOINT), never the internet."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import FakeHub

REPO = "ggml-org/SmolVLM-256M-Instruct-GGUF"  # catalog name smolvlm-256m; tiny files stand in
BIG = "test-org/big-GGUF"


@pytest.fixture()
def hub(tiny_paths):
    model, mmproj = tiny_paths("llava")
    files = {"SmolVLM-256M-Instruct-Q8_0.gguf": model.read_bytes(),
             "SmolVLM-256M-Instruct-F16.gguf": model.read_bytes() + b"",
             "mmproj-SmolVLM-256M-Instruct-F16.gguf": mmproj.read_bytes(),
             "README.md": b"# test repo\n"}
    # larger than the client's 10 MB write chunk, so a cut download leaves a partial file to resume
    big = {"big-Q4_K_M.gguf": os.urandom(24 << 20), "mmproj-big-F16.gguf": mmproj.read_bytes()}
    with FakeHub({REPO: files, BIG: big}) as h:
        yield h


@pytest.fixture()
def env(hub, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), VP_GGUF_CACHE=str(tmp_path / "vp"),
             HF_HUB_DISABLE_TELEMETRY="1")
    return e


def vp(env, *args, offline=False):
    e = dict(env, HF_HUB_OFFLINE="1") if offline else env
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], env=e,
                          capture_output=True, text=True, timeout=300)


def test_fetch_by_name_then_offline_then_run(env, images):
    r = vp(env, "fetch", "smolvlm-256m", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["quant"] == "Q8_0" and d["model"].endswith("SmolVLM-256M-Instruct-Q8_0.gguf")
    assert d["mmproj"].endswith("mmproj-SmolVLM-256M-Instruct-F16.gguf")
    assert Path(d["model"]).is_file() and str(Path(env["HF_HOME"])) in d["model"]  # the hub's own cache
    off = vp(env, "fetch", "smolvlm-256m", "--json", offline=True)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout) == d
    run = vp(env, "run", "--hf", "smolvlm-256m", "--image", images["a"], "-p", "Describe.", "-n", 4,
             "-c", 1024, "-t", 2, "--json", offline=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["n_generated"] == 4
    models = vp(env, "models", "--json")
    row = next(x for x in json.loads(models.stdout) if x["name"] == "smolvlm-256m")
    assert row["cached"] == ["Q8_0"] and row["repo"] == REPO
    online = vp(env, "models", "--online", "--json")
    row = next(x for x in json.loads(online.stdout) if x["name"] == "smolvlm-256m")
    assert row["files"]["model"] == "SmolVLM-256M-Instruct-Q8_0.gguf" and row["size_bytes"] > 0
    other = next(x for x in json.loads(online.stdout) if x["name"] == "gemma3-4b")
    assert "no repo" in other["error"]  # not on this fake hub: said per row, the table still prints


def test_repo_and_quant(env):
    r = vp(env, "fetch", f"{REPO}:F16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"].endswith("-F16.gguf")
    bad = vp(env, "fetch", f"{REPO}:Q2_K")
    assert bad.returncode == 1 and "no Q2_K model file" in bad.stderr and "Q8_0" in bad.stderr


def test_interrupted_download_resumes(env, hub):
    name = "big-Q4_K_M.gguf"
    hub.cut[name] = 15 << 20
    r = vp(env, "fetch", BIG, "--json")
    if r.returncode != 0:  # the client may retry by itself; else the next run resumes
        assert "interrupted" in r.stderr and "run the same command again" in r.stderr
        r = vp(env, "fetch", BIG, "--json")
    assert r.returncode == 0, r.stderr
    ranges = [rg for (m, p, rg) in hub.requests if m == "GET" and p.endswith(name) and rg]
    assert ranges and ranges[0] != "bytes=0-"  # resumed where it stopped, not restarted
    assert Path(json.loads(r.stdout)["model"]).read_bytes() == hub.repos[BIG][name]


def test_corrupt_file_is_deleted_and_refetched(env, hub):
    name = "mmproj-SmolVLM-256M-Instruct-F16.gguf"
    good = hub.repos[REPO][name]
    hub.lie[name] = bytes(len(good))  # same size, other bytes
    r = vp(env, "fetch", "smolvlm-256m")
    assert r.returncode == 1 and "corrupt" in r.stderr and "deleted" in r.stderr
    blobs = list((Path(env["HF_HOME"]) / "hub").rglob("blobs/*"))
    assert all(b.read_bytes() != bytes(len(good)) for b in blobs if b.is_file())  # nothing bad left
    del hub.lie[name]
    r = vp(env, "fetch", "smolvlm-256m", "--json")
    assert r.returncode == 0, r.stderr
    assert Path(json.loads(r.stdout)["mmproj"]).read_bytes() == good


def test_clear_errors(env):
    r = vp(env, "fetch", "nobody/no-such-repo")
    assert r.returncode == 1 and "no repo 'nobody/no-such-repo'" in r.stderr
    r = vp(env, "fetch", "not-a-model")
    assert r.returncode == 1 and "unknown model" in r.stderr and "smolvlm-256m" in r.stderr
    r = vp(env, "fetch", "smolvlm-500m", offline=True)
    assert r.returncode == 1 and "HF_HUB_OFFLINE" in r.stderr
    r = vp(env, "run", "-p", "x")
    assert r.returncode == 2 and "--hf" in r.stderr
