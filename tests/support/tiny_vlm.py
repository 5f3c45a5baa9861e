"""Tiny random-weight vision-language models as GGUF (text model + mmproj) pairs.

The generated pairs are meant for fast tests: every file is well under 5 MB,
a build takes about a second, and ``llama-mtmd-cli`` loads them, encodes an
image and generates text with them. The weights are random (seeded), so the
text is gibberish, but greedy output depends on the image.

Three families are supported, each laid out the way the pinned llama.cpp
loaders (``src/models/*.cpp`` for the text model, ``tools/mtmd/clip.cpp`` for
the projector) expect:

``llava``
    text arch ``llama``; mmproj ``clip`` with projector type ``mlp``
    (LLaVA-1.5: CLIP ViT with class embedding and pre-LN, ``mm.0``/``mm.2``
    MLP). Fixed image size, no image marker tokens.
``qwen2vl``
    text arch ``qwen2vl`` (M-RoPE, ``rope.dimension_sections``); mmproj with
    projector type ``qwen2vl_merger`` (two patch-embedding convs, 2-D M-RoPE
    ViT, 2x2 patch merger). Dynamic image size; images are wrapped in
    ``<|vision_start|>`` ... ``<|vision_end|>``.
``gemma3``
    text arch ``gemma3`` (interleaved sliding-window attention using
    llama.cpp's default 5 local : 1 global layer pattern); mmproj with
    projector type ``gemma3`` (SigLIP ViT, average pooling to
    ``tokens_per_image``, soft-embedding RMS norm, input projection). Images
    are wrapped in ``<start_of_image>`` ... ``<end_of_image>``.

The tokenizer metadata (``tokenizer.*`` keys) is taken from the vocab-only
GGUF files shipped in the llama.cpp tree's ``models/`` folder:

* llava: ``ggml-vocab-llama-spm.gguf`` copied unchanged (32000 tokens).
* gemma3: the same SPM vocab plus four appended control tokens
  (``<start_of_turn>``, ``<end_of_turn>``, ``<start_of_image>``,
  ``<end_of_image>``), because the tree ships no Gemma 3 vocab (the
  ``gemma-4`` one is 16 MB and lacks ``<start_of_image>``).
* qwen2vl: ``ggml-vocab-qwen2.gguf`` cut down to its first
  ``QWEN2_KEPT_REGULAR_TOKENS`` byte-level BPE tokens (with the merges that
  only involve kept tokens) followed by the Qwen2-VL special tokens in their
  real order. The full vocab is 5.9 MB of metadata on its own and carries
  ``[PAD151646]`` ... placeholders where Qwen2-VL has its vision tokens; pass
  ``full_vocab=True`` to keep all 151936 ids (the placeholders are then
  renamed to the Qwen2-VL special tokens, and the model is ~25 MB).

In every case ``n_vocab`` (rows of ``token_embd``) equals the length of the
written token list. The output projection is tied to ``token_embd``.

Image tokens per image (see :func:`tokens_per_image`): llava 36 (48 px, patch
8), gemma3 16 (64 px, patch 4, pooled 4x4), qwen2vl one per 16x16 block of
the resized image (64x64 -> 16). qwen2vl follows the image resolution like
the real model (up to 4096 tokens), so keep test images small or pass
``--image-max-tokens`` when the context is small.

The chat templates written for llava (vicuna style) and gemma3 are minimal
Jinja templates that llama.cpp's template detection also recognises; qwen2vl
keeps the ChatML template of the Qwen2 vocab file. ``llama-mtmd-cli`` refuses
models without a chat template.

The tokenizer keys are read with a small reader in this module instead of
``gguf.GGUFReader``: the latter needs about 7 s to open the Qwen2 vocab on a
small machine, which would blow the build-time budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vp_gguf.gguf_write import VisionSpec, finish, gguf_module, start_mmproj, tensor_name

FAMILIES = ("llava", "qwen2vl", "gemma3")

ENV_LLAMA_CPP_DIR = "VP_GGUF_LLAMA_CPP_DIR"

# number of ordinary (byte-level BPE) tokens kept from the Qwen2 vocab
QWEN2_KEPT_REGULAR_TOKENS = 16384

# Qwen2-VL's added tokens, in id order starting at 151643
QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN2_FIRST_SPECIAL_ID = 151643

GEMMA3_EXTRA_TOKENS = ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>")

# OpenAI CLIP preprocessing constants (LLaVA-1.5, Qwen2-VL)
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP preprocessing constants (Gemma 3)
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)

_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }}\n"
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_GEMMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = 'user' %}{% endif %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


# --------------------------------------------------------------------------
# the GGUF writer, and the vocab files of the pinned tree
# --------------------------------------------------------------------------


def _is_llama_cpp_root(path: Path) -> bool:
    return (path / "models" / "ggml-vocab-llama-spm.gguf").is_file()


def find_llama_cpp_root() -> Path:
    """The llama.cpp tree whose tokenizer vocab files (models/ggml-vocab-*.gguf) the tiny models use.

    ``$VP_GGUF_LLAMA_CPP_DIR``, else the checkout's ``third_party/llama.cpp``
    (``python3 scripts/fetch_llama_cpp.py`` makes it).
    """
    env = os.environ.get(ENV_LLAMA_CPP_DIR)
    if env:
        root = Path(env).expanduser()
        if not _is_llama_cpp_root(root):
            raise FileNotFoundError(f"{ENV_LLAMA_CPP_DIR}={env!r} is not a llama.cpp tree (no models/ vocab files)")
        return root.resolve()
    root = Path(__file__).resolve().parents[2] / "third_party" / "llama.cpp"
    if _is_llama_cpp_root(root):
        return root
    raise FileNotFoundError(
        f"the tiny test models need the vocab files of the pinned llama.cpp tree: run "
        f"`python3 scripts/fetch_llama_cpp.py` in a vp-gguf checkout, or set {ENV_LLAMA_CPP_DIR}"
    )


# --------------------------------------------------------------------------
# reading tokenizer metadata
# --------------------------------------------------------------------------


@dataclass
class _KV:
    vtype: int  # GGUFValueType
    value: Any  # str / number / list[str] / np.ndarray
    sub_type: int | None = None  # element type for arrays


_NUMPY_TYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}


@functools.lru_cache(maxsize=8)
def _read_gguf_kv(path: str) -> dict[str, _KV]:
    """The key/value metadata of a GGUF file with its value types, read by the gguf package."""
    gguf = gguf_module()
    out: dict[str, _KV] = {}
    for key, f in gguf.GGUFReader(path).fields.items():
        if key.startswith("GGUF."):  # the reader's own view of the header
            continue
        vtype = int(f.types[0])
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = int(f.types[1])
            val = f.contents()
            if sub != gguf.GGUFValueType.STRING:
                arr = np.asarray(val, dtype=_NUMPY_TYPES[sub])
                val = arr.astype(bool) if sub == gguf.GGUFValueType.BOOL else arr
            out[key] = _KV(vtype, val, sub)
        else:
            out[key] = _KV(vtype, f.contents())
    return out


@dataclass
class _Vocab:
    source: str  # vocab GGUF file name
    kv: dict[str, _KV] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return len(self.kv["tokenizer.ggml.tokens"].value)

    def tokens(self) -> list[str]:
        return self.kv["tokenizer.ggml.tokens"].value

    def token_id(self, text: str) -> int:
        return self.tokens().index(text)


def _load_vocab(gguf, root: Path, name: str) -> _Vocab:
    path = root / "models" / name
    kv = _read_gguf_kv(str(path))
    tok_kv = {
        k: _KV(
            v.vtype,
            list(v.value)
            if isinstance(v.value, list)
            else (v.value.copy() if isinstance(v.value, np.ndarray) else v.value),
            v.sub_type,
        )
        for k, v in kv.items()
        if k.startswith("tokenizer.")
    }
    return _Vocab(source=name, kv=tok_kv)


def _append_tokens(gguf, vocab: _Vocab, texts: tuple[str, ...], token_type: int) -> None:
    K = gguf.Keys.Tokenizer
    existing = set(vocab.tokens())
    new = [t for t in texts if t not in existing]
    vocab.kv[K.LIST].value.extend(new)
    if K.SCORES in vocab.kv:
        sc = vocab.kv[K.SCORES]
        sc.value = np.concatenate([sc.value, np.zeros(len(new), dtype=sc.value.dtype)])
    if K.TOKEN_TYPE in vocab.kv:
        tt = vocab.kv[K.TOKEN_TYPE]
        tt.value = np.concatenate([tt.value, np.full(len(new), token_type, dtype=tt.value.dtype)])


def _vocab_llava(gguf, root: Path) -> _Vocab:
    vocab = _load_vocab(gguf, root, "ggml-vocab-llama-spm.gguf")
    vocab.kv.setdefault(gguf.Keys.Tokenizer.CHAT_TEMPLATE, _KV(gguf.GGUFValueType.STRING, _LLAVA_CHAT_TEMPLATE))
    return vocab


def _vocab_gemma3(gguf, root: Path) -> _Vocab:
    K = gguf.Keys.Tokenizer
    vocab = _load_vocab(gguf, root, "ggml-vocab-llama-spm.gguf")
    _append_tokens(gguf, vocab, GEMMA3_EXTRA_TOKENS, int(gguf.TokenType.CONTROL))
    vocab.kv[K.EOT_ID] = _KV(gguf.GGUFValueType.UINT32, vocab.token_id("<end_of_turn>"))
    vocab.kv[K.CHAT_TEMPLATE] = _KV(gguf.GGUFValueType.STRING, _GEMMA3_CHAT_TEMPLATE)
    return vocab


def _vocab_qwen2vl(gguf, root: Path, full_vocab: bool) -> _Vocab:
    K = gguf.Keys.Tokenizer
    T = gguf.TokenType
    vocab = _load_vocab(gguf, root, "ggml-vocab-qwen2.gguf")
    tokens = vocab.tokens()
    types = vocab.kv[K.TOKEN_TYPE].value

    if full_vocab:
        # rename the [PADnnnnnn] placeholders to the Qwen2-VL added tokens
        for i, text in enumerate(QWEN2VL_SPECIAL_TOKENS):
            tid = _QWEN2_FIRST_SPECIAL_ID + i
            if tokens[tid] != text:
                if not tokens[tid].startswith("[PAD"):
                    raise ValueError(f"unexpected token {tokens[tid]!r} at id {tid} in the Qwen2 vocab")
                tokens[tid] = text
            types[tid] = int(T.CONTROL)
        return vocab

    n_keep = QWEN2_KEPT_REGULAR_TOKENS
    if not np.all(types[:n_keep] == int(T.NORMAL)):
        raise ValueError("Qwen2 vocab: the kept prefix contains non-normal tokens")
    kept = tokens[:n_keep]
    kept_set = set(kept)
    merges = []
    for m in vocab.kv[K.MERGES].value:
        a, _, b = m.partition(" ")
        if a in kept_set and b in kept_set and (a + b) in kept_set:
            merges.append(m)
    old_ids = {t: i for i, t in enumerate(tokens[_QWEN2_FIRST_SPECIAL_ID:], _QWEN2_FIRST_SPECIAL_ID)}

    new_tokens = kept + list(QWEN2VL_SPECIAL_TOKENS)
    new_types = np.concatenate(
        [types[:n_keep], np.full(len(QWEN2VL_SPECIAL_TOKENS), int(T.CONTROL), dtype=types.dtype)]
    )
    vocab.kv[K.LIST].value = new_tokens
    vocab.kv[K.TOKEN_TYPE].value = new_types
    vocab.kv[K.MERGES].value = merges
    # remap special-token ids by their text
    new_index = {t: i for i, t in enumerate(new_tokens)}
    for key in (K.BOS_ID, K.EOS_ID, K.PAD_ID, K.UNK_ID, K.EOT_ID, K.EOM_ID, K.SEP_ID, K.MASK_ID):
        if key in vocab.kv:
            old = int(vocab.kv[key].value)
            found = next((t for t, i in old_ids.items() if i == old), None)
            if found is None or found not in new_index:
                raise ValueError(f"cannot remap {key}={old} into the cut-down Qwen2 vocab")
            vocab.kv[key].value = new_index[found]
    return vocab


# --------------------------------------------------------------------------
# family specifications
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextSpec:
    arch: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_ctx_train: int
    rope_freq_base: float
    rms_eps: float
    head_dim: int | None = None  # explicit key/value length (gemma3)
    rope_sections: tuple[int, ...] | None = None  # qwen2vl M-RoPE
    sliding_window: int | None = None  # gemma3
    rope_freq_base_swa: float | None = None
    qkv_bias: bool = False


_SPECS: dict[str, tuple[_TextSpec, VisionSpec]] = {
    # 32000-token vocab: n_embd 48 keeps token_embd (F16, tied) at ~3 MB
    "llava": (
        # head_dim 32: a multiple of Q8_0's block, so quantized KV caches can be tested
        _TextSpec(
            arch="llama",
            n_embd=48,
            n_layer=4,
            n_head=4,
            n_head_kv=2,
            n_ff=128,
            n_ctx_train=2048,
            rope_freq_base=10000.0,
            rms_eps=1e-5,
            head_dim=32,
        ),
        VisionSpec(
            projector="mlp",
            image_size=48,
            patch_size=8,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_ff=128,
            eps=1e-5,
            mean=_CLIP_MEAN,
            std=_CLIP_STD,
        ),
    ),
    "qwen2vl": (
        _TextSpec(
            arch="qwen2vl",
            n_embd=64,
            n_layer=4,
            n_head=2,
            n_head_kv=1,
            n_ff=128,
            n_ctx_train=4096,
            rope_freq_base=1000000.0,
            rms_eps=1e-6,
            rope_sections=(4, 6, 6, 0),
            qkv_bias=True,
        ),  # its loader takes head_dim = n_embd/n_head
        VisionSpec(
            projector="qwen2vl_merger",
            image_size=64,
            patch_size=8,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_ff=128,
            eps=1e-6,
            mean=_CLIP_MEAN,
            std=_CLIP_STD,
            spatial_merge=2,
        ),
    ),
    "gemma3": (
        _TextSpec(
            arch="gemma3",
            n_embd=48,
            n_layer=12,
            n_head=4,
            n_head_kv=2,
            n_ff=128,
            n_ctx_train=2048,
            rope_freq_base=1000000.0,
            rms_eps=1e-6,
            head_dim=32,
            sliding_window=16,
            rope_freq_base_swa=10000.0,
        ),
        VisionSpec(
            projector="gemma3",
            image_size=64,
            patch_size=4,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_ff=128,
            eps=1e-6,
            mean=_SIGLIP_MEAN,
            std=_SIGLIP_STD,
            use_gelu=True,
            tokens_per_image=16,
        ),
    ),
}

_FAMILY_SEED_OFFSET = {"llava": 101, "qwen2vl": 202, "gemma3": 303}

# standard deviations of the normal weight init
_INIT_STD = {
    "tok_embd": 0.02,
    "attn_qk": 0.3,
    "attn_vo": 0.15,
    "qk_norm_gain": 3.0,  # gemma3: Q/K are RMS-normed per head, so this sets attention sharpness
    "ffn": 0.1,
    "v_patch": 0.1,
    "v_pos": 0.1,
    "v_attn": 0.08,
    "v_ffn": 0.08,
    "mm": 0.1,
}


def tokens_per_image(
    family: str, width: int | None = None, height: int | None = None, max_tokens: int | None = None
) -> int:
    """Number of embeddings one image becomes in llama.cpp (marker tokens excluded).

    llava and gemma3 resize every image to a fixed square, so the size does not
    matter. qwen2vl keeps the aspect ratio: the image is resized to multiples of
    ``patch_size * 2`` (16 px) within the default 8..4096-token budget (or
    ``max_tokens``, like ``--image-max-tokens``), one token per 16x16 block.
    A 64x64 image gives 16 tokens; a 640x480 one gives 1200, more than a
    512-token context holds (llama.cpp then aborts in mtmd_helper_decode_image_chunk).
    """
    _, v = _SPECS[family]
    if family == "llava":
        return (v.image_size // v.patch_size) ** 2
    if family == "gemma3":
        return v.image_tokens
    if width is None or height is None:
        width = height = v.image_size
    unit = v.patch_size * v.merge
    min_px = 8 * unit * unit
    max_px = (max_tokens or 4096) * unit * unit
    w_bar = max(unit, round(width / unit) * unit)
    h_bar = max(unit, round(height / unit) * unit)
    if w_bar * h_bar > max_px:
        beta = ((width * height) / max_px) ** 0.5
        w_bar = max(unit, int(width / beta // unit) * unit)
        h_bar = max(unit, int(height / beta // unit) * unit)
    elif w_bar * h_bar < min_px:
        beta = (min_px / (width * height)) ** 0.5
        w_bar = -(-int(np.ceil(width * beta)) // unit) * unit
        h_bar = -(-int(np.ceil(height * beta)) // unit) * unit
    return (w_bar // unit) * (h_bar // unit)


# --------------------------------------------------------------------------
# weight helpers
# --------------------------------------------------------------------------


class _Weights:
    """Seeded weight factory; ggml shapes are numpy shapes reversed."""

    def __init__(self, seed: int, mat_dtype):
        self.rng = np.random.default_rng(seed)
        self.mat_dtype = mat_dtype

    def normal(self, shape, std: float, dtype=None) -> np.ndarray:
        a = self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
        return a.astype(dtype or self.mat_dtype)

    def norm(self, n: int, jitter: float = 0.05) -> np.ndarray:
        return (1.0 + self.rng.standard_normal(n, dtype=np.float32) * np.float32(jitter)).astype(np.float32)

    def bias(self, n: int, std: float = 0.02) -> np.ndarray:
        return (self.rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float32)


# --------------------------------------------------------------------------
# text model
# --------------------------------------------------------------------------


def text_model_writer(gguf, path: Path, name: str, description: str, file_type: int, t: _TextSpec, vocab: _Vocab):
    """A GGUFWriter with the text model's hyperparameters and tokenizer written (tensors to add)."""
    head_dim = t.head_dim or t.n_embd // t.n_head
    writer = gguf.GGUFWriter(str(path), t.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_description(description)
    writer.add_file_type(file_type)
    writer.add_vocab_size(vocab.n_tokens)
    writer.add_context_length(t.n_ctx_train)
    writer.add_embedding_length(t.n_embd)
    writer.add_block_count(t.n_layer)
    writer.add_feed_forward_length(t.n_ff)
    writer.add_head_count(t.n_head)
    writer.add_head_count_kv(t.n_head_kv)
    writer.add_layer_norm_rms_eps(t.rms_eps)
    writer.add_rope_freq_base(t.rope_freq_base)
    writer.add_rope_dimension_count(head_dim)
    if t.head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if t.rope_sections is not None:
        writer.add_rope_dimension_sections(list(t.rope_sections))
    if t.sliding_window is not None:
        writer.add_sliding_window(t.sliding_window)
    if t.rope_freq_base_swa is not None:
        writer.add_rope_freq_base_swa(t.rope_freq_base_swa)

    for key, kv in vocab.kv.items():
        writer.add_key_value(
            key,
            kv.value.tolist() if isinstance(kv.value, np.ndarray) else kv.value,
            gguf.GGUFValueType(kv.vtype),
            None if kv.sub_type is None else gguf.GGUFValueType(kv.sub_type),
        )
    return writer


def _write_text_model(gguf, path: Path, family: str, t: _TextSpec, vocab: _Vocab, seed: int) -> None:
    MT = gguf.MODEL_TENSOR
    w = _Weights(seed, np.float16)
    S = _INIT_STD
    n_vocab = vocab.n_tokens
    head_dim = t.head_dim or t.n_embd // t.n_head
    n_q = head_dim * t.n_head
    n_kv = head_dim * t.n_head_kv
    writer = text_model_writer(
        gguf,
        path,
        f"vp-gguf tiny {family}",
        f"random-weight test model ({family}), seed {seed}; vocab from {vocab.source}",
        int(gguf.LlamaFileType.MOSTLY_F16),
        t,
        vocab,
    )

    # small token embeddings: the residual stream at the last position is then
    # dominated by attention/FFN outputs, so the (tied) logits depend on context
    writer.add_tensor(tensor_name(gguf, MT.TOKEN_EMBD), w.normal((n_vocab, t.n_embd), S["tok_embd"]))
    writer.add_tensor(tensor_name(gguf, MT.OUTPUT_NORM), w.norm(t.n_embd))
    for i in range(t.n_layer):
        writer.add_tensor(tensor_name(gguf, MT.ATTN_NORM, i), w.norm(t.n_embd))
        # weak Q/K (nearly uniform attention over text and image positions), strong V/O
        writer.add_tensor(tensor_name(gguf, MT.ATTN_Q, i), w.normal((n_q, t.n_embd), S["attn_qk"]))
        writer.add_tensor(tensor_name(gguf, MT.ATTN_K, i), w.normal((n_kv, t.n_embd), S["attn_qk"]))
        writer.add_tensor(tensor_name(gguf, MT.ATTN_V, i), w.normal((n_kv, t.n_embd), S["attn_vo"]))
        if t.qkv_bias:
            writer.add_tensor(tensor_name(gguf, MT.ATTN_Q, i, "bias"), w.bias(n_q))
            writer.add_tensor(tensor_name(gguf, MT.ATTN_K, i, "bias"), w.bias(n_kv))
            writer.add_tensor(tensor_name(gguf, MT.ATTN_V, i, "bias"), w.bias(n_kv))
        writer.add_tensor(tensor_name(gguf, MT.ATTN_OUT, i), w.normal((t.n_embd, n_q), S["attn_vo"]))
        if t.arch == "gemma3":
            writer.add_tensor(tensor_name(gguf, MT.ATTN_Q_NORM, i), w.norm(head_dim) * np.float32(S["qk_norm_gain"]))
            writer.add_tensor(tensor_name(gguf, MT.ATTN_K_NORM, i), w.norm(head_dim) * np.float32(S["qk_norm_gain"]))
            writer.add_tensor(tensor_name(gguf, MT.ATTN_POST_NORM, i), w.norm(t.n_embd))
            writer.add_tensor(tensor_name(gguf, MT.FFN_PRE_NORM, i), w.norm(t.n_embd))
            writer.add_tensor(tensor_name(gguf, MT.FFN_POST_NORM, i), w.norm(t.n_embd))
        else:
            writer.add_tensor(tensor_name(gguf, MT.FFN_NORM, i), w.norm(t.n_embd))
        writer.add_tensor(tensor_name(gguf, MT.FFN_GATE, i), w.normal((t.n_ff, t.n_embd), S["ffn"]))
        writer.add_tensor(tensor_name(gguf, MT.FFN_UP, i), w.normal((t.n_ff, t.n_embd), S["ffn"]))
        writer.add_tensor(tensor_name(gguf, MT.FFN_DOWN, i), w.normal((t.n_embd, t.n_ff), S["ffn"]))

    finish(writer)


# --------------------------------------------------------------------------
# mmproj
# --------------------------------------------------------------------------


def _write_mmproj(gguf, path: Path, family: str, v: VisionSpec, n_embd_text: int, seed: int) -> None:
    MT = gguf.MODEL_TENSOR
    w = _Weights(seed, np.float32)
    S = _INIT_STD
    d = v.n_embd
    n_side = v.image_size // v.patch_size
    n_patches = n_side * n_side

    # clip.cpp treats ffn_up/ffn_down as swapped when ffn_down's input width
    # equals n_embd, so n_ff must differ from n_embd
    assert v.n_ff != v.n_embd
    if v.projector == "qwen2vl_merger":
        assert v.image_size % (v.patch_size * v.merge) == 0
        assert (d // v.n_head) % 4 == 0, "qwen2vl vision M-RoPE needs head_dim % 4 == 0"
    if v.projector == "gemma3":
        per_side = round(v.image_tokens**0.5)
        assert per_side * per_side == v.tokens_per_image and n_side % per_side == 0

    writer = start_mmproj(
        gguf,
        path,
        f"vp-gguf tiny {family} mmproj",
        f"random-weight test projector ({family}), seed {seed}",
        v,
        n_embd_text,
    )
    if v.use_gelu:
        writer.add_vision_use_gelu(True)
    if v.projector == "gemma3":
        scale = n_side // round(v.image_tokens**0.5)
        if scale != 4:  # 4 is clip.cpp's default, written only when different (like the converter)
            writer.add_vision_projector_scale_factor(scale)
    if v.projector == "qwen2vl_merger" and v.spatial_merge != 2:
        writer.add_vision_spatial_merge_size(v.spatial_merge)

    # patch embedding conv: ggml [kw, kh, 3, d] -> numpy (d, 3, kh, kw)
    conv_shape = (d, 3, v.patch_size, v.patch_size)
    writer.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_PATCH), w.normal(conv_shape, S["v_patch"]))
    if v.projector == "qwen2vl_merger":
        # second temporal slice of the Conv3d kernel
        writer.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_PATCH) + ".1", w.normal(conv_shape, S["v_patch"]))
    else:
        if v.projector == "gemma3":
            writer.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_PATCH, suffix="bias"), w.bias(d))
        n_pos = n_patches + (1 if v.projector == "mlp" else 0)
        if v.projector == "mlp":
            writer.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_CLS, suffix=None), w.normal((d,), S["v_pos"]))
        writer.add_tensor(tensor_name(gguf, MT.V_ENC_EMBD_POS), w.normal((n_pos, d), S["v_pos"]))

    if v.projector == "mlp":  # CLIP pre-layernorm
        writer.add_tensor(tensor_name(gguf, MT.V_PRE_NORM), w.norm(d))
        writer.add_tensor(tensor_name(gguf, MT.V_PRE_NORM, suffix="bias"), w.bias(d))

    for i in range(v.n_layer):
        for tensor in (MT.V_ENC_INPUT_NORM, MT.V_ENC_POST_ATTN_NORM):
            writer.add_tensor(tensor_name(gguf, tensor, i), w.norm(d))
            writer.add_tensor(tensor_name(gguf, tensor, i, "bias"), w.bias(d))
        for tensor in (MT.V_ENC_ATTN_Q, MT.V_ENC_ATTN_K, MT.V_ENC_ATTN_V, MT.V_ENC_ATTN_O):
            writer.add_tensor(tensor_name(gguf, tensor, i), w.normal((d, d), S["v_attn"]))
            writer.add_tensor(tensor_name(gguf, tensor, i, "bias"), w.bias(d))
        writer.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_UP, i), w.normal((v.n_ff, d), S["v_ffn"]))
        writer.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_UP, i, "bias"), w.bias(v.n_ff))
        writer.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_DOWN, i), w.normal((d, v.n_ff), S["v_ffn"]))
        writer.add_tensor(tensor_name(gguf, MT.V_ENC_FFN_DOWN, i, "bias"), w.bias(d))

    if v.projector in ("gemma3", "qwen2vl_merger"):
        # SigLIP post_layernorm / Qwen2-VL merger ln_q
        writer.add_tensor(tensor_name(gguf, MT.V_POST_NORM), w.norm(d))
        writer.add_tensor(tensor_name(gguf, MT.V_POST_NORM, suffix="bias"), w.bias(d))

    if v.projector == "mlp":
        hidden = n_embd_text
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 0), w.normal((hidden, d), S["mm"]))
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 0, "bias"), w.bias(hidden))
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 2), w.normal((n_embd_text, hidden), S["mm"]))
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 2, "bias"), w.bias(n_embd_text))
    elif v.projector == "qwen2vl_merger":
        merged = d * v.merge * v.merge
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 0), w.normal((merged, merged), S["mm"]))
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 0, "bias"), w.bias(merged))
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 2), w.normal((n_embd_text, merged), S["mm"]))
        writer.add_tensor(tensor_name(gguf, MT.V_MMPROJ, 2, "bias"), w.bias(n_embd_text))
    elif v.projector == "gemma3":
        # used as transpose(W): ggml [n_embd_text, d] -> numpy (d, n_embd_text)
        writer.add_tensor(tensor_name(gguf, MT.V_MM_INP_PROJ), w.normal((d, n_embd_text), S["mm"]))
        writer.add_tensor(tensor_name(gguf, MT.V_MM_SOFT_EMB_NORM), w.norm(d))
    else:  # pragma: no cover
        raise AssertionError(v.projector)

    finish(writer)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def build_tiny_vlm(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    llama_cpp_root: str | Path | None = None,
    full_vocab: bool = False,
    n_layer: int | None = None,
) -> tuple[Path, Path]:
    """Write ``<family>-tiny.gguf`` and ``<family>-tiny-mmproj.gguf`` into ``out_dir``.

    Returns ``(model_path, mmproj_path)``. ``seed`` selects the random weights
    (same seed, same bytes). ``llama_cpp_root`` overrides
    :func:`find_llama_cpp_root`. ``full_vocab`` only matters for qwen2vl (see
    the module docstring). ``n_layer`` overrides the text model's depth (the default-anchor tests).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    root = Path(llama_cpp_root).resolve() if llama_cpp_root is not None else find_llama_cpp_root()
    if not _is_llama_cpp_root(root):
        raise FileNotFoundError(f"{root} is not a llama.cpp tree (no models/ vocab files)")
    gguf = gguf_module()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / f"{family}-tiny.gguf"
    mmproj_path = out / f"{family}-tiny-mmproj.gguf"

    text_spec, vision_spec = _SPECS[family]
    if n_layer is not None:
        text_spec = dataclasses.replace(text_spec, n_layer=n_layer)
    if family == "llava":
        vocab = _vocab_llava(gguf, root)
    elif family == "qwen2vl":
        vocab = _vocab_qwen2vl(gguf, root, full_vocab)
    else:
        vocab = _vocab_gemma3(gguf, root)

    base_seed = (int(seed) * 1000 + _FAMILY_SEED_OFFSET[family]) & 0xFFFFFFFF
    _write_text_model(gguf, model_path, family, text_spec, vocab, base_seed)
    _write_mmproj(gguf, mmproj_path, family, vision_spec, text_spec.n_embd, base_seed + 1)
    return model_path, mmproj_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python tests/support/tiny_vlm.py",
        description="Write tiny random-weight VLM GGUF pairs (model + mmproj).",
    )
    ap.add_argument("--family", choices=FAMILIES + ("all",), default="all")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--llama-cpp-dir", default=None, help=f"llama.cpp tree (default: ${ENV_LLAMA_CPP_DIR}, ...)")
    ap.add_argument("--full-vocab", action="store_true", help="qwen2vl: keep the full 151936-token Qwen2 vocab")
    args = ap.parse_args(argv)

    families = FAMILIES if args.family == "all" else (args.family,)
    for fam in families:
        model, mmproj = build_tiny_vlm(
            fam, args.out, args.seed, llama_cpp_root=args.llama_cpp_dir, full_vocab=args.full_vocab
        )
        print(f"{fam}: {model} ({model.stat().st_size} bytes) {mmproj} ({mmproj.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
