#!/usr/bin/env python3
"""Maintain the patch queue in cpp/patches (one concern per patch).

    patches.py apply        reset third_party/llama.cpp to the pristine tree and apply the queue
    patches.py check        same, failing if any patch does not apply cleanly
    patches.py regenerate   rewrite cpp/patches from the commits on top of vp-pristine

Workflow: edit files in third_party/llama.cpp, commit there (one commit per
concern; the subject becomes the patch name), then `make patches`.
"""
from __future__ import annotations

import sys

from fetch_llama_cpp import (PATCHES, PRISTINE_TAG, TREE, FetchError, apply_patches,
                             ensure, git, patch_files)


def regenerate() -> None:
    ensure_tree_exists()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    if dirty.strip():
        raise FetchError(f"uncommitted changes in {TREE}; commit them there first:\n{dirty}")
    for p in patch_files():
        p.unlink()
    git("format-patch", "-q", "--no-signature", "--zero-commit", "--no-stat",
        "--full-index", "-o", str(PATCHES), f"{PRISTINE_TAG}..HEAD")
    names = [p.name for p in patch_files()]
    print(f"{len(names)} patch(es) in {PATCHES}:", *names, sep="\n  ")
    ensure()  # refresh the stamp so the next build does not re-apply


def ensure_tree_exists() -> None:
    if not (TREE / ".git").exists():
        ensure()


def main() -> int:
    cmd = sys.argv[1] if len(sys.argv) > 1 else "apply"
    try:
        if cmd in ("apply", "check"):
            ensure_tree_exists()
            apply_patches()
            ensure(force=False)
            print(f"{len(patch_files())} patch(es) apply cleanly onto {PRISTINE_TAG}")
        elif cmd == "regenerate":
            regenerate()
        else:
            print(__doc__)
            return 2
    except FetchError as e:
        print(f"vp-gguf: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
