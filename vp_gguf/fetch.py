"""Fetch a GGUF model and its mmproj from the Hugging Face hub.

    from vp_gguf import fetch
    m = fetch("qwen2.5-vl-3b")                 # a catalog name (see vp_gguf.catalog)
    m = fetch("ggml-org/gemma-3-4b-it-GGUF:Q8_0")  # or any repo[:QUANT]
    VisionModel(m.model_path, m.mmproj_path)

huggingface-hub does the transfer: its cache is reused, a dropped connection
is resumed where it stopped, ``HF_ENDPOINT``/``HF_HOME``/``HF_TOKEN`` apply and ``HF_HUB_OFFLINE=1``
works from the cache. On top: the file pair is chosen from the repo's listing
(model by quantization, mmproj by name), each file is checked against the
hub's sha256 once (a corrupt file is deleted, never used), and a small manifest
per repo lets an offline run find what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .catalog import CATALOG, CatalogEntry, find
from .errors import VPGGUFError


class FetchError(VPGGUFError):
    """A model could not be fetched; the message says what to do."""


@dataclass
class RemoteFile:
    name: str
    size: int | None
    sha256: str | None


@dataclass
class FetchedModel:
    repo: str
    quant: str
    model_path: Path
    mmproj_path: Path
    files: list[RemoteFile] = field(default_factory=list)


def cache_dir() -> Path:
    """vp-gguf's own cache: manifests, testbed projectors, demo output (the GGUF files live in the hub's).

    ``$VP_GGUF_CACHE``, else ``$XDG_CACHE_HOME/vp-gguf``, else ``~/.cache/vp-gguf``.
    """
    if os.environ.get("VP_GGUF_CACHE"):
        return Path(os.environ["VP_GGUF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vp-gguf"


def parse_spec(spec: str, quant: str | None = None) -> tuple[str, str | None, CatalogEntry | None]:
    """``name`` | ``owner/repo`` | ``owner/repo:QUANT`` -> (repo, quant, catalog entry or None)."""
    base, _, q = spec.partition(":")
    entry = find(base)
    quant = quant or q or (entry.default_quant if entry else None)
    if entry:
        return entry.repo, quant, entry
    if "/" not in base:
        names = ", ".join(e.name for e in CATALOG)
        raise FetchError(
            f"unknown model {spec!r}: use a catalog name ({names}) or a hub repo "
            "as owner/name[:QUANT] (`vp-gguf models` lists the catalog)"
        )
    return base, quant, None


def _tokens(name: str) -> set[str]:
    return {t.upper() for t in re.split(r"[-.]", name)}  # quant tags keep their underscores


def choose_files(names: list[str], quant: str | None) -> tuple[str, str, str]:
    """(model file, mmproj file, quant) from a repo listing."""
    ggufs = [n for n in names if n.lower().endswith(".gguf") and "/" not in n]
    mmprojs = sorted(n for n in ggufs if "mmproj" in n.lower())
    models = sorted(n for n in ggufs if "mmproj" not in n.lower() and not re.search(r"-0*[2-9]\d*-of-", n))
    if not models or not mmprojs:
        raise FetchError(
            f"the repo has no {'model' if not models else 'mmproj'} GGUF file; "
            "vp-gguf needs a language model and its mmproj in one repo"
        )
    pick: str | None
    if quant is None:
        pick = next((m for m in models if "Q4_K_M" in _tokens(m)), models[0])
    else:
        pick = next((m for m in models if quant.upper() in _tokens(m) or quant.upper() in m.upper()), None)
        if pick is None:
            have = sorted({t for m in models for t in _tokens(m) if re.match(r"^(Q\d|IQ\d|F16|F32|BF16)", t)})
            raise FetchError(f"no {quant} model file in the repo; quantizations there: {', '.join(have) or models}")
    q = quant or next((t for t in _tokens(pick) if re.match(r"^(Q\d|IQ\d|F16|F32|BF16)", t)), "?")
    # the mmproj in the same precision when there is one, else the F16 one, else any
    mm = next((m for m in mmprojs if q.upper() in _tokens(m)), None) or next(
        (m for m in mmprojs if "F16" in _tokens(m)), mmprojs[0]
    )
    return pick, mm, q


_UNREACHABLE_HINT = "Check the network, or set HF_HUB_OFFLINE=1 to use what is cached"


def _is_network_error(e: BaseException) -> bool:
    """A failure to talk to the hub at all (no answer, a dropped connection), not an answer we dislike.

    huggingface-hub 1.x raises httpx's transport errors, older releases requests' ones; a refused
    socket is an OSError either way."""
    network: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError)
    try:
        import httpx

        network += (httpx.TransportError,)
    except ImportError:
        pass
    try:
        import requests

        network += (requests.ConnectionError, requests.Timeout)
    except ImportError:
        pass
    return isinstance(e, network)


def _unreachable(repo: str, e: BaseException) -> FetchError:
    reason = " ".join(str(e).split()) or e.__class__.__name__
    return FetchError(f"cannot reach the hub for {repo}: {reason}. {_UNREACHABLE_HINT}")


@contextmanager
def _quiet_retries() -> Iterator[None]:
    """Keep huggingface-hub's per-retry warnings off stderr while it runs: a failure ends as our one
    line. ``HF_HUB_VERBOSITY`` set by the user wins."""
    from huggingface_hub.utils import logging as hf_logging

    log = hf_logging.get_logger("huggingface_hub")
    if os.environ.get("HF_HUB_VERBOSITY"):
        yield
        return
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def remote_files(repo: str, revision: str = "main") -> dict[str, RemoteFile]:
    from huggingface_hub import HfApi
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        with _quiet_retries():
            info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except GatedRepoError:
        raise FetchError(f"{repo} is gated: accept its license on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise FetchError(
            f"no repo {repo!r} on the hub (or it is private: set HF_TOKEN); `vp-gguf models` lists known-good ones"
        ) from None
    except RevisionNotFoundError:
        raise FetchError(f"{repo} has no revision {revision!r}") from None
    except HfHubHTTPError as e:  # the hub answered, with an error (5xx: it is down)
        raise _refused(f"the listing of {repo}", e) from None
    except Exception as e:
        if _is_network_error(e):
            raise _unreachable(repo, e) from None
        raise
    out = {}
    for s in info.siblings or []:
        lfs = getattr(s, "lfs", None)
        out[s.rfilename] = RemoteFile(s.rfilename, s.size, getattr(lfs, "sha256", None) if lfs else None)
    return out


def _refused(what: str, e: BaseException) -> FetchError:
    """The hub answered an HTTP error (RepositoryNotFound and the like are handled before)."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), e.__class__.__name__)
    status = getattr(getattr(e, "response", None), "status_code", None) or 0
    hint = "; the hub is down: try again later, or set HF_HUB_OFFLINE=1 to use what is cached" if status >= 500 else ""
    return FetchError(f"the hub refused {what}: {first}{hint}")


