#!/usr/bin/env python3
"""Fetch the pinned llama.cpp tree and apply vp-gguf's patch queue.

The tree is the one vendored in the llama-cpp-python sdist named in
``third_party/llama.cpp.lock.json``. It is downloaded with pip, checked
against the locked sha256 (a mismatch is a hard error), extracted into the
ignored folder ``third_party/llama.cpp`` and turned into a git repository whose
first commit (tag ``vp-pristine``) is the pristine upstream tree. The patches
in ``cpp/patches`` are then applied with ``git am`` on top of it.

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


def download_sdist(lock: dict) -> Path:
    """The sdist from the package index, cached and hash-checked."""
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / lock["sdist"]
    if sdist.exists() and sha256_of(sdist) == lock["sha256"]:
        return sdist
    print(f"vp-gguf: downloading {lock['package']}=={lock['version']} sdist "
          f"(the pinned llama.cpp tree, ~75 MB)", flush=True)
    # --no-binary for this package only: ':all:' would also build its build
    # dependencies (cmake) from source just to read the sdist's metadata.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           "--no-binary", lock["package"], "-d", str(CACHE),
           f"{lock['package']}=={lock['version']}"]
    r = subprocess.run(cmd, text=True, capture_output=True)
    if r.returncode != 0 or not sdist.exists():
        raise FetchError(f"could not download {lock['sdist']} with pip:\n{r.stdout}{r.stderr}")
    got = sha256_of(sdist)
    if got != lock["sha256"]:
        sdist.unlink()
        raise FetchError(
            f"sha256 mismatch for {lock['sdist']}: expected {lock['sha256']}, got {got}. "
            "The package index served a different file than the one vp-gguf is pinned to; "
            "refusing to build from it.")
    return sdist


def extract(lock: dict, sdist: Path) -> None:
    prefix = f"{lock['sdist'].removesuffix('.tar.gz')}/{lock['subdir']}/"
    tmp = Path(tempfile.mkdtemp(prefix="llama.cpp-", dir=TREE.parent))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir() or m.issym()):
                    continue
                m.name = m.name[len(prefix):]
                # the sdist keeps upstream's submodule pointer (.git file): drop it
                if m.name.split("/")[0] == ".git":
                    continue
                if m.name and not m.name.startswith(("/", "..")):
                    members.append(m)
            if not members:
                raise FetchError(f"{sdist.name} has no {lock['subdir']}/ folder")
            tar.extractall(tmp, members=members, filter="tar")
        if TREE.exists():
            shutil.rmtree(TREE)
        tmp.rename(TREE)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    git("init", "-q", "-b", "vp")
    git("add", "-A", "-f")
    git("commit", "-q", "--no-verify", "-m",
        f"pristine llama.cpp {lock['llama_cpp_commit']} from {lock['sdist']}")
    git("tag", PRISTINE_TAG)


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
    lock = load_lock()
    stamp = TREE / ".git" / STAMP_NAME
    want = wanted_stamp(lock)
    if not force and stamp.exists() and stamp.read_text().strip() == want:
        return TREE
    has_pristine = (TREE / ".git").exists() and subprocess.run(
        ["git", "rev-parse", "-q", "--verify", PRISTINE_TAG], cwd=TREE,
        capture_output=True).returncode == 0
    if force or not has_pristine:
        extract(lock, download_sdist(lock))
    apply_patches()
    stamp.write_text(want + "\n")
    print(f"vp-gguf: llama.cpp {lock['llama_cpp_commit']} ready in {TREE} "
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
            ok = stamp.exists() and stamp.read_text().strip() == wanted_stamp(load_lock())
            print("up to date" if ok else "stale or missing")
            return 0 if ok else 1
        ensure(force=a.force)
    except FetchError as e:
        print(f"vp-gguf: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
