"""Synthetic sequence states: a long KV cache without running the prefill.

Timing decode at 32K visual tokens needs a 32K-cell KV cache, and a 3B model's
prefill of that length takes an hour on a laptop CPU. The decode cost does not
depend on what the cached keys and values are, so this module writes a sequence
state in llama.cpp's own format (``llama_state_seq_get_data``: per cache, per
stream: cell count, per-cell metadata, then per layer the K rows and the V rows
or V columns) with random F16 contents, for ``llama_state_seq_set_data``.

The layout (row sizes, types, V transposed or not, cell metadata with or without
the M-RoPE extension, one cache or two for sliding-window models) is read from a
template: the state of the same context after decoding a couple of real tokens.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

_EXT_BYTES = 12  # llama_kv_cell_ext: x, y, tok
_IO_MAGIC = 0xAF143CD8  # llama_state_seq_get_data's header: magic, seq_id


@dataclass
class _Layer:
    k_type: int
    k_row: int
    v_type: int = -1
    v_row: int = 0  # non-transposed V: bytes per cell
    v_el: int = 0  # transposed V: bytes per element
    v_embd: int = 0  # transposed V: rows (n_embd_v_gqa)


@dataclass
class _Cache:
    n_stream: int
    ext: bool
    v_trans: bool
    layers: list[_Layer] = field(default_factory=list)


def _parse_cache(buf: bytes, off: int, n_layer_max: int) -> tuple[_Cache, int]:
    (n_stream,) = struct.unpack_from("<I", buf, off)
    off += 4
    cache = None
    for _ in range(n_stream):
        (cells,) = struct.unpack_from("<I", buf, off)
        off += 4
        if cells == 0:
            continue
        if cache is not None:
            raise ValueError("template has several non-empty streams; use one sequence")
        for ext in (False, True):  # does each cell carry the M-RoPE extension? (the template's
            # cells hold positions 0, 1, 2, ... of sequence 0: only the right layout reads so)
            size = 12 + (_EXT_BYTES if ext else 0)
            o = off + cells * size
            if o + 8 > len(buf):
                continue
            ok = all(
                struct.unpack_from("<iI", buf, off + i * size) == (i, 1)
                and struct.unpack_from("<i", buf, off + i * size + size - 4)[0] == 0
                for i in range(cells)
            )
            v_trans, n_layer = struct.unpack_from("<II", buf, o)
            if ok and v_trans in (0, 1) and 0 < n_layer <= n_layer_max:
                break
        else:
            raise ValueError("not a KV cache state this module understands")
        cache = _Cache(n_stream, ext, bool(v_trans))
        off = o + 8
        for _ in range(n_layer):
            k_type, k_row = struct.unpack_from("<iQ", buf, off)
            off += 12 + cells * k_row
            cache.layers.append(_Layer(k_type, k_row))
        for lay in cache.layers:
            if not cache.v_trans:
                lay.v_type, lay.v_row = struct.unpack_from("<iQ", buf, off)
                off += 12 + cells * lay.v_row
            else:
                lay.v_type, lay.v_el, lay.v_embd = struct.unpack_from("<iII", buf, off)
                off += 12 + lay.v_embd * cells * lay.v_el
    if cache is None:
        raise ValueError("template state is empty: decode a few tokens first")
    return cache, off


def parse_template(state: bytes, n_layer_max: int = 4096) -> list[_Cache]:
    """The caches in a sequence state (one, or base + sliding window)."""
    magic, _seq = struct.unpack_from("<Ii", state, 0)
    if magic != _IO_MAGIC:
        raise ValueError("not a llama_state_seq_get_data buffer")
    caches, off = [], 8
    while off < len(state):
        c, off = _parse_cache(state, off, n_layer_max)
        caches.append(c)
    return caches


def _f16_noise(n_bytes: int, rng: np.random.Generator, pool: np.ndarray) -> bytes:
    """n_bytes of F16 N(0,1) noise, tiled from a random pool (contents do not matter for timing)."""
    block = np.roll(pool, int(rng.integers(0, pool.size))).tobytes()
    return (block * -(-n_bytes // len(block)))[:n_bytes]


def synth_state(caches: list[_Cache], n_cells: list[int], first_pos: list[int], seed: int = 0) -> bytes:
    """A state with n_cells[i] consecutive cells from first_pos[i] in cache i, random F16 K/V."""
    rng = np.random.default_rng(seed)
    pool = rng.standard_normal(1 << 18).astype(np.float16)
    out = bytearray(struct.pack("<Ii", _IO_MAGIC, 0))
    for c, n, p0 in zip(caches, n_cells, first_pos):
        if any(lay.k_type != 1 or lay.v_type != 1 for lay in c.layers):
            raise ValueError("synthetic states need an F16 KV cache (type_k = type_v = f16)")
        if c.n_stream != 1:
            raise ValueError("synthetic states need a single-stream cache (n_seq_max = 1)")
        out += struct.pack("<II", 1, n)
        pos = np.arange(p0, p0 + n, dtype=np.int32)
        if c.ext:
            meta = np.zeros((n, 6), dtype=np.int32)  # pos, n_seq_id, x, y, tok (0: a text token), seq_id
        else:
            meta = np.zeros((n, 3), dtype=np.int32)  # pos, n_seq_id, seq_id
        meta[:, 0], meta[:, 1] = pos, 1
        out += meta.tobytes()
        out += struct.pack("<II", int(c.v_trans), len(c.layers))
        for lay in c.layers:
            out += struct.pack("<iQ", lay.k_type, lay.k_row)
            out += _f16_noise(n * lay.k_row, rng, pool)
        for lay in c.layers:
            if not c.v_trans:
                out += struct.pack("<iQ", lay.v_type, lay.v_row)
                out += _f16_noise(n * lay.v_row, rng, pool)
            else:
                out += struct.pack("<iII", lay.v_type, lay.v_el, lay.v_embd)
                out += _f16_noise(lay.v_embd * n * lay.v_el, rng, pool)
    return bytes(out)