def _manifest_path(repo: str) -> Path:
    return cache_dir() / "manifests" / (repo.replace("/", "--") + ".json")


def _read_manifest(repo: str) -> dict[str, Any]:
    p = _manifest_path(repo)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(repo: str, data: dict[str, Any]) -> None:
    p = _manifest_path(repo)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(p)  # never half-written


def sha256_file(path: Path, progress: bool = True) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    bar = None
    if progress and size > 64 << 20:
        from tqdm.auto import tqdm

        # disable=None: only where stderr is a terminal, as huggingface-hub's download bars
        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"checking {path.name}", disable=None)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            if bar:
                bar.update(len(block))
    if bar:
        bar.close()
    return h.hexdigest()


def _verify(path: Path, rf: RemoteFile, manifest: dict[str, Any], progress: bool) -> None:
    real = Path(os.path.realpath(path))
    st = real.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    checked = manifest.setdefault("verified", {})
    if checked.get(str(real)) == stamp:
        return
    bad = None
    if rf.size is not None and st.st_size != rf.size:
        bad = f"{st.st_size} bytes instead of {rf.size}"
    elif rf.sha256 and sha256_file(real, progress) != rf.sha256:
        bad = "its sha256 differs from the hub's"
    if bad:
        for p in (path, real):
            try:
                os.remove(p)
            except OSError:
                pass
        raise FetchError(
            f"{rf.name} in the cache is corrupt ({bad}); it was deleted: run the same command again to download it anew"
        )
    checked[str(real)] = stamp


@contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """huggingface-hub's download bars as it decides (on where stderr is a terminal), or none at all."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if show or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


def _download(repo: str, name: str, revision: str, offline: bool, progress: bool) -> Path:
    """One file into the hub's cache (or found there); every failure is a FetchError saying what to do."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    try:
        with _quiet_retries(), _progress_bars(progress):
            return Path(hf_hub_download(repo, name, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError as e:
        if offline:
            raise FetchError(
                f"{name} of {repo} is not in the cache and HF_HUB_OFFLINE is set: fetch it "
                "online first, or unset HF_HUB_OFFLINE"
            ) from None
        # online: the hub did not answer the file's metadata request (the reason is the cause)
        if isinstance(e.__cause__, HfHubHTTPError):
            raise _refused(f"{name} of {repo}", e.__cause__) from None
        raise _unreachable(repo, e.__cause__ or e) from None
    except HfHubHTTPError as e:
        raise _refused(f"{name} of {repo}", e) from None
    except Exception as e:
        # a connection lost mid-file after the client's own retries (each resumed where it stopped),
        # a short file, a full disk: nothing half-written is left in the cache
        network = _is_network_error(e)
        if not (network or isinstance(e, OSError)):
            raise
        reason = " ".join(str(e).split()) or e.__class__.__name__
        if network:
            reason = f"cannot reach the hub ({reason})"
        raise FetchError(
            f"download of {name} from {repo} was interrupted: {reason}; run the same command again, "
            "or set HF_HUB_OFFLINE=1 to use what is cached"
        ) from None


def fetch(spec: str, quant: str | None = None, revision: str = "main", progress: bool = True) -> FetchedModel:
    """Download (or find in the cache) the model and mmproj named by ``spec``; see the module doc."""
    from huggingface_hub import constants

    repo, quant, _entry = parse_spec(spec, quant)
    manifest = _read_manifest(repo)
    offline = constants.HF_HUB_OFFLINE
    key = f"{revision}:{quant or 'default'}"
    if offline:
        pair = manifest.get("pairs", {}).get(key)
        if pair is None:
            raise FetchError(
                f"HF_HUB_OFFLINE is set and {spec} was never fetched here: fetch it once "
                f"online (`vp-gguf fetch {spec}`), or unset HF_HUB_OFFLINE"
            )
        files = {f["name"]: RemoteFile(**f) for f in pair["files"]}
        model, mmproj, q = pair["model"], pair["mmproj"], pair["quant"]
    else:
        files = remote_files(repo, revision)
        model, mmproj, q = choose_files(list(files), quant)
        manifest.setdefault("pairs", {})[key] = {
            "model": model,
            "mmproj": mmproj,
            "quant": q,
            "files": [asdict(files[model]), asdict(files[mmproj])],
        }
        _write_manifest(repo, manifest)
    paths = []
    for name in (model, mmproj):
        p = _download(repo, name, revision, offline, progress)
        _verify(p, files[name], manifest, progress)
        paths.append(p)
    _write_manifest(repo, manifest)
    return FetchedModel(repo, q, paths[0], paths[1], [files[model], files[mmproj]])
