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


def one_line_error(r, *want):
    """Exit 1 and a single line on stderr holding every ``want``: never a traceback or the client's chatter."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("vp-gguf: error: ") and all(w in lines[0] for w in want), lines[0]


def test_hub_not_running(env, hub, images):
    hub.stop()  # listing, metadata and downloads all meet a closed port
    friendly = ("cannot reach the hub", "HF_HUB_OFFLINE=1")
    one_line_error(vp(env, "fetch", "smolvlm-256m"), *friendly)
    one_line_error(vp(env, "fetch", f"{REPO}:F16", "--json"), *friendly)
    one_line_error(vp(env, "run", "--hf", "smolvlm-256m", "--image", images["a"], "-p", "x"), *friendly)
    online = vp(env, "models", "--online", "--json")
    assert online.returncode == 0, online.stderr  # said per row; the table still prints
    assert all("cannot reach the hub" in row["error"] for row in json.loads(online.stdout))
    table = vp(env, "models", "--online")
    assert table.returncode == 0 and "cannot reach the hub" in table.stdout and "Traceback" not in table.stderr


def test_hub_answers_an_error(env, hub):
    hub.status = 503
    one_line_error(vp(env, "fetch", "smolvlm-256m"), "the hub refused the listing", "503", "the hub is down",
                   "HF_HUB_OFFLINE=1")


def test_unresolvable_host(env):
    r = vp(dict(env, HF_ENDPOINT="http://nonexistent.invalid"), "fetch", "smolvlm-256m")
    one_line_error(r, "cannot reach the hub", "HF_HUB_OFFLINE=1")


def test_hub_stops_mid_download(env, hub):
    """The listing and the metadata answer, then the hub goes away within the file: the client retries,
    gives up, and the user reads one line; no half file is left where a later run would take it."""
    hub.stop_after["big-Q4_K_M.gguf"] = 15 << 20
    r = vp(env, "fetch", BIG)
    one_line_error(r, "interrupted", "cannot reach the hub", "run the same command again", "HF_HUB_OFFLINE=1")
    assert not list((Path(env["HF_HOME"]) / "hub").rglob("big-Q4_K_M.gguf"))


def test_hub_stops_before_the_files(env, hub):
    """The hub answers the listing, then is gone when the file's metadata is asked for."""
    hub.gone_at.add("SmolVLM-256M-Instruct-Q8_0.gguf")
    r = vp(env, "fetch", "smolvlm-256m")
    one_line_error(r, "cannot reach the hub", "HF_HUB_OFFLINE=1")


def hub_files(env):
    return [p for p in (Path(env["HF_HOME"]) / "hub").rglob("*") if p.is_file() and "blobs" in p.parts]


