"""Where vp-gguf's patched libllama/libmtmd live, found without loading them.

Cheap on purpose: ``import vp_gguf`` and the CLI's help run this; only
``vp_gguf._libs`` (imported when a model is used) loads the libraries.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def library_name(stem: str) -> str:
    """A shared library's file name on this platform, as llama.cpp's build names it ("llama" -> libllama.so)."""
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    return f"{stem}.dll" if sys.platform == "win32" else f"lib{stem}.so"


def _libllama_name() -> str:
    return library_name("llama")


def lib_dir() -> Path:
    """The folder holding vp-gguf's libllama, libmtmd and ggml."""
    candidates = []
    if os.environ.get("VP_GGUF_LIB_DIR"):
        candidates.append(Path(os.environ["VP_GGUF_LIB_DIR"]))
    candidates.append(Path(__file__).resolve().parent / "lib")
    try:  # the installed copy, also when a source checkout shadows the package
        import _vp_gguf_boot  # type: ignore[import-not-found]

        candidates.append(Path(_vp_gguf_boot.LIB_DIR))
    except ImportError:
        pass
    for d in candidates:
        if (d / _libllama_name()).exists():
            return d
    raise ImportError(
        "vp_gguf: the native libraries (libllama, libmtmd) were not found in "
        + ", ".join(str(c) for c in candidates)
        + ". Build and install them with `make install` (or `pip install .`) from the vp-gguf checkout."
    )


def point_llama_cpp(d: Path) -> None:
    """Make llama-cpp-python's loaders take our libraries (they read these variables on import)."""
    if "llama_cpp.llama_cpp" in sys.modules:
        loaded = os.environ.get("LLAMA_CPP_LIB_PATH")
        if loaded is None or Path(loaded).resolve() != d.resolve():
            raise ImportError(
                "llama_cpp was imported before vp_gguf with another libllama "
                f"(LLAMA_CPP_LIB_PATH={loaded!r}); unset LLAMA_CPP_LIB_PATH or set it to {d}"
            )
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(d)
        os.environ["MTMD_CPP_LIB"] = str(d)


def try_point_llama_cpp() -> None:
    """At ``import vp_gguf``: point llama_cpp at our build when it exists; errors wait for first use."""
    try:
        d = lib_dir()
    except ImportError:
        return
    if "llama_cpp.llama_cpp" not in sys.modules:
        point_llama_cpp(d)
