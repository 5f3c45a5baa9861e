"""Shared fixtures: tiny generated VLMs (cached), test images, the llama-mtmd-cli oracle."""
from __future__ import annotations

import hashlib
import os
import sys

os.environ.setdefault("GGML_NO_BACKTRACE", "1")  # an abort in a test should not start gdb
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import vp_gguf  # noqa: E402
from vp_gguf import _build_info, _libdir  # noqa: E402
from support import tiny_vlm  # noqa: E402


@pytest.fixture(autouse=True)
def _selection_never_skipped(request, monkeypatch):
    """The tiny models have one full-attention layer after the default anchor, where the library's
    default (min_pruned_layers 2) skips the selection as one that cannot pay. Tests of what the
    selection does turn the skip off, as a user can (min_pruned_layers=0); tests of the skip itself
    are marked library_defaults. The CLI's subprocesses pass --vp-min-pruned-layers 0 themselves."""
    if request.node.get_closest_marker("library_defaults"):
        return
    from vp_gguf import _vp_ctypes as V

    library = V.llama_vp_default_params

    def defaults():
        p = library()
        p.min_pruned_layers = 0
        return p

    monkeypatch.setattr(V, "llama_vp_default_params", defaults)


def pytest_sessionstart(session):
    """Tests run the checkout's code: stop at once if the native libraries were built from other sources."""
    try:
        _build_info.check(_libdir.lib_dir())
    except ImportError as e:
        pytest.exit(str(e), returncode=2)

CACHE = Path(os.environ.get("VP_GGUF_TEST_CACHE", ROOT / ".vp-cache" / "tests"))
FAMILIES = tiny_vlm.FAMILIES


def _generator_hash() -> str:
    return hashlib.sha256(Path(tiny_vlm.__file__).read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    d = CACHE / f"tiny-{_generator_hash()}"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def tiny_paths(model_dir):
    """family -> (model.gguf, mmproj.gguf), generated on first use and cached."""
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            m = model_dir / f"{family}-tiny.gguf"
            p = model_dir / f"{family}-tiny-mmproj.gguf"
            if not (m.exists() and p.exists()):
                m, p = tiny_vlm.build_tiny_vlm(family, model_dir)
            cache[family] = (m, p)
        return cache[family]
    return get


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Deterministic test images: two noise images, a gradient and a JPEG."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1234)
    out = {}
    for name in ("a", "b"):
        arr = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
        out[name] = d / f"{name}.png"
        Image.fromarray(arr).save(out[name])
    y, x = np.mgrid[0:64, 0:64]
    grad = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    out["grad"] = d / "grad.png"
    Image.fromarray(grad).save(out["grad"])
    out["jpeg"] = d / "grad.jpg"
    Image.fromarray(grad).save(out["jpeg"], quality=90)
    return out


_MODELS: dict[tuple, vp_gguf.VisionModel] = {}


@pytest.fixture(scope="session")
def load_model(tiny_paths):
    """Loaded VisionModels, shared across tests (keyed by family and settings)."""
    def get(family: str, **kw) -> vp_gguf.VisionModel:
        kw.setdefault("n_ctx", 1024)
        kw.setdefault("n_threads", 2)
        # scripts/gpu_check.sh runs the exactness tests with every layer offloaded
        kw.setdefault("n_gpu_layers", int(os.environ.get("VP_GGUF_TEST_N_GPU_LAYERS", "0")))
        key = (family, tuple(sorted(kw.items())))
        if key not in _MODELS:
            m, p = tiny_paths(family)
            _MODELS[key] = vp_gguf.VisionModel(m, p, **kw)
        return _MODELS[key]
    yield get
    for m in _MODELS.values():
        m.close()
    _MODELS.clear()


@pytest.fixture(scope="session")
def mtmd_cli() -> Path:
    """llama.cpp's llama-mtmd-cli built from the same pinned tree (built once, cached)."""
    import build_tools
    return build_tools.build()
