#!/usr/bin/env python3
"""The first step of `make`: check the machine, make the project's .venv, fetch the pinned tree.

    python3 scripts/bootstrap.py [--venv .venv]

Runs with whatever `python3` is (even an old one, to say so): each missing
piece stops it with one line saying what is missing and how to get it. Then it
creates the virtual environment (never touching the system's Python), fetches
and hash-checks the pinned llama.cpp (the first step that needs the network,
so an offline machine fails here, in seconds; it also says so if git is missing)
and installs the build requirements named in pyproject.toml. It never runs a
system package manager.
"""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
    return open(os.path.join(ROOT, "pyproject.toml")).read()


def min_python():
    """requires-python of pyproject.toml, as (major, minor)."""
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"', pyproject(), re.M)
    return (int(m.group(1)), int(m.group(2))) if m else (3, 10)


def fail(what, how):
    sys.stderr.write("vp-gguf: %s: %s\n" % (what, how))
    sys.exit(2)


def check_python():
    need = min_python()
    if sys.version_info[:2] < need:
        fail("Python %d.%d or newer is needed, %s is %d.%d" % (need + (sys.executable,) + tuple(sys.version_info[:2])),
             "install one (apt install python3.11, brew install python@3.12, or pyenv) and run "
             "`make demo PYTHON=python3.12`")
    try:
        import ensurepip  # noqa: F401
        import venv  # noqa: F401
    except ImportError:
        fail("this Python cannot create virtual environments",
             "install its venv module (Debian/Ubuntu: apt install python3-venv)")


def check_tools():
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if not (cc and cxx):
        fail("no C/C++ compiler found", "install one (Debian/Ubuntu: apt install build-essential; "
             "Fedora: dnf install gcc-c++; macOS: xcode-select --install)")
    if not shutil.which("ccache"):
        print("vp-gguf: ccache not found: the first build takes a few minutes and every clean rebuild as long "
              "(apt install ccache, brew install ccache)")


def build_requirements():
    """build-system.requires of pyproject.toml (read without tomllib, which 3.10 lacks)."""
    block = re.search(r"^\[build-system\]\s*\nrequires\s*=\s*\[(.*?)\]", pyproject(), re.S | re.M)
    if block is None:
        fail("pyproject.toml has no [build-system] requires", "restore it from git")
    return re.findall(r'"([^"]+)"', block.group(1))


def run(cmd):
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(r.returncode)


def main():
    venv = sys.argv[sys.argv.index("--venv") + 1] if "--venv" in sys.argv else ".venv"
    check_python()
    check_tools()
    venv = os.path.join(ROOT, venv)
    py = os.path.join(venv, "Scripts" if os.name == "nt" else "bin", "python")
    if not os.path.exists(py):
        print("vp-gguf: creating the virtual environment %s" % os.path.relpath(venv, ROOT), flush=True)
        run([sys.executable, "-m", "venv", venv])
    run([py, os.path.join(ROOT, "scripts", "fetch_llama_cpp.py")])
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *build_requirements()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
