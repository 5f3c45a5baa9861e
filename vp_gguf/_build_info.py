"""What vp-gguf's native libraries were built from, so a checkout never runs stale ones.

The build writes ``vp_gguf_build.json`` beside the libraries: a hash of the
sources compiled into them (``cpp/``, with the patch queue; the llama.cpp lock;
``CMakeLists.txt``). When ``vp_gguf`` is imported from a source checkout, its
libraries must carry that checkout's hash: a C++ change can never pass its
tests against libraries built before it. An installed wheel has no sources and
skips the check. Standard library only: the build runs this file as a script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

INFO_NAME = "vp_gguf_build.json"
# what is compiled into the libraries, relative to the checkout
SOURCES = ("CMakeLists.txt", "third_party/llama.cpp.lock.json", "cpp")


def checkout_root() -> Path | None:
    """The source checkout this module runs from, or None for an installed package."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "cpp" / "src").is_dir() and (root / "CMakeLists.txt").is_file() else None


def source_hash(root: Path) -> str:
    h = hashlib.sha256()
    for rel in SOURCES:
        p = root / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(f.read_bytes())
    return h.hexdigest()


def read(lib_dir: Path) -> dict | None:
    try:
        return json.loads((lib_dir / INFO_NAME).read_text())
    except (OSError, ValueError):
        return None


def check(lib_dir: Path) -> None:
    """Raise ImportError when a checkout's vp_gguf would load libraries built from other sources."""
    root = checkout_root()
    if root is None:
        return
    info = read(lib_dir)
    if info is None or info.get("source_hash") != source_hash(root):
        raise ImportError(
            f"vp_gguf: the native libraries in {lib_dir} were not built from this checkout's C++ "
            f"sources ({root}): rebuild them with `make install`"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description="write the build info of vp-gguf's libraries")
    ap.add_argument("--write", required=True, type=Path)
    a = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    lock = json.loads((root / "third_party" / "llama.cpp.lock.json").read_text())
    info = {
        "source_hash": source_hash(root),
        "llama_cpp_python": lock["version"],
        "llama_cpp_commit": lock["llama_cpp_commit"],
    }
    text = json.dumps(info, indent=1) + "\n"
    if not a.write.exists() or a.write.read_text() != text:  # unchanged: leave the file's time alone
        a.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
