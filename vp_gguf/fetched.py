"""What `vp-gguf fetch` left on this machine: the pairs it fetched, their size on disk, and removing one.

The GGUF files live in huggingface-hub's cache (``snapshots/<commit>/<file>`` links to
``blobs/<hash>``); vp-gguf's manifests (one per repo, see ``vp_gguf.fetch``) say which pairs were
fetched. Removing a pair deletes exactly its files, except those another fetched pair still uses (an
mmproj shared by the quantizations of a repo, or two files with the same content: one blob), then its
manifest entry. Nothing here talks to the network.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .catalog import find
from .fetch import FetchError, _manifest_path, _read_manifest, _write_manifest, cache_dir


@dataclass
class FetchedPair:
    repo: str
    revision: str
    quant: str
    model: str  # file names in the repo
    mmproj: str
    model_path: Path | None  # in the hub's cache; None where the file is not (or no longer) there
    mmproj_path: Path | None

    @property
    def name(self) -> str:
        """What `vp-gguf run --hf` and `vp-gguf models rm` take for this pair."""
        entry = find(self.repo)
        return f"{entry.name if entry else self.repo}:{self.quant}"

    @property
    def complete(self) -> bool:
        return self.model_path is not None and self.mmproj_path is not None

    def size_bytes(self) -> int:
        """Bytes on disk, a file shared by the two counted once."""
        real = {os.path.realpath(p) for p in (self.model_path, self.mmproj_path) if p is not None}
        return sum(os.stat(r).st_size for r in real if os.path.exists(r))


def _in_cache(repo: str, name: str, revision: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    p = try_to_load_from_cache(repo, name, revision=revision)
    return Path(p) if isinstance(p, str) else None


def _pairs(repo: str, manifest: dict[str, Any]) -> dict[str, FetchedPair]:
    out = {}
    for key, pair in manifest.get("pairs", {}).items():
        rev = key.split(":")[0]
        m, mm = pair["model"], pair["mmproj"]
        out[key] = FetchedPair(repo, rev, pair["quant"], m, mm, _in_cache(repo, m, rev), _in_cache(repo, mm, rev))
    return out


def _manifests() -> dict[str, dict[str, Any]]:
    """repo -> its manifest, for every repo vp-gguf fetched from."""
    out = {}
    for p in sorted((cache_dir() / "manifests").glob("*.json")):
        # the file name is the repo with "/" as "--" (the hub's own spelling: "--" is not allowed in repo ids)
        repo = p.stem.replace("--", "/", 1)
        manifest = _read_manifest(repo)
        if manifest.get("pairs"):
            out[repo] = manifest
    return out


def fetched_pairs() -> list[FetchedPair]:
    """Every pair fetched here whose two files are in the hub's cache, one per distinct file pair."""
    seen, out = set(), []
    for repo, manifest in _manifests().items():
        for p in _pairs(repo, manifest).values():
            ident = (repo, p.revision, p.model, p.mmproj)
            if p.complete and ident not in seen:  # "repo" and "repo:Q4_K_M" may name the same files
                seen.add(ident)
                out.append(p)
    return out


def _snapshot_files(repo_dir: Path) -> list[Path]:
    return [Path(root) / f for root, _dirs, files in os.walk(repo_dir / "snapshots") for f in files]


def _delete(path: Path, repo_dir: Path) -> int:
    """Delete a snapshot file and, when nothing else in the repo's snapshots is it, its blob: bytes freed."""
    real = os.path.realpath(path)
    size = os.stat(real).st_size if os.path.exists(real) else 0
    path.unlink(missing_ok=True)
    if real == str(path):  # a copy, not a link (a filesystem without symlinks): that was the file
        return size
    if any(os.path.realpath(p) == real for p in _snapshot_files(repo_dir)):
        return 0  # another file name (another quantization, the same bytes) is this blob
    try:
        os.remove(real)
    except FileNotFoundError:
        return 0
    return size


def _tidy(repo_dir: Path) -> None:
    """Drop snapshot folders left empty, and the repo's folder when no file of it is left."""
    snaps = repo_dir / "snapshots"
    for root, _dirs, _files in sorted(os.walk(snaps), key=lambda t: -len(t[0])):
        if Path(root) != snaps and not os.listdir(root):
            os.rmdir(root)
    blobs = repo_dir / "blobs"
    if not _snapshot_files(repo_dir) and (not blobs.is_dir() or not any(blobs.iterdir())):
        shutil.rmtree(repo_dir, ignore_errors=True)


def remove(spec: str) -> tuple[list[FetchedPair], int]:
    """Delete the pair(s) named by ``spec`` (``name`` | ``owner/repo``: every quantization fetched;
    ``...:QUANT``: that one) from the hub's cache and the manifest. Returns (removed, bytes freed);
    FetchError when nothing of that name was fetched here."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    base, _, quant = spec.partition(":")
    entry = find(base)
    repo = entry.repo if entry else base
    manifest = _read_manifest(repo) if "/" in repo else {}
    pairs = _pairs(repo, manifest)
    gone = {k: p for k, p in pairs.items() if not quant or p.quant.upper() == quant.upper()}
    if not gone:
        have = sorted({p.name for p in fetched_pairs()})
        raise FetchError(
            f"{spec} is not fetched here; fetched: {', '.join(have) or 'nothing'} (`vp-gguf models` lists them)"
        )
    kept = {(p.revision, f) for k, p in pairs.items() if k not in gone for f in (p.model, p.mmproj)}
    repo_dir = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    freed, done = 0, set()
    for p in gone.values():
        for f, path in ((p.model, p.model_path), (p.mmproj, p.mmproj_path)):
            if path is not None and (p.revision, f) not in kept and path not in done:
                done.add(path)
                freed += _delete(path, repo_dir)
    if repo_dir.is_dir():
        _tidy(repo_dir)
    for k in gone:
        del manifest["pairs"][k]
    if manifest["pairs"]:
        verified = manifest.get("verified", {})
        manifest["verified"] = {r: s for r, s in verified.items() if os.path.exists(r)}
        _write_manifest(repo, manifest)
    else:
        _manifest_path(repo).unlink(missing_ok=True)
    unique = {(p.revision, p.model, p.mmproj): p for p in gone.values()}
    return list(unique.values()), freed
