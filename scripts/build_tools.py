#!/usr/bin/env python3
"""Build llama.cpp's own programs from the same pinned, patched tree, for the tests.

    build_tools.py                       # prints the path of the built llama-mtmd-cli (the oracle)
    build_tools.py vp-test-llama-archs   # upstream's architecture test on the patched libllama

Uses its own build folder (build/tools) and ccache; a rebuild of an unchanged
tree is a no-op.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "tools"
TARGET = "llama-mtmd-cli"


def build(quiet: bool = True, target: str = TARGET) -> Path:
    env = dict(os.environ)
    env.setdefault("CCACHE_BASEDIR", str(ROOT))  # cache hits across build folders
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    out = subprocess.DEVNULL if quiet else None
    if not (BUILD / "CMakeCache.txt").exists():
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
                        "-DVP_GGUF_BUILD_TOOLS=ON"], check=True, env=env, stdout=out)
    jobs = str(os.cpu_count() or 2)
    r = subprocess.run(["cmake", "--build", str(BUILD), "-j", jobs, "--target", target],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building {target} failed:\n{r.stdout[-4000:]}")
    exe = BUILD / "bin" / target
    if not exe.exists():
        raise RuntimeError(f"{exe} missing after the build")
    return exe


if __name__ == "__main__":
    print(build(quiet=False, target=sys.argv[1] if len(sys.argv) > 1 else TARGET))
    sys.exit(0)
