"""A projector fitted in closed form that lets a text-only GGUF model read glyph images.

The mmproj is of libmtmd's LLaVA "mlp" type with a single vision block, so the
vision tower runs no transformer layer (LLaVA reads the second-to-last layer):
patch conv -> (+ zero position embeddings; no class token, no layer norms) -> mm.0
-> GELU -> mm.2. Tiles are pure black and white, so after normalisation every
pixel is 0 or 1, exact even in libmtmd's F16 im2col, and we build the path so
that every number on it is a small integer until the last, exact, step:

    conv   c_g = sum_i w_gi x_i,  w_g = +1 on glyph g's ink, -1 elsewhere, x = 1 - ink
    mm.0   h_g = -32 c_g + 32 (sum_i w_gi - |ink_g|) + 16
           = 16 for the tile's own glyph, <= -16 for any other (tiles differ in >= 1 pixel)
    GELU   ggml passes x >= 10 through unchanged and returns exactly 0 for x <= -10
    mm.2   out = E h / 16        E = the glyphs' token input embeddings

so a tile of glyph g comes out bit for bit as token g's input embedding as the
model's own token path produces it (the dequantised token_embd row, times
sqrt(n_embd) for the Gemma family, whose graph scales token inputs but not
embedding inputs).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..gguf_file import GGUFInfo, read_gguf_info
from ..gguf_write import VisionSpec, finish, gguf_module, start_mmproj, tensor_name
from .glyphs import BLANK, CHARS, PATCH, tile

_SQRT_SCALED_ARCHS = {"gemma", "gemma2", "gemma3"}  # scale token inputs by sqrt(n_embd)
_MEAN, _STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # x = pixel / 255
HI, LO = 16.0, -16.0  # beyond ggml's GELU cut-offs (+-10)


def glyph_token_ids(info: GGUFInfo, chars: str = CHARS) -> dict[str, int]:
    """The single token each glyph stands for (a space is SentencePiece's '▁')."""
    tokens = info.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{info.path} has no tokenizer")
    index = {t: i for i, t in enumerate(tokens)}
    out = {}
    for ch in chars:
        for cand in (ch,) if ch != " " else ("▁", " ", "Ġ"):
            if cand in index:
                out[ch] = index[cand]
                break
        else:
            raise ValueError(f"the vocabulary of {info.path.name} has no single token for {ch!r}")
    return out


def token_embeddings(info: GGUFInfo, ids: list[int]) -> np.ndarray:
    """Rows of token_embd as the graph's token path produces them (float32, [len(ids), n_embd])."""
    t = info.tensors.get("token_embd.weight")
    if t is None:
        raise ValueError(f"{info.path} has no token_embd.weight")
    n_embd, n_vocab = t.shape
    rows = []
    with open(info.path, "rb") as f:
        for i in ids:
            if not 0 <= i < n_vocab:
                raise ValueError(f"token id {i} out of range")
            if t.ggml_type == 0:  # F32
                f.seek(info.data_offset + t.offset + i * n_embd * 4)
                rows.append(np.frombuffer(f.read(n_embd * 4), dtype=np.float32))
            elif t.ggml_type == 1:  # F16
                f.seek(info.data_offset + t.offset + i * n_embd * 2)
                rows.append(np.frombuffer(f.read(n_embd * 2), dtype=np.float16).astype(np.float32))
            elif t.ggml_type == 8:  # Q8_0: blocks of (fp16 d, 32 x int8); value = q * d, exact in f32
                nb = n_embd // 32
                f.seek(info.data_offset + t.offset + i * nb * 34)
                blk = np.frombuffer(f.read(nb * 34), dtype=np.uint8).reshape(nb, 34)
                d = blk[:, :2].copy().view(np.float16).astype(np.float32)
                q = blk[:, 2:].copy().view(np.int8).astype(np.float32)
                rows.append((q * d).reshape(-1))
            else:
                raise ValueError(f"token_embd type {t.ggml_type} is not supported (F32, F16, Q8_0)")
    e = np.stack(rows).astype(np.float32)
    arch = info.architecture
    if arch in _SQRT_SCALED_ARCHS:
        e = e * np.float32(math.sqrt(float(n_embd)))  # ggml_scale(inp, sqrtf(n_embd)) in float32
    return e


def ink_matrix(chars: str, patch: int = PATCH) -> np.ndarray:
    """Tiles' ink (1 = black) as rows of 0/1, flattened in the conv kernel's (channel, y, x) order."""
    rows = [(tile(ch, patch) == 0).astype(np.float32).transpose(2, 0, 1).reshape(-1) for ch in chars]
    return np.stack(rows)


def build_glyph_mmproj(
    model_path: str | Path, out_path: str | Path, n_side: int, chars: str = CHARS, patch: int = PATCH
) -> Path:
    """Write an mmproj whose n_side x n_side tile grid reads as the glyphs' tokens."""
    info = read_gguf_info(model_path)
    arch = info.architecture
    n_embd = int(info.get(f"{arch}.embedding_length"))
    ids = glyph_token_ids(info, chars)
    emb = token_embeddings(info, [ids[c] for c in chars])  # [G, n_embd]
    ink = ink_matrix(chars, patch)  # [G, 3 P^2] of 0/1
    G = len(chars)
    if len({r.tobytes() for r in ink}) < G:
        raise ValueError("two glyphs render to the same tile; use a larger patch or fewer glyphs")
    sign = 2.0 * ink - 1.0  # +1 on ink, -1 elsewhere
    conv = sign.astype(np.float32)  # c_g = sign_g . x, x = 1 - ink
    bias0 = (HI - LO) * (sign.sum(1) - ink.sum(1)) + HI  # integers: exact in F32
    d = G  # vision width: one channel per glyph
    n_ff = d + 8  # clip.cpp swaps up/down when n_ff == d; the block never runs anyway
    n_patches = n_side * n_side

    gguf = gguf_module()
    MT = gguf.MODEL_TENSOR
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    spec = VisionSpec(
        projector="mlp",
        image_size=n_side * patch,
        patch_size=patch,
        n_embd=d,
        n_layer=1,
        n_head=1,
        n_ff=n_ff,
        eps=1e-5,
        mean=_MEAN,
        std=_STD,
    )
    w = start_mmproj(
        gguf,
        tmp,
        f"vp-gguf glyph projector for {info.get('general.name', arch)}",
        f"closed-form glyph reader: {n_side}x{n_side} tiles of {patch}px, glyphs {chars!r}",
        spec,
        n_embd,
    )
    z = lambda *shape: np.zeros(shape, dtype=np.float32)
    w.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_PATCH), conv.reshape(d, 3, patch, patch))
    # no class token: with one, libmtmd's LLaVA graph drops the first patch and keeps the class row
    w.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_POS), z(n_patches, d))
    # block 0 is loaded but never run (LLaVA stops at the second-to-last layer)
    for tensor in (MT.V_ENC_INPUT_NORM, MT.V_ENC_POST_ATTN_NORM):
        w.add_tensor(tensor_name(gguf, tensor, 0), z(d))
        w.add_tensor(tensor_name(gguf, tensor, 0, "bias"), z(d))
    for tensor in (MT.V_ENC_ATTN_Q, MT.V_ENC_ATTN_K, MT.V_ENC_ATTN_V, MT.V_ENC_ATTN_O):
        w.add_tensor(tensor_name(gguf, tensor, 0), z(d, d))
        w.add_tensor(tensor_name(gguf, tensor, 0, "bias"), z(d))
    w.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_UP, 0), z(n_ff, d))
    w.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_UP, 0, "bias"), z(n_ff))
    w.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_DOWN, 0), z(d, n_ff))
    w.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_DOWN, 0, "bias"), z(d))
    w.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 0), (np.eye(d, dtype=np.float32) * np.float32(-(HI - LO))))
    w.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 0, "bias"), bias0.astype(np.float32))
    w.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 2), (emb.T / np.float32(HI)).astype(np.float32))
    w.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 2, "bias"), z(n_embd))
    finish(w)
    tmp.replace(out_path)
    return out_path


__all__ = ["BLANK", "build_glyph_mmproj", "glyph_token_ids", "ink_matrix", "token_embeddings"]


def main(argv: list[str] | None = None) -> int:
    """python -m vp_gguf.testbed.projector [--model M] --grid 16 --out glyph-mmproj.gguf"""
    import argparse

    ap = argparse.ArgumentParser(description="write the closed-form glyph projector for a GGUF text model")
    ap.add_argument("--model", help="text model GGUF (default: the testbed's Gemma 3 270M)")
    ap.add_argument("--grid", type=int, default=16, help="tiles per side (image size = grid x 14 px)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    if a.model is None:
        from .assets import gemma_path

        a.model = gemma_path()
    print(build_glyph_mmproj(a.model, a.out, a.grid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
