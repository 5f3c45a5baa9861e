"""`vp-gguf --version`, `python -m vp_gguf`, and the progress line of long runs."""
from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import vp_gguf
from vp_gguf.runs import Progress

ROOT = Path(__file__).resolve().parents[1]


def vp_module(*args):
    return subprocess.run([sys.executable, "-m", "vp_gguf", *args], capture_output=True, text=True, timeout=120)


def test_version_names_the_package_and_the_llama_cpp_build():
    r = vp_module("--version")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    # the code that runs, the installed distribution and pyproject agree
    assert first == f"vp-gguf {vp_gguf.__version__}" == f"vp-gguf {importlib.metadata.version('vp-gguf')}"
    lock = json.loads((ROOT / "third_party" / "llama.cpp.lock.json").read_text())
    assert f"llama.cpp {lock['llama_cpp_commit']} " in second and lock["version"] in second


def test_python_m_vp_gguf_is_the_command_line():
    r = vp_module("models", "--json")
    assert r.returncode == 0 and any(row["name"] == "smolvlm-256m" for row in json.loads(r.stdout))
    r = vp_module()
    assert r.returncode == 2 and r.stderr.startswith("vp-gguf: error:")
    r = vp_module("run", "-m", "x.gguf", "--mmproj", "y.gguf", "-p", "x", "-n", "-3")
    assert r.returncode == 2 and "-n/--n-predict" in r.stderr


def test_progress_line(capsys):
    with Progress(4) as bar:
        bar.at(0, "first")
        bar.at(3, "item-three")
    err = capsys.readouterr().err
    assert "3/4" in err and "item-three" in err and "<" in err  # done/total, what runs, elapsed<remaining
    with Progress(4, enabled=False) as bar:
        bar.at(4, "done")
    assert capsys.readouterr().err == ""
