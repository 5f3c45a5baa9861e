"""A small, strict reader for GGUF headers.

Used to check a file before it reaches the C loaders, so that a truncated or
foreign file becomes a clear Python error rather than whatever the C side does
with it. Reads the key/value metadata and tensor table only, never the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format (scalars only)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# arrays of arrays: llama.cpp's own files use none; a deep nesting is a crafted file (and would
# otherwise recurse without bound)
MAX_ARRAY_DEPTH = 4

# ggml type id -> (elements per block, bytes per block), for the data-size check
_GGML_TYPE_SIZE = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] first
    ggml_type: int
    offset: int

    def nbytes(self) -> int | None:
        bs = _GGML_TYPE_SIZE.get(self.ggml_type)
        if bs is None:
            return None
        n = 1
        for d in self.shape:
            n *= d
        return n // bs[0] * bs[1]


@dataclass
class GGUFInfo:
    path: Path
    version: int
    data_offset: int = 0  # file offset of the tensor data section
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelFileError(f"{self.path}: file is truncated (header ends early); re-download or regenerate it")
        return b

    def scalar(self, t: int) -> Any:
        fmt = _SCALARS[t]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(10)
        if n > self.size:
            raise ModelFileError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, t: int, depth: int = 0) -> Any:
        if t in _SCALARS:
            return self.scalar(t)
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ModelFileError(
                    f"{self.path}: corrupt GGUF header (arrays nested more than {MAX_ARRAY_DEPTH} deep)"
                )
            it, n = self.scalar(4), self.scalar(10)
            if n > self.size:
                raise ModelFileError(f"{self.path}: corrupt GGUF header (array of {n} items)")
            if it in _SCALARS:  # read numeric arrays in one go
                fmt = _SCALARS[it]
                sz = struct.calcsize(fmt)
                return list(struct.unpack(f"<{n}{fmt[1]}", self.read(sz * n)))
            if it not in (_STRING, _ARRAY):  # refuse before reading n items of it
                raise ModelFileError(f"{self.path}: corrupt GGUF header (array item type {it})")
            return [self.value(it, depth + 1) for _ in range(n)]
        raise ModelFileError(f"{self.path}: corrupt GGUF header (value type {t})")


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Parse a GGUF header; raise ModelFileError for anything that is not a whole GGUF file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        if size < 24 or f.read(4) != GGUF_MAGIC:
            raise ModelFileError(f"{path}: not a GGUF file (bad magic); expected a .gguf model")
        version = r.scalar(4)
        if version not in (2, 3):
            raise ModelFileError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = r.scalar(10), r.scalar(10)
        if n_tensors > size or n_kv > size:
            raise ModelFileError(f"{path}: corrupt GGUF header")
        info = GGUFInfo(path=path, version=version)
        for _ in range(n_kv):
            key = r.string()
            if key in info.metadata:  # llama.cpp's gguf reader refuses these too
                raise ModelFileError(f"{path}: corrupt GGUF header (key {key!r} appears twice)")
            info.metadata[key] = r.value(r.scalar(4))
        for _ in range(n_tensors):
            name = r.string()
            nd = r.scalar(4)
            if nd > 4:  # GGML_MAX_DIMS
                raise ModelFileError(f"{path}: corrupt tensor table ({name!r}: {nd} dims)")
            if name in info.tensors:
                raise ModelFileError(f"{path}: corrupt tensor table (tensor {name!r} appears twice)")
            shape = tuple(r.scalar(10) for _ in range(nd))
            info.tensors[name] = GGUFTensorInfo(name, shape, r.scalar(4), r.scalar(10))
        align = int(info.metadata.get("general.alignment", DEFAULT_ALIGNMENT)) or DEFAULT_ALIGNMENT
        data_start = (f.tell() + align - 1) // align * align
    info.data_offset = data_start
    need = data_start
    for t in info.tensors.values():
        nb = t.nbytes()
        if nb is not None:
            need = max(need, data_start + t.offset + nb)
    if need > size:
        raise ModelFileError(
            f"{path}: file is truncated ({size} bytes, its tensors need {need}); "
            "the download was probably interrupted: fetch it again"
        )
    return info
