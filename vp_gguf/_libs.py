"""Load our patched libllama/libmtmd through llama-cpp-python's ctypes layer.

llama-cpp-python is installed for its Python layer only; its loaders take the
library folder from LLAMA_CPP_LIB_PATH / MTMD_CPP_LIB. We point both at our
build before its first import, so one process holds exactly one libllama.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

_LIB_NAMES = {"linux": "libllama.so", "darwin": "libllama.dylib", "win32": "llama.dll"}


def _libllama_name() -> str:
    return _LIB_NAMES.get(sys.platform, "libllama.so")


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
        + ". Build and install them with `make install` (or `pip install .`) from the vp-gguf checkout.")


def _bind() -> tuple[ModuleType, ModuleType]:
    d = str(lib_dir())
    if "llama_cpp.llama_cpp" in sys.modules:
        loaded = os.environ.get("LLAMA_CPP_LIB_PATH")
        if loaded is None or Path(loaded).resolve() != Path(d).resolve():
            raise ImportError(
                "llama_cpp was imported before vp_gguf with another libllama "
                f"(LLAMA_CPP_LIB_PATH={loaded!r}); unset LLAMA_CPP_LIB_PATH or set it to {d}")
    else:
        os.environ["LLAMA_CPP_LIB_PATH"] = d
        os.environ["MTMD_CPP_LIB"] = d
    import llama_cpp.llama_cpp as llama_cpp
    import llama_cpp.mtmd_cpp as mtmd_cpp
    return llama_cpp, mtmd_cpp


llama_cpp, mtmd_cpp = _bind()
