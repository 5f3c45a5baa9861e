"""Load our patched libllama/libmtmd through llama-cpp-python's ctypes layer.

llama-cpp-python's Python layer (installed with vp-gguf, from the same pinned
sdist as the llama.cpp tree) takes the library folder from LLAMA_CPP_LIB_PATH /
MTMD_CPP_LIB. We point both at our build before its first import, so one
process holds exactly one libllama, and from a source checkout only libraries
built from that checkout's sources.
"""

from __future__ import annotations

import ctypes
from types import ModuleType

from . import _build_info
from ._libdir import lib_dir, library_name, point_llama_cpp


def _bind() -> tuple[ModuleType, ModuleType]:
    d = lib_dir()
    _build_info.check(d)
    point_llama_cpp(d)
    import llama_cpp

    want = (_build_info.read(d) or {}).get("llama_cpp_python")
    if want is not None and getattr(llama_cpp, "__version__", None) != want:
        raise ImportError(
            f"vp_gguf: llama_cpp {getattr(llama_cpp, '__version__', '?')} from {llama_cpp.__file__} is not the "
            f"Python layer vp-gguf was built with ({want}); another llama-cpp-python was installed over "
            "it: reinstall vp-gguf, in its own virtual environment"
        )
    import llama_cpp.llama_cpp as llama
    import llama_cpp.mtmd_cpp as mtmd

    return llama, mtmd


def optional_library(stem: str) -> ctypes.CDLL | None:
    """Another library of our build, loaded beside libllama (ggml's registry, ggml-rpc); None if the
    build left it out."""
    try:
        return ctypes.CDLL(str(lib_dir() / library_name(stem)))
    except OSError:
        return None


llama_cpp, mtmd_cpp = _bind()
__all__ = ["lib_dir", "llama_cpp", "mtmd_cpp", "optional_library"]
