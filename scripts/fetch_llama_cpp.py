#!/usr/bin/env python3
"""Fetch the pinned llama.cpp tree and apply vp-gguf's patch queue.

The tree is the one vendored in the llama-cpp-python sdist named in
``third_party/llama.cpp.lock.json``. It is downloaded with pip, checked
against the locked sha256 (a mismatch is a hard error), extracted into the
ignored folder ``third_party/llama.cpp`` and turned into a git repository whose
first commit (tag ``vp-pristine``) is the pristine upstream tree. The patches
in ``cpp/patches`` are then applied with ``git am`` on top of it. The sdist's
Python layer (the ``llama_cpp`` package) goes to ``third_party/llama-cpp-python``,
from where the build installs it beside ``vp_gguf``.

The pip that downloads is the one the user runs, found outside any isolated
build environment (which has no pip of its own); a copy of the sdist already in
``third_party/.cache`` (a vp-gguf sdist carries one) or named by
``$VP_GGUF_LLAMA_CPP_SDIST`` is used without any network.

Idempotent: a stamp file records the lock and the patch queue that the tree
was made from; when both match, nothing is done. When only the patches
changed, the tree is reset to ``vp-pristine`` and the queue re-applied.

Usage:
    fetch_llama_cpp.py            # ensure the patched tree exists (default)
    fetch_llama_cpp.py --check    # exit 1 unless the tree is up to date
    fetch_llama_cpp.py --force    # re-extract from the sdist and re-apply
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "third_party" / "llama.cpp.lock.json"
TREE = ROOT / "third_party" / "llama.cpp"
CACHE = ROOT / "third_party" / ".cache"
PYLAYER = ROOT / "third_party" / "llama-cpp-python"
ENV_SDIST = "VP_GGUF_LLAMA_CPP_SDIST"
PATCHES = ROOT / "cpp" / "patches"
STAMP_NAME = ".vp-gguf-stamp"
PRISTINE_TAG = "vp-pristine"
GIT_ID = ["-c", "user.name=vp-gguf", "-c", "user.email=vp-gguf@localhost",
          "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false"]


class FetchError(RuntimeError):
    pass


def load_lock() -> dict:
    return json.loads(LOCK.read_text())


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("[0-9][0-9][0-9][0-9]-*.patch"))


def wanted_stamp(lock: dict) -> str:
    h = hashlib.sha256(lock["sha256"].encode())
    for p in patch_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git(*args: str, cwd: Path = TREE, quiet: bool = True) -> str:
    r = subprocess.run(["git", *GIT_ID, *args], cwd=cwd, text=True,
                       capture_output=True)
    if r.returncode != 0:
        raise FetchError(f"git {' '.join(args)} failed in {cwd}:\n{r.stdout}{r.stderr}")
    if not quiet:
        print(r.stdout, end="")
    return r.stdout


def pip_command() -> list[str] | None:
    """A working pip, looked for outside an isolated build environment.

    Inside pip's build isolation ``sys.executable`` is the user's interpreter
    with its site-packages hidden (``-I`` shows them again); inside
    ``python -m build``'s throw-away venv the base interpreter or the pip on
    PATH is the user's.
    """
    candidates = [[sys.executable, "-m", "pip"], [sys.executable, "-I", "-m", "pip"]]
    base = getattr(sys, "_base_executable", None)
    if base and base != sys.executable:
        candidates.append([base, "-I", "-m", "pip"])
    candidates += [[w] for w in (shutil.which("pip3"), shutil.which("pip")) if w]
    for cmd in candidates:
        r = subprocess.run([*cmd, "--version"], capture_output=True, text=True)
        if r.returncode == 0:
            return cmd
    return None


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1]


def _checked(path: Path, lock: dict) -> Path:
    got = sha256_of(path)
    if got != lock["sha256"]:
        raise FetchError(
            f"sha256 mismatch for {path.name}: expected {lock['sha256']}, got {got}. "
            "This is not the file vp-gguf is pinned to; refusing to build from it.")
    return path


def download_sdist(lock: dict) -> Path:
    """The sdist: from $VP_GGUF_LLAMA_CPP_SDIST, the cache, or the package index via pip; hash-checked."""
    if os.environ.get(ENV_SDIST):
        given = Path(os.environ[ENV_SDIST]).expanduser()
        if not given.is_file():
            raise FetchError(f"{ENV_SDIST}={given} is not a file")
        return _checked(given, lock)
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / lock["sdist"]
    if sdist.exists() and sha256_of(sdist) == lock["sha256"]:
        return sdist
    pip = pip_command()
    if pip is None:
        raise FetchError(
            f"no pip found to download {lock['package']}=={lock['version']}'s sdist (the pinned llama.cpp "
            f"source); install pip, or download it yourself and set {ENV_SDIST} to its path")
    print(f"vp-gguf: downloading {lock['package']}=={lock['version']} sdist "
          f"(the pinned llama.cpp tree, ~75 MB)", flush=True)
    # --no-binary for this package only: ':all:' would also build its build
    # dependencies (cmake) from source just to read the sdist's metadata.
    cmd = [*pip, "download", "--no-deps", "--retries", "2", "--no-binary", lock["package"],
           "-d", str(CACHE), f"{lock['package']}=={lock['version']}"]
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0 or not sdist.exists():
        raise FetchError(
            f"could not download {lock['sdist']} (the pinned llama.cpp source; the first build needs the "
            f"package index, or the file in {CACHE} or {ENV_SDIST}): {_one_line(r.stdout + r.stderr)}")
    try:
        return _checked(sdist, lock)
    except FetchError:
        sdist.unlink()
        raise


def _safe_member(m: tarfile.TarInfo) -> bool:
    """No absolute names, nothing outside the target, no link pointing out of it."""
    if not m.name or m.name.startswith("/") or ".." in Path(m.name).parts:
        return False
    if m.issym():
        target = os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname))
        return not (m.linkname.startswith("/") or target.startswith(".."))
    return m.isfile() or m.isdir()


def _extract(sdist: Path, prefix: str, dest: Path, skip_top: tuple[str, ...] = ()) -> int:
    """Extract the members under ``prefix`` into ``dest`` (replaced whole); returns their count."""
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + "-", dir=dest.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix):
                    continue
                m.name = m.name[len(prefix):]
                if m.name.split("/")[0] in skip_top or not _safe_member(m):
                    continue
                members.append(m)
            if not members:
                raise FetchError(f"{sdist.name} has no {prefix} folder")
            if hasattr(tarfile, "data_filter"):  # 3.10.12+/3.11.4+: the stdlib's own checks too
                tar.extractall(tmp, members=members, filter="tar")
            else:  # older Pythons: _safe_member is the whole check
                tar.extractall(tmp, members=members)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return len(members)


def extract(lock: dict, sdist: Path) -> None:
    top = lock["sdist"].removesuffix(".tar.gz")
    # the sdist keeps upstream's submodule pointer (.git file): drop it
    _extract(sdist, f"{top}/{lock['subdir']}/", TREE, skip_top=(".git",))
    git("init", "-q", "-b", "vp")
    git("add", "-A", "-f")
    git("commit", "-q", "--no-verify", "-m",
        f"pristine llama.cpp {lock['llama_cpp_commit']} from {lock['sdist']}")
    git("tag", PRISTINE_TAG)


def extract_python_layer(lock: dict, sdist: Path) -> None:
    """llama-cpp-python's ``llama_cpp`` package and licence, for the build to install beside vp_gguf."""
    top = lock["sdist"].removesuffix(".tar.gz")
    PYLAYER.mkdir(parents=True, exist_ok=True)
    _extract(sdist, f"{top}/{lock['python_package']}/", PYLAYER / lock["python_package"])
    with tarfile.open(sdist) as tar:
        lic = tar.extractfile(f"{top}/LICENSE.md")
        if lic is None:
            raise FetchError(f"{sdist.name} has no LICENSE.md")
        (PYLAYER / "LICENSE.md").write_bytes(lic.read())
    (PYLAYER / STAMP_NAME).write_text(lock["sha256"] + "\n")


