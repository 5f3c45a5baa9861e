"""A random-weight text model with a real VLM's language-model dimensions, for timing.

``build_speed_model()`` writes the language model of Qwen2.5-VL-3B as far as speed is
concerned: arch ``qwen2vl`` (M-RoPE), 36 layers, n_embd 2048, 16 query heads, 2 KV
heads, head dim 128, FFN 11008, the full 151936-token Qwen2 vocabulary, tied
output, Q/K/V biases, every matrix in Q4_K (what Q4_K_M mostly is). The blocks are
random bytes with small scales: the text is gibberish, the work per token is the
real model's. ~1.8 GB, written in about half a minute and cached by the caller.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from . import tiny_vlm as T

QWEN25_VL_3B = T._TextSpec(
    arch="qwen2vl",
    n_embd=2048,
    n_layer=36,
    n_head=16,
    n_head_kv=2,
    n_ff=11008,
    n_ctx_train=128000,
    rope_freq_base=1000000.0,
    rms_eps=1e-6,
    rope_sections=(16, 24, 24, 0),
    qkv_bias=True,
)
SPEC_NAME = "Qwen2.5-VL-3B language model (36 layers, 16/2 heads, head dim 128, FFN 11008), random Q4_K"

_QK_K, _Q4_K_BYTES = 256, 144


def _q4_k(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """Random Q4_K blocks (uint8 [n_out, n_in/256*144]) with small super-block scales."""
    nb = n_in // _QK_K
    blocks = rng.integers(0, 256, size=(n_out, nb, _Q4_K_BYTES), dtype=np.uint8)
    scales = np.array([2e-4, 1e-4], dtype=np.float16).view(np.uint8)  # d, dmin
    blocks[:, :, :4] = scales
    return blocks.reshape(n_out, nb * _Q4_K_BYTES)


def build_speed_model(path: str | Path, seed: int = 0, n_layer: int | None = None) -> Path:
    """Write the model to ``path`` (``n_layer`` overrides the layer count, for quick checks)."""
    root = T.find_llama_cpp_root()
    gguf = T.gguf_module()
    t = QWEN25_VL_3B if n_layer is None else replace(QWEN25_VL_3B, n_layer=n_layer)
    vocab = T._vocab_qwen2vl(gguf, root, full_vocab=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = T._Weights(seed, np.float32)
    rng = np.random.default_rng(seed + 1)
    writer = T.text_model_writer(
        gguf, path, "vp-gguf speed model", f"{SPEC_NAME}; seed {seed}", int(gguf.LlamaFileType.MOSTLY_Q4_K_M), t, vocab
    )
    MT, Q4_K = gguf.MODEL_TENSOR, gguf.GGMLQuantizationType.Q4_K
    hd = t.n_embd // t.n_head
    n_q, n_kv = hd * t.n_head, hd * t.n_head_kv

    def mat(name: str, n_out: int, n_in: int) -> None:
        writer.add_tensor(name, _q4_k(rng, n_out, n_in), raw_dtype=Q4_K)

    mat(T.tensor_name(gguf, MT.TOKEN_EMBD), vocab.n_tokens, t.n_embd)
    writer.add_tensor(T.tensor_name(gguf, MT.OUTPUT_NORM), w.norm(t.n_embd))
    for i in range(t.n_layer):
        writer.add_tensor(T.tensor_name(gguf, MT.ATTN_NORM, i), w.norm(t.n_embd))
        mat(T.tensor_name(gguf, MT.ATTN_Q, i), n_q, t.n_embd)
        mat(T.tensor_name(gguf, MT.ATTN_K, i), n_kv, t.n_embd)
        mat(T.tensor_name(gguf, MT.ATTN_V, i), n_kv, t.n_embd)
        writer.add_tensor(T.tensor_name(gguf, MT.ATTN_Q, i, "bias"), w.bias(n_q))
        writer.add_tensor(T.tensor_name(gguf, MT.ATTN_K, i, "bias"), w.bias(n_kv))
        writer.add_tensor(T.tensor_name(gguf, MT.ATTN_V, i, "bias"), w.bias(n_kv))
        mat(T.tensor_name(gguf, MT.ATTN_OUT, i), t.n_embd, n_q)
        writer.add_tensor(T.tensor_name(gguf, MT.FFN_NORM, i), w.norm(t.n_embd))
        mat(T.tensor_name(gguf, MT.FFN_GATE, i), t.n_ff, t.n_embd)
        mat(T.tensor_name(gguf, MT.FFN_UP, i), t.n_ff, t.n_embd)
        mat(T.tensor_name(gguf, MT.FFN_DOWN, i), t.n_embd, t.n_ff)
    T.finish(writer)
    return path
