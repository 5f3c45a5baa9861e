"""Decoding: the prompt's chunks prefilled (images encoded by the projector), text tokens decoded,
and llama_decode's failures as Python errors (the sampler is sampler.py's)."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

from . import _log
from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M
from .errors import ContextOverflowError, DecodeError, ImageError
from .loading import LoadedModel
from .prompt import Prepared, chunk_positions
from .result import Timings
from .visionpulse import VisionPulseControl

_NO_POST_DECODE = M.mtmd_helper_post_decode_callback()  # a NULL function pointer


def check_decode(lm: LoadedModel, rc: int, what: str) -> None:
    if rc == 0:
        return
    lm.check_rpc()  # a lost RPC server fails the graphs that need it: say which
    if rc == 1:
        raise ContextOverflowError(f"the context ({lm.n_ctx} tokens) is full while decoding {what}: raise n_ctx")
    raise DecodeError(f"llama.cpp failed to decode {what} (code {rc}): {_log.last_error() or ''}".strip())


def decode_tokens(lm: LoadedModel, tokens: Sequence[int], pos0: int, what: str) -> None:
    """Decode text tokens at explicit positions, n_batch at a time (logits for the last one)."""
    for b0 in range(0, len(tokens), lm.n_batch):
        part = tokens[b0 : b0 + lm.n_batch]
        batch = L.llama_batch_init(len(part), 0, 1)
        try:
            for j, tok in enumerate(part):
                batch.token[j] = tok
                batch.pos[j] = pos0 + b0 + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = b0 + j == len(tokens) - 1
            batch.n_tokens = len(part)
            check_decode(lm, L.llama_decode(lm._ctx, batch), what)
        finally:
            L.llama_batch_free(batch)


# A unit of the prompt the cache can keep: a text token (its id) or an image chunk (its bitmap's
# name), with the position it starts at and the tokens it takes.
Unit = tuple[int | bytes, int, int]


def prompt_units(prep: Prepared) -> list[Unit]:
    units: list[Unit] = []
    for ch, pos in chunk_positions(prep):
        if M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n_tok = ctypes.c_size_t(0)
            ptr = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n_tok))
            units += [(ptr[j], pos + j, 1) for j in range(n_tok.value)]
        else:
            units.append((M.mtmd_input_chunk_get_id(ch) or b"?", pos, M.mtmd_input_chunk_get_n_tokens(ch)))
    return units


def keep_cached_prefix(lm: LoadedModel, units: list[Unit]) -> int:
    """How many leading units of this prompt the cache already holds (the rest is cut from it);
    at least the last unit is left to decode, for its logits. 0 when nothing can be kept: a
    sliding-window layer no longer holds the window the first new token needs (llama.cpp's
    server's rule; ``swa_full`` keeps it), or the cache refuses the cut."""
    cached = lm._kv_units
    mem = L.llama_get_memory(lm._ctx)
    if not cached or L.llama_memory_seq_pos_max(mem, 0) != cached[-1][1]:
        return 0  # the cache was changed behind our record (a tool of one's own on the context): trust neither
    n = 0
    while n < min(len(cached), len(units) - 1) and cached[n][:2] == units[n][:2]:
        n += 1
    if n == 0:
        return 0
    cut = units[n][1]
    if not L.llama_memory_seq_rm(mem, 0, cut, -1):
        return 0
    n_swa = L.llama_model_n_swa(lm._model)
    if n_swa > 0 and L.llama_memory_seq_pos_min(mem, 0) > max(0, cut - n_swa):
        return 0
    return n


def eval_prompt(
    lm: LoadedModel, prep: Prepared, t: Timings, vp: VisionPulseControl, reuse: bool = False
) -> tuple[int, int]:
    """Encode images and prefill every chunk (dense, no VisionPulse step); returns the next
    position and the prompt tokens kept from the cache.

    With ``reuse``, the prompt's leading tokens and images that the cache holds from the previous
    request (at the same positions) are kept, and only the rest is encoded and prefilled. With
    VisionPulse "static", the last prompt token is decoded on its own as the first step, so that
    its query ranks the visual tokens once (FastV-style)."""
    units = prompt_units(prep)
    n_keep = keep_cached_prefix(lm, units) if reuse else 0
    if n_keep == 0:
        L.llama_memory_clear(L.llama_get_memory(lm._ctx), True)
    lm._kv_units = []  # until the prompt is in
    vp.new_prompt()
    n_past = 0
    u = 0  # the unit chunk i starts at
    n = M.mtmd_input_chunks_size(prep.chunks)
    for i in range(n):
        ch = M.mtmd_input_chunks_get(prep.chunks, i)
        is_text = M.mtmd_input_chunk_get_type(ch) == M.MTMD_INPUT_CHUNK_TYPE_TEXT
        n_units = M.mtmd_input_chunk_get_n_tokens(ch) if is_text else 1
        if u + n_units <= n_keep:  # all of it in the cache already
            n_past += M.mtmd_input_chunk_get_n_pos(ch)
            u += n_units
            continue
        if is_text:
            n_past = _prefill_text(lm, ch, n_past, max(0, n_keep - u), i == n - 1, t, vp)
        else:
            n_past = _prefill_image(lm, ch, i, n_past, t)
        u += n_units
    lm._kv_units = units
    return n_past, sum(unit[2] for unit in units[:n_keep])


def _prefill_text(lm: LoadedModel, ch, n_past: int, skip: int, last: bool, t: Timings, vp: VisionPulseControl) -> int:
    """A text chunk's tokens from ``skip`` on; returns the next position."""
    t0 = time.perf_counter()
    new_n_past = L.llama_pos(n_past)
    static_last = last and vp.settings is not None and vp.settings.mode == "static"
    if skip or static_last:
        n_tok = ctypes.c_size_t(0)
        ptr = M.mtmd_input_chunk_get_tokens_text(ch, ctypes.byref(n_tok))
        toks = [ptr[j] for j in range(skip, n_tok.value)]
        if static_last:
            if len(toks) > 1:
                decode_tokens(lm, toks[:-1], n_past + skip, "the prompt text")
            vp.begin_generation()
            decode_tokens(lm, toks[-1:], n_past + n_tok.value - 1, "the last prompt token")
        else:
            decode_tokens(lm, toks, n_past + skip, "the prompt text")
        new_n_past.value = n_past + n_tok.value
    else:
        rc = M.mtmd_helper_eval_chunk_single(
            lm._mctx, lm._ctx, ch, n_past, 0, lm.n_batch, last, ctypes.byref(new_n_past)
        )
        check_decode(lm, rc, "the prompt text")
    t.prefill_ms += (time.perf_counter() - t0) * 1e3
    return new_n_past.value


def _prefill_image(lm: LoadedModel, ch, i: int, n_past: int, t: Timings) -> int:
    """An image chunk encoded by the projector and its embeddings decoded; returns the next position."""
    new_n_past = L.llama_pos(n_past)
    t0 = time.perf_counter()
    if M.mtmd_encode_chunk(lm._mctx, ch) != 0:
        raise ImageError(f"the projector failed to encode image chunk {i}: {_log.last_error() or ''}".strip())
    embd = M.mtmd_get_output_embd(lm._mctx)
    t1 = time.perf_counter()
    t.image_encode_ms += (t1 - t0) * 1e3
    rc = M.mtmd_helper_decode_image_chunk(
        lm._mctx, lm._ctx, ch, embd, n_past, 0, lm.n_batch, ctypes.byref(new_n_past), _NO_POST_DECODE, None
    )
    check_decode(lm, rc, "an image")
    t.prefill_ms += (time.perf_counter() - t1) * 1e3
    return new_n_past.value
