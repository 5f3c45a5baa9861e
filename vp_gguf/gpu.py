"""GPU offload as llama.cpp's ``-ngl`` spells it: ``auto``, ``all`` or a layer count.

``auto`` (the command line's default, as in llama.cpp's tools) offloads every layer when the model
and projector files fit in the GPUs' free memory with room to spare for the KV cache and compute
buffers, else the share of layers that fits; a build without a GPU backend offloads nothing. llama.cpp
fits its tools' settings with a finer model of each buffer (common/fit.cpp, not part of libllama);
this is the same rule at the granularity of files.
"""

from __future__ import annotations

import ctypes
import functools
import warnings

AUTO, ALL = "auto", "all"
GpuLayers = int | str  # a count (-1: all, as llama-cpp-python counts), "auto" or "all"
HEADROOM = 1 << 30  # bytes left free beside the weights: KV cache, compute buffers, the driver's own

_DEV_GPU, _DEV_IGPU = 1, 2  # enum ggml_backend_dev_type (ggml-backend.h): dedicated, integrated


def parse(spec: str) -> GpuLayers:
    """``auto``, ``all`` or an integer >= -1 (-1: all), as the command line takes it."""
    s = spec.strip().lower()
    if s in (AUTO, ALL):
        return s
    n = int(s, 10)  # ValueError: not a count
    if n < -1:
        raise ValueError(f"a layer count is >= -1, got {n}")
    return n


@functools.cache
def ggml() -> ctypes.CDLL | None:
    """libggml's device registry (None if the library is missing)."""
    from ._libs import optional_library

    lib = optional_library("ggml")
    if lib is None:
        return None
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    size_p = ctypes.POINTER(ctypes.c_size_t)
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, size_p, size_p]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    return lib


def local_devices() -> list[int]:
    """This machine's GPUs as ggml lists them (dedicated and integrated)."""
    lib = ggml()
    if lib is None:
        return []
    devs = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    return [d for d in devs if lib.ggml_backend_dev_type(d) in (_DEV_GPU, _DEV_IGPU)]


def free_bytes(devices: list[int]) -> int:
    """The free memory these devices report."""
    lib = ggml()
    if lib is None:
        return 0
    total_free = 0
    for dev in devices:
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        total_free += int(free.value)
    return total_free


def gpu_free_bytes() -> int:
    """Free memory of the GPU devices ggml sees (0 without any)."""
    return free_bytes(local_devices())


def layers_to_offload(
    spec: GpuLayers, n_layer: int, weights_bytes: int, free_bytes: int | None = None, remote: bool = False
) -> int:
    """The n_gpu_layers llama.cpp gets (its count includes the output layer: n_layer + 1 is all).
    remote: RPC servers take layers too (free_bytes then counts theirs)."""
    if spec == 0:
        return 0
    if not remote and not _offload_supported():
        _warn_no_gpu(spec)
        return 0
    if spec in (ALL, -1):
        return n_layer + 1
    if spec == AUTO:
        free = gpu_free_bytes() if free_bytes is None else free_bytes
        room = max(0, free - HEADROOM)
        if weights_bytes <= room:
            return n_layer + 1
        return (n_layer + 1) * room // max(1, weights_bytes)
    assert isinstance(spec, int)
    return spec


def _offload_supported() -> bool:
    # a GPU to offload to: llama_supports_gpu_offload() also says yes for a build with the RPC
    # backend, whose devices exist only once servers are named (`remote` above)
    return bool(local_devices())


_warned: list[bool] = []


def _warn_no_gpu(spec: GpuLayers) -> None:
    """Once per process (a server or a test suite loads many models): auto says nothing, it did its job."""
    if spec != AUTO and not _warned:
        _warned.append(True)
        warnings.warn(
            "this build of llama.cpp has no GPU backend: n_gpu_layers / -ngl is ignored "
            "(build with CMAKE_ARGS=-DGGML_CUDA=on, or Metal on macOS, to offload)",
            stacklevel=4,
        )
