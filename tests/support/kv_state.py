"""Synthetic sequence states: a long KV cache without running the prefill.

Timing decode at 32K visual tokens needs a 32K-cell KV cache, and a 3B model's
prefill of that length takes an hour on a laptop CPU. The decode cost does not
depend on what the cached keys and values are, so this module writes a sequence
state in llama.cpp's own format (``llama_state_seq_get_data``: per cache, per
stream: cell count, per-cell metadata, then per layer the K rows and the V rows
or V columns) with random contents (F16 or Q8_0 rows), for ``llama_state_seq_set_data``.

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


GGML_F16, GGML_Q8_0 = 1, 8  # the KV cache types synthetic states can hold
_Q8_0_BLOCK = 34  # ggml's block_q8_0: an F16 scale and 32 int8 values


def _noise_pool(rng: np.random.Generator) -> dict[int, bytes]:
    """A pool of random rows' bytes per type: F16 N(0,1), and Q8_0 blocks of about that range."""
    f16 = rng.standard_normal(1 << 18).astype(np.float16)
    n_blocks = 1 << 13
    q8 = np.zeros((n_blocks, _Q8_0_BLOCK), dtype=np.uint8)
    q8[:, :2] = np.full(n_blocks, 3.0 / 127, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    q8[:, 2:] = rng.integers(-127, 128, size=(n_blocks, 32), dtype=np.int8).view(np.uint8)
    return {GGML_F16: f16.tobytes(), GGML_Q8_0: q8.tobytes()}


def _noise(n_bytes: int, typ: int, rng: np.random.Generator, pool: dict[int, bytes]) -> bytes:
    """n_bytes of rows of type typ, tiled from the pool from a random whole-block offset
    (contents do not matter for timing; only their type's layout does)."""
    unit = 2 if typ == GGML_F16 else _Q8_0_BLOCK
    src = pool[typ]
    k = int(rng.integers(0, len(src) // unit)) * unit
    block = src[k:] + src[:k]
    return (block * -(-n_bytes // len(block)))[:n_bytes]


def synth_state(caches: list[_Cache], n_cells: list[int], first_pos: list[int], seed: int = 0) -> bytes:
    """A state with n_cells[i] consecutive cells from first_pos[i] in cache i, random K/V of
    the cache's types (F16 or Q8_0)."""
    rng = np.random.default_rng(seed)
    pool = _noise_pool(rng)
    out = bytearray(struct.pack("<Ii", _IO_MAGIC, 0))
    for c, n, p0 in zip(caches, n_cells, first_pos):
        if any(lay.k_type not in pool or lay.v_type not in pool for lay in c.layers):
            raise ValueError("synthetic states need an F16 or Q8_0 KV cache")
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
            out += _noise(n * lay.k_row, lay.k_type, rng, pool)
        for lay in c.layers:
            if not c.v_trans:
                out += struct.pack("<iQ", lay.v_type, lay.v_row)
                out += _noise(n * lay.v_row, lay.v_type, rng, pool)
            else:
                out += struct.pack("<iII", lay.v_type, lay.v_el, lay.v_embd)
                out += _noise(lay.v_embd * n * lay.v_el, lay.v_type, rng, pool)
    return bytes(out)