def python_layer_ok(lock: dict) -> bool:
    stamp = PYLAYER / STAMP_NAME
    return stamp.exists() and stamp.read_text().strip() == lock["sha256"]


def apply_patches() -> None:
    git("reset", "-q", "--hard", PRISTINE_TAG)
    git("clean", "-q", "-fdx")
    for p in patch_files():
        try:
            git("am", "-q", "--keep-cr", str(p))
        except FetchError as e:
            subprocess.run(["git", "am", "--abort"], cwd=TREE, capture_output=True)
            raise FetchError(f"patch {p.name} does not apply cleanly onto the pinned tree:\n{e}")


def ensure(force: bool = False) -> Path:
    if shutil.which("git") is None:
        raise FetchError("git is needed to apply vp-gguf's patches to llama.cpp; install it "
                         "(apt install git, brew install git, or xcode-select --install)")
    lock = load_lock()
    sdist: Path | None = None  # found (and hash-checked) once, when something is extracted
    if force or not python_layer_ok(lock):
        sdist = download_sdist(lock)
        extract_python_layer(lock, sdist)
    stamp = TREE / ".git" / STAMP_NAME
    want = wanted_stamp(lock)
    if not force and stamp.exists() and stamp.read_text().strip() == want:
        return TREE
    has_pristine = (TREE / ".git").exists() and subprocess.run(
        ["git", "rev-parse", "-q", "--verify", PRISTINE_TAG], cwd=TREE,
        capture_output=True).returncode == 0
    if force or not has_pristine:
        extract(lock, sdist or download_sdist(lock))
    apply_patches()
    stamp.write_text(want + "\n")
    print(f"vp-gguf: llama.cpp {lock['llama_cpp_commit']} ready in {TREE.relative_to(ROOT)} "
          f"with {len(patch_files())} patch(es)", flush=True)
    return TREE


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 unless the tree is up to date")
    ap.add_argument("--force", action="store_true", help="re-extract and re-apply")
    a = ap.parse_args()
    try:
        if a.check:
            stamp = TREE / ".git" / STAMP_NAME
            lock = load_lock()
            ok = stamp.exists() and stamp.read_text().strip() == wanted_stamp(lock) and python_layer_ok(lock)
            print("up to date" if ok else "stale or missing")
            return 0 if ok else 1
        ensure(force=a.force)
    except FetchError as e:
        print(f"vp-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
