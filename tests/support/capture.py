"""Copy named graph tensors out at every step, through llama.cpp's cb_eval (a test helper, not shipped).

    cb, captured = tensor_capture(["kq_soft_max-5"])
    VisionModel(model, mmproj, cb_eval=cb)    # captured["kq_soft_max-5"]: one array per evaluation

Used by the oracle tests to read the anchor layer's attention probabilities
(``kq_soft_max-<layer>``, non-flash-attention path) exactly as the graph computed them.
"""

from __future__ import annotations

import ctypes

import numpy as np

from vp_gguf._libs import llama_cpp as L

_ggml = ctypes.CDLL(L._lib._name.replace("libllama", "libggml-base"))
_ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml.ggml_get_name.restype = ctypes.c_char_p
_ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml.ggml_nbytes.restype = ctypes.c_size_t
_ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml.ggml_backend_tensor_get.restype = None

_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32}  # ggml_type ids: F32, F16, I32
_NE_OFFSET = 16  # struct ggml_tensor { enum ggml_type type; buffer*; int64_t ne[4]; ... }


def tensor_capture(wanted, shapes=None):
    """(callback, captured): the callback copies the F32, F16 and I32 tensors named in ``wanted`` into ``captured``;
    the shape (ne[0..3]) of every wanted tensor, whatever its type, goes to ``shapes`` if given."""
    names, sink = set(wanted), {}
    @L.ggml_backend_sched_eval_callback
    def cb(t, ask, user_data):
        name = (_ggml.ggml_get_name(t) or b"").decode()
        if ask:
            return name in names
        if name in names:
            typ = ctypes.c_int32.from_address(t).value
            ne = [ctypes.c_int64.from_address(t + _NE_OFFSET + 8 * i).value for i in range(4)]
            if shapes is not None:
                shapes.setdefault(name, []).append(tuple(ne))
            if typ in _DTYPES:
                arr = np.empty(ne[::-1], dtype=_DTYPES[typ])
                _ggml.ggml_backend_tensor_get(t, arr.ctypes.data, 0, _ggml.ggml_nbytes(t))
                sink.setdefault(name, []).append(arr)
        return True

    return cb, sink