def test_models_lists_and_removes_what_was_fetched(env, hub):
    small = hub.repos[REPO]
    for spec in ("smolvlm-256m", f"{REPO}:F16", BIG):
        assert vp(env, "fetch", spec, "--json").returncode == 0
    rows = json.loads(vp(env, "models", "--json").stdout)
    assert json.loads(vp(env, "models", "list", "--json").stdout) == rows
    row = next(r for r in rows if r["name"] == "smolvlm-256m")
    got = {f["name"]: f["size_bytes"] for f in row["fetched"]}
    mm = len(small["mmproj-SmolVLM-256M-Instruct-F16.gguf"])
    assert got == {"smolvlm-256m:Q8_0": len(small["SmolVLM-256M-Instruct-Q8_0.gguf"]) + mm,
                   "smolvlm-256m:F16": len(small["SmolVLM-256M-Instruct-F16.gguf"]) + mm}
    assert row["cached"] == ["F16", "Q8_0"]
    big = next(r for r in rows if r["name"] == BIG)  # fetched by repo name: a row of its own
    assert [f["name"] for f in big["fetched"]] == [f"{BIG}:Q4_K_M"] and big["family"] is None
    text = vp(env, "models")
    assert text.returncode == 0 and "fetched here: 3" in text.stdout
    assert all(n in text.stdout for n in ("smolvlm-256m:Q8_0", "smolvlm-256m:F16", f"{BIG}:Q4_K_M"))

    # the F16 pair shares its mmproj with Q8_0, and its model has Q8_0's bytes (one blob): nothing is freed
    blobs = hub_files(env)
    r = vp(env, "models", "rm", "smolvlm-256m:F16")
    assert r.returncode == 0 and "removed smolvlm-256m:F16" in r.stdout and "freed 0 B" in r.stdout, r.stderr
    assert hub_files(env) == blobs
    off = vp(env, "fetch", "smolvlm-256m", "--json", offline=True)  # Q8_0 still whole
    assert off.returncode == 0 and Path(json.loads(off.stdout)["model"]).read_bytes() == small[
        "SmolVLM-256M-Instruct-Q8_0.gguf"]
    one_line_error(vp(env, "fetch", f"{REPO}:F16", offline=True), "never fetched here")

    r = vp(env, "models", "rm", BIG)
    freed = sum(map(len, hub.repos[BIG].values()))
    assert r.returncode == 0 and f"removed {BIG}:Q4_K_M" in r.stdout and f"freed {freed / 1e6:.2f} MB" in r.stdout
    assert not (Path(env["HF_HOME"]) / "hub" / "models--test-org--big-GGUF").exists()
    r = vp(env, "models", "rm", "smolvlm-256m")  # every quantization left: Q8_0
    assert r.returncode == 0 and "removed smolvlm-256m:Q8_0" in r.stdout
    assert hub_files(env) == [] and not list(Path(env["VP_GGUF_CACHE"]).rglob("*.json"))
    assert not [p for p in (Path(env["HF_HOME"]) / "hub").rglob("*") if p.is_symlink() and not p.exists()]
    assert "nothing fetched here" in vp(env, "models").stdout
    one_line_error(vp(env, "models", "rm", "smolvlm-256m"), "smolvlm-256m is not fetched here")
    one_line_error(vp(env, "models", "rm", "nobody/nothing:Q8_0"), "is not fetched here")


def test_fetch_hint_is_the_short_command(env):
    r = vp(env, "fetch", "smolvlm-256m")
    assert r.returncode == 0, r.stderr
    assert "vp-gguf run --hf smolvlm-256m --image IMAGE -p PROMPT" in r.stderr
    assert "snapshots" not in r.stdout + r.stderr and "Q8_0" in r.stdout  # the paths are for --json
    r = vp(env, "fetch", REPO, "-q", "F16")
    assert f"vp-gguf run --hf {REPO}:F16 --image IMAGE" in r.stderr


def run_on_a_terminal(env, *args):
    """The CLI with stderr on a pseudo-terminal (as a user's shell has it); returns (rc, stdout, stderr)."""
    import fcntl
    import pty
    import struct
    import termios
    master, slave = pty.openpty()
    # a real terminal's size: tqdm fits its bar to the width, and a new pty has none (0 columns: no bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    p = subprocess.Popen([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                         stderr=slave)
    os.close(slave)
    err = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = p.stdout.read()
    os.close(master)
    return p.wait(timeout=300), out.decode(), err.decode(errors="replace")


def test_download_progress_on_a_terminal_only(env, tmp_path):
    rc, out, err = run_on_a_terminal(env, "fetch", BIG, "--json")  # --json: quiet, also on a terminal
    assert rc == 0 and json.loads(out)["quant"] == "Q4_K_M" and "%|" not in err, err
    plain = vp(env, "fetch", "smolvlm-256m")  # stderr not a terminal (captured): no bar
    assert plain.returncode == 0 and "%|" not in plain.stderr
    rc, _out, err = run_on_a_terminal(dict(env, HF_HOME=str(tmp_path / "hf2")), "fetch", BIG)  # a fresh cache
    assert rc == 0, err
    assert "big-Q4_K_M.gguf" in err and "100%|" in err  # huggingface-hub's bar, drawn to the end
