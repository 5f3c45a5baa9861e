#!/usr/bin/env python3
"""AddressSanitizer + UndefinedBehaviorSanitizer run of our C++ and the patched llama.cpp tree.

    sanitize.py              # build (build/sanitize) and run every check below
    sanitize.py --build-only
    sanitize.py --no-build   # run the checks on the last build

Builds ggml, libllama (with cpp/src), libmtmd, our CPU flash-attention kernel and the
C-level test programs with -fsanitize=address,undefined at -O1 -g, then runs:

1. vp-test-vp-fattn (tests/cpp/test-vp-fattn.cpp): our kernel against upstream's;
2. llama-mtmd-cli on each tiny model family, flash attention off and on;
3. the Python bad-input tests (PY_TESTS: bad input, the C API's bad arguments, the API's
   guards, crafted and fuzzed GGUF files: what our checks let through loads clean), and Quest's
   tests (its CPU ops write host buffers of their own) on the sanitized libraries
   (VP_GGUF_LIB_DIR, libasan preloaded into Python).

Any sanitizer report stops the program that made it (halt_on_error / abort_on_error), so
each check fails on the first finding; the report is in its output. Exit status 0 when all
pass. Takes long on 2 cores the first time (ccache keeps later builds short).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "sanitize"
BIN = BUILD / "bin"  # the executables and, with BUILD_RPATH, the shared libraries
LIB_DIR = BUILD / "lib"  # what VP_GGUF_LIB_DIR points at: the libraries and their build info
PY = ROOT / ".venv" / "bin" / "python"
TARGETS = (
    "llama", "mtmd", "ggml", "ggml-cpu", "ggml-rpc", "ggml-rpc-server", "vp_build_info", "vp-test-vp-fattn",
    "llama-mtmd-cli",
)  # fmt: skip
FLAGS = "-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
# leaks: llama.cpp keeps global registries alive to exit on purpose, and Python leaks by design;
# allocator_may_return_null: a refused huge allocation throws std::bad_alloc as without ASan (the
# bad-input tests expect that error), instead of ASan's own abort
ASAN_OPTIONS = "detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"
PY_TESTS = (
    "tests/test_bad_input.py",
    "tests/test_c_api.py",
    "tests/test_api_safety.py",
    "tests/test_gguf_hardening.py",
    "tests/test_gguf_fuzz.py",
    "tests/test_rpc.py",  # servers lost, frozen or unreachable: patch 0006's error paths
    "tests/test_quest.py",  # Quest's CPU ops write the page store, masks and gathers in host memory
)


def configure(env: dict[str, str]) -> None:
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    # Global flags, not only upstream's LLAMA_/GGML_SANITIZE_* switches: those reach the folders that
    # call llama_add_compile_flags() and ggml/src, but not the standalone libmtmd nor our test programs.
    cmd = [
        "cmake", "-S", str(ROOT), "-B", str(BUILD), *gen,
        "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
        "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -g", "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g",
        f"-DCMAKE_C_FLAGS={FLAGS}", f"-DCMAKE_CXX_FLAGS={FLAGS}",
        "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined",
        "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined",
        "-DLLAMA_SANITIZE_ADDRESS=ON", "-DLLAMA_SANITIZE_UNDEFINED=ON",
        "-DGGML_SANITIZE_ADDRESS=ON", "-DGGML_SANITIZE_UNDEFINED=ON",
        "-DVP_GGUF_BUILD_TOOLS=ON", "-DGGML_RPC=ON",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=env)


def build(jobs: int) -> float:
    env = dict(os.environ)
    env.setdefault("CCACHE_BASEDIR", str(ROOT))
    t0 = time.monotonic()
    configure(env)  # again on an existing build too: a switch added since (GGML_RPC) reaches its cache
    subprocess.run(["cmake", "--build", str(BUILD), "-j", str(jobs), "--target", *TARGETS], check=True, env=env)
    # a folder holding just the libraries and their build info, for VP_GGUF_LIB_DIR
    LIB_DIR.mkdir(exist_ok=True)
    for f in [*BIN.glob("lib*.so"), BIN / "ggml-rpc-server", BUILD / "vp_gguf_build.json"]:
        dst = LIB_DIR / f.name
        dst.unlink(missing_ok=True)
        dst.symlink_to(f.resolve())
    return time.monotonic() - t0


def sanitizer_env() -> dict[str, str]:
    env = dict(os.environ, ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=UBSAN_OPTIONS, GGML_NO_BACKTRACE="1")
    env.pop("LD_PRELOAD", None)
    return env


def preload() -> str:
    """LD_PRELOAD for an uninstrumented Python: the ASan runtime (it must come first) and libstdc++.

    Python does not link libstdc++, so without it ASan resolves its __cxa_throw interceptor before
    libstdc++ is loaded and the first C++ exception (libmtmd refusing a projector) fails its CHECK.
    """
    cc = os.environ.get("CXX", "c++")
    libs = []
    for name in ("libasan.so", "libstdc++.so"):
        out = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout
        if not Path(out.strip()).is_file():
            raise SystemExit(f"sanitize: {cc} has no {name} (install the compiler's ASan runtime)")
        libs.append(str(Path(out.strip()).resolve()))
    return " ".join(libs)


def run_step(name: str, cmd: list[str], env: dict[str, str], timeout: float) -> tuple[bool, float, str]:
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        r = subprocess.run(
            cmd,
            check=False,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",  # the tiny models generate arbitrary bytes
            timeout=timeout,
        )
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}"
    dt = time.monotonic() - t0
    found = "ERROR: AddressSanitizer" in out or "runtime error:" in out
    ok = rc == 0 and not found
    tail = out[-6000:] if not ok else "\n".join(out.splitlines()[-3:])
    print(f"{'ok' if ok else 'FAILED'} ({dt:.0f} s, rc {rc})\n{tail}\n", flush=True)
    return ok, dt, out


def tiny_models(out: Path) -> dict[str, tuple[Path, Path]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from support import tiny_vlm

    out.mkdir(parents=True, exist_ok=True)
    return {f: tiny_vlm.build_tiny_vlm(f, out) for f in tiny_vlm.FAMILIES}


def test_image(path: Path) -> Path:
    import numpy as np
    from PIL import Image

    arr = np.random.default_rng(1234).integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def mtmd_cli_steps(env: dict[str, str]) -> list[tuple[str, list[str]]]:
    work = BUILD / "work"
    models = tiny_models(work / "models")
    image = test_image(work / "a.png")
    raw = "{% for m in messages %}{{ m.content }}{% endfor %}"
    steps = []
    for family, (model, mmproj) in models.items():
        for fa in ("off", "on"):
            cmd = [str(BIN / "llama-mtmd-cli"), "-m", str(model), "--mmproj", str(mmproj), "--image", str(image),
                   "-p", "Describe the picture.", "-n", "16", "--temp", "0", "-c", "1024", "-fa", fa, "-t", "2",
                   "--jinja", "--chat-template", raw]  # fmt: skip
            steps.append((f"llama-mtmd-cli {family} fa={fa}", cmd))
    return steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("-k", dest="only", default="", help="run only the checks whose name contains this")
    a = ap.parse_args()
    t_build = 0.0 if a.no_build else build(a.jobs)
    if a.build_only:
        print(f"sanitize: built in {t_build:.0f} s ({BUILD})")
        return 0
    env = sanitizer_env()
    steps: list[tuple[str, list[str], dict[str, str], float]] = [
        ("vp-test-vp-fattn", [str(BIN / "vp-test-vp-fattn")], env, 3600)
    ]
    steps += [(n, c, env, 600) for n, c in mtmd_cli_steps(env)]
    py_env = dict(env, LD_PRELOAD=preload(), VP_GGUF_LIB_DIR=str(LIB_DIR), PYTHONPATH=str(ROOT))
    # Python's own allocations never go through an instrumented allocator; ASan only checks our libraries
    steps.append(("python bad-input tests", [str(PY), "-m", "pytest", "-q", "-p", "no:cacheprovider", *PY_TESTS],
                  py_env, 3600))  # fmt: skip
    results = []
    for name, cmd, e, timeout in [s for s in steps if a.only in s[0]]:
        ok, dt, _ = run_step(name, cmd, e, timeout)
        results.append({"check": name, "ok": ok, "seconds": round(dt, 1)})
    print("sanitize summary:")
    print(json.dumps({"build_seconds": round(t_build, 1), "checks": results}, indent=1))
    failed = [r["check"] for r in results if not r["ok"]]
    print(
        f"sanitize: {len(results) - len(failed)}/{len(results)} checks clean"
        + (f"; failed: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
