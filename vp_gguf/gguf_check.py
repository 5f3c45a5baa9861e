"""GGUF metadata checked against what llama.cpp's loaders assert or dereference.

llama.cpp checks some hyper-parameters with GGML_ASSERT (an abort), leaves tensors that its
graph builders need optional at load (a NULL dereference when the graph is built), and lets ops
meet tensor types they do not support (an abort at compute). A crafted or damaged file can
therefore crash the process. These checks run on the parsed header (gguf_file.GGUFInfo) before
any C loader sees the file, and turn each such case into a ModelFileError naming the file and the
key or tensor. They only refuse what llama.cpp could not run: real converted models pass.

The rules come from the pinned tree: src/llama-model.cpp (load_hparams, its asserts),
src/llama-hparams.h (LLAMA_MAX_LAYERS), tools/mtmd/clip.cpp (load_hparams, load_tensors,
clip_n_mmproj_embd, build_vit/build_inp/build_norm/build_ffn) and the graph builders of the
projectors our models use (tools/mtmd/models/llava.cpp, qwen2vl.cpp, siglip.cpp).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from .errors import ModelFileError
from .gguf_file import _GGML_TYPE_SIZE, GGUFInfo, GGUFTensorInfo

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h): more is a GGML_ASSERT at load
MAX_VISION_LAYERS = 1024  # no real vision tower comes near this; more is a crafted file
MAX_DIM = 1 << 20  # embedding widths, head counts, ...: beyond any real model
MAX_IMAGE_SIZE = 8192  # clip.cpp's own cap on image_size

F32, F16, BF16 = 0, 1, 30
_FLOATS = {F32, F16, BF16}
_INTEGER_TYPES = {24, 25, 26, 27, 28}  # I8, I16, I32, I64, F64: no matrix product computes with them
_BLK = re.compile(r"^blk\.(\d+)\.")
_V_BLK = re.compile(r"^v\.blk\.(\d+)\.")

# projectors whose graph builders we follow tensor by tensor (the ones our models use)
_KNOWN_PROJECTORS = {"mlp", "qwen2vl_merger", "gemma3"}


def _shown(text: str) -> str:
    """A name from the file, shortened and quoted so that a crafted one cannot flood a message."""
    return repr(text[:60] + ("..." if len(text) > 60 else ""))


class _Checker:
    """Helpers that read typed values from one file's metadata and fail with its path."""

    def __init__(self, info: GGUFInfo, what: str) -> None:
        self.info, self.what = info, what

    def fail(self, problem: str) -> None:
        raise ModelFileError(
            f"{self.info.path}: {problem}; llama.cpp cannot run this {self.what} (the file is damaged or "
            "was written wrongly): use a file from a working converter or download it again"
        )

    def int_value(self, key: str, lo: int, hi: int, required: bool = True, value: Any = None) -> int | None:
        v = self.info.get(key) if value is None else value
        if v is None:
            if required:
                self.fail(f"metadata key {key} is missing")
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"metadata key {key} must be an integer")
        if not lo <= v <= hi:
            self.fail(f"metadata key {key} is {v}, outside {lo}..{hi}")
        return int(v)

    def per_layer(self, key: str, n_layer: int, lo: int, hi: int, required: bool = True) -> list[int] | None:
        """A key that llama.cpp reads with get_key_or_arr: one integer, or one per layer."""
        v = self.info.get(key)
        if isinstance(v, list):
            if len(v) != n_layer:
                self.fail(f"metadata key {key} has {len(v)} entries for {n_layer} layers")
            return [self.int_value(key, lo, hi, value=x) or 0 for x in v]
        one = self.int_value(key, lo, hi, required)
        return None if one is None else [one] * n_layer

    def float_value(self, key: str, lo: float, required: bool = False) -> float | None:
        v = self.info.get(key)
        if v is None:
            if required:
                self.fail(f"metadata key {key} is missing")
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
            self.fail(f"metadata key {key} must be a finite number >= {lo}")
        return float(v)

    def tensor(self, name: str, required: bool = True) -> GGUFTensorInfo | None:
        t = self.info.tensors.get(name)
        if t is None and required:
            self.fail(f"tensor {name} is missing")
        return t

    def shape(self, t: GGUFTensorInfo | None, *want: int) -> None:
        """ggml order (ne[0] first); trailing dimensions of 1 are the same shape to ggml."""
        if t is None:
            return
        got = tuple(t.shape) + (1,) * (len(want) - len(t.shape))
        want_full = tuple(want) + (1,) * (len(got) - len(want))
        if got != want_full:
            self.fail(f"tensor {_shown(t.name)} has shape {list(t.shape)}, expected {list(want)}")

    def types(self, t: GGUFTensorInfo | None, allowed: set[int], why: str) -> None:
        if t is not None and t.ggml_type not in allowed:
            self.fail(f"tensor {_shown(t.name)} has ggml type {t.ggml_type}; {why}")


def _check_tensor_table(c: _Checker, vector_types: set[int]) -> None:
    """Names, dimensions and types every tensor must have, whatever uses it."""
    for t in c.info.tensors.values():
        if not t.name:
            c.fail("a tensor has an empty name")
        n = 1
        for d in t.shape:
            if d < 1:
                c.fail(f"tensor {_shown(t.name)} has an empty dimension ({list(t.shape)})")
            n *= d
        if n >= 1 << 62:
            c.fail(f"tensor {_shown(t.name)} is impossibly large ({list(t.shape)})")
        bs = _GGML_TYPE_SIZE.get(t.ggml_type)
        if bs is None:
            c.fail(f"tensor {_shown(t.name)} has unknown ggml type {t.ggml_type}")
            return
        if t.shape and t.shape[0] % bs[0]:
            c.fail(f"tensor {_shown(t.name)}: its rows ({t.shape[0]}) are not whole blocks of ggml type {t.ggml_type}")
        if t.ggml_type in _INTEGER_TYPES:
            c.fail(f"tensor {_shown(t.name)} has integer ggml type {t.ggml_type}, not a weight type")
        # norms and biases meet activations in ggml_mul/ggml_add, which take F32 on that side
        if len([d for d in t.shape if d > 1]) <= 1:
            c.types(t, vector_types, "a vector (norm, bias, embedding) must be F32")


# --------------------------------------------------------------------------
# the language model (src/llama-model.cpp)
# --------------------------------------------------------------------------


def check_language_model(info: GGUFInfo) -> None:
    """Refuse a language-model GGUF whose hyper-parameters or tensors llama.cpp would crash on."""
    c = _Checker(info, "language model")
    arch = info.architecture
    if not isinstance(arch, str) or not arch:
        c.fail("metadata key general.architecture is missing")
        return
    _check_tensor_table(c, {F32})
    _check_vocab(c)
    n_layer = c.int_value(f"{arch}.block_count", 1, MAX_LAYERS) or 0
    _check_layer_tensors(c, n_layer)
    n_embd = c.int_value(f"{arch}.embedding_length", 1, MAX_DIM) or 0
    c.int_value(f"{arch}.context_length", 1, 1 << 31, required=False)
    c.per_layer(f"{arch}.feed_forward_length", n_layer, 0, MAX_DIM, required=False)
    heads = c.per_layer(f"{arch}.attention.head_count", n_layer, 0, MAX_DIM)
    assert heads is not None
    if not any(heads):  # a vision-language model attends; llama.cpp would build no attention at all
        c.fail(f"metadata key {arch}.attention.head_count is 0")
    kv_heads = c.per_layer(f"{arch}.attention.head_count_kv", n_layer, 0, MAX_DIM, required=False) or heads
    for il, (h, hkv) in enumerate(zip(heads, kv_heads)):
        if h and (hkv == 0 or hkv > h or h % hkv):
            c.fail(f"metadata key {arch}.attention.head_count_kv ({hkv}) must divide head_count ({h}) (layer {il})")
    _check_head_dims(c, arch, n_embd, next(h for h in heads if h))
    for key in (f"{arch}.attention.layer_norm_rms_epsilon", f"{arch}.attention.layer_norm_epsilon"):
        c.float_value(key, 0.0)
    c.float_value(f"{arch}.rope.freq_base", 0.0)
    c.int_value(f"{arch}.attention.sliding_window", 1, 1 << 31, required=False)
    # read into the llama_ftype enum when the loader prints the model's info (undefined beyond its range)
    c.int_value("general.file_type", 0, 1024, required=False)


def _check_vocab(c: _Checker) -> None:
    """llama-vocab.cpp asserts that no two tokens have the same text."""
    tokens = c.info.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        c.fail("metadata key tokenizer.ggml.tokens must be a list of strings")
    # texts that are not UTF-8 were read with replacement characters: they cannot be compared here
    comparable = [t for t in tokens if "\ufffd" not in t]
    if len(set(comparable)) != len(comparable):
        c.fail("metadata key tokenizer.ggml.tokens lists the same token text twice")


def _check_layer_tensors(c: _Checker, n_layer: int) -> None:
    """blk.N tensors exist for every layer the header counts, and for no other."""
    seen = {int(m.group(1)) for name in c.info.tensors if (m := _BLK.match(name))}
    extra = [i for i in seen if i >= n_layer]
    if extra:
        c.fail(f"tensors of layer {min(extra)} exist but block_count is {n_layer}")
    missing = [i for i in range(n_layer) if i not in seen]
    if missing:
        c.fail(f"block_count is {n_layer} but layer {missing[0]} has no tensors")


def _check_head_dims(c: _Checker, arch: str, n_embd: int, n_head: int) -> None:
    key_len = c.int_value(f"{arch}.attention.key_length", 1, MAX_DIM, required=False)
    c.int_value(f"{arch}.attention.value_length", 1, MAX_DIM, required=False)
    if key_len is None:
        if n_embd % n_head:
            c.fail(f"{arch}.attention.head_count ({n_head}) does not divide embedding_length ({n_embd})")
        key_len = n_embd // n_head
    n_rot = c.int_value(f"{arch}.rope.dimension_count", 0, MAX_DIM, required=False)
    if n_rot is not None and (n_rot == 0 or n_rot > key_len or n_rot % 2):
        c.fail(
            f"metadata key {arch}.rope.dimension_count is {n_rot}: it must be even, > 0 and <= the head size {key_len}"
        )
    sections = c.info.get(f"{arch}.rope.dimension_sections")
    if sections is not None:
        # M-RoPE picks each pair's section modulo their sum (a division by zero when it is 0)
        key = f"{arch}.rope.dimension_sections"
        if not isinstance(sections, list) or not sections:
            c.fail(f"metadata key {key} must be a list of integers")
        vals = [c.int_value(key, 0, MAX_DIM, value=s) or 0 for s in sections]
        half = (n_rot or key_len) // 2
        if not 0 < sum(vals) <= half:
            c.fail(f"metadata key {key} sums to {sum(vals)}: it must be > 0 and <= half the rope dimensions ({half})")


# --------------------------------------------------------------------------
# the projector (tools/mtmd/clip.cpp)
# --------------------------------------------------------------------------


def check_projector(info: GGUFInfo) -> None:
    """Refuse an mmproj GGUF whose hyper-parameters or tensors libmtmd would crash on."""
    c = _Checker(info, "projector")
    proj = info.get("clip.projector_type") or info.get("clip.vision.projector_type")
    if not isinstance(proj, str) or not proj:
        c.fail("metadata key clip.projector_type is missing")
        return
    _check_tensor_table(c, {F32})
    known = proj in _KNOWN_PROJECTORS
    v = "clip.vision."
    n_embd = c.int_value(v + "embedding_length", 1, MAX_DIM) or 0
    n_head = c.int_value(v + "attention.head_count", 1, MAX_DIM) or 0
    head_dim = c.int_value(v + "attention.head_dim", 1, MAX_DIM, required=False)
    if head_dim is None and n_embd % n_head:
        c.fail(f"metadata key {v}attention.head_count ({n_head}) does not divide embedding_length ({n_embd})")
    n_layer = c.int_value(v + "block_count", 1 if known else 0, MAX_VISION_LAYERS) or 0
    # projection_dim: clip.cpp requires the key itself (a clean error); our caller compares it with the model
    c.int_value(v + "projection_dim", 1 if known else 0, MAX_DIM, required=False)
    c.float_value(v + "attention.layer_norm_epsilon", 0.0)
    image_size = c.int_value(v + "image_size", 1 if known else 0, MAX_IMAGE_SIZE) or 0
    patch = c.int_value(v + "patch_size", 1, max(image_size, 1) if known else 65535) or 1
    _check_normalisation(c)
    if not known:
        return  # other projectors: the generic checks only
    n_head_kv = c.int_value(v + "attention.head_count_kv", n_head, n_head, required=False)
    del n_head_kv  # llava and qwen2vl reshape K and V with head_count: the two must agree
    d_head = head_dim or n_embd // n_head
    if image_size % patch and proj != "qwen2vl_merger":  # fixed-size projectors: a square grid of patches
        c.fail(f"{v}image_size ({image_size}) is not a multiple of patch_size ({patch})")
    side = image_size // patch
    _check_patch_embedding(c, proj, n_embd, patch)
    for il in range(n_layer):
        _check_vision_layer(c, proj, il, n_embd, n_head * d_head)
    BUILDERS[proj](c, n_embd, side, d_head)


def _check_normalisation(c: _Checker) -> None:
    """image_mean / image_std: three finite numbers each; a zero std makes every pixel inf or nan."""
    for key in ("clip.vision.image_mean", "clip.vision.image_std"):
        vals = c.info.get(key)
        if not isinstance(vals, list) or len(vals) < 3:
            c.fail(f"metadata key {key} must list 3 numbers (one per colour channel)")
            return
        for x in vals[:3]:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                c.fail(f"metadata key {key} must hold finite numbers")
            if key.endswith("std") and x <= 0:
                c.fail(f"metadata key {key} has {x}: a standard deviation must be positive")


def _check_patch_embedding(c: _Checker, proj: str, n_embd: int, patch: int) -> None:
    names = ["v.patch_embd.weight"] + (["v.patch_embd.weight.1"] if proj == "qwen2vl_merger" else [])
    for name in names:
        t = c.tensor(name)
        c.shape(t, patch, patch, 3, n_embd)
        c.types(t, {F32, F16}, "the patch-embedding convolution (im2col) takes F32 or F16")
    bias = c.tensor("v.patch_embd.bias", required=False)
    if proj == "qwen2vl_merger":
        for name in ("v.patch_embd.bias", "v.class_embd"):
            if name in c.info.tensors:  # clip_graph_qwen2vl::build asserts their absence
                c.fail(f"tensor {name} is not part of a qwen2vl_merger projector")
    c.shape(bias, n_embd)
    c.shape(c.tensor("v.class_embd", required=False), n_embd)
    for name in ("v.pre_ln", "v.post_ln"):
        c.shape(c.tensor(name + ".weight", required=False), n_embd)
        c.shape(c.tensor(name + ".bias", required=False), n_embd)


def _check_vision_layer(c: _Checker, proj: str, il: int, n_embd: int, n_qkv: int) -> None:
    """One block of the ViT as build_vit / clip_graph_llava / clip_graph_qwen2vl use it."""
    p = f"v.blk.{il}."
    shapes = {
        "attn_q": (n_embd, n_qkv),
        "attn_k": (n_embd, n_qkv),
        "attn_v": (n_embd, n_qkv),
        "attn_out": (n_qkv, n_embd),
    }
    for name, (n_in, n_out) in shapes.items():
        c.shape(c.tensor(p + name + ".weight"), n_in, n_out)
        # qwen2vl adds the q/k/v biases unconditionally
        bias_needed = proj == "qwen2vl_merger" and name != "attn_out"
        c.shape(c.tensor(p + name + ".bias", required=bias_needed), n_out)
    for name in ("ln1", "ln2"):
        c.shape(c.tensor(p + name + ".weight", required=False), n_embd)
        c.shape(c.tensor(p + name + ".bias", required=False), n_embd)
    up, down = c.tensor(p + "ffn_up.weight"), c.tensor(p + "ffn_down.weight")
    up_b, down_b = c.tensor(p + "ffn_up.bias", required=False), c.tensor(p + "ffn_down.bias", required=False)
    assert up is not None and down is not None
    if len(up.shape) != 2 or len(down.shape) != 2:
        c.fail(f"tensors {p}ffn_up/ffn_down must be matrices")
    if down.shape[0] == n_embd:  # clip.cpp takes these for old files with up and down swapped
        up, down, up_b, down_b = down, up, down_b, up_b
    n_ff = up.shape[1]
    c.shape(up, n_embd, n_ff)
    c.shape(down, n_ff, n_embd)
    c.shape(up_b, n_ff)
    c.shape(down_b, n_embd)
    gate = c.tensor(p + "ffn_gate.weight", required=False)
    c.shape(gate, n_embd, n_ff)
    c.shape(c.tensor(p + "ffn_gate.bias", required=False), n_ff)


def _mlp(c: _Checker, n_embd: int, side: int, d_head: int) -> None:
    """clip_graph_llava with the LLaVA MLP projector (and clip_n_mmproj_embd, which reads mm.2)."""
    n_pos = side * side + (1 if "v.class_embd" in c.info.tensors else 0)
    pos = c.tensor("v.position_embd.weight")
    assert pos is not None
    c.types(pos, {F32, F16}, "position embeddings are read with ggml_get_rows as F32 or F16")
    if len(pos.shape) != 2 or pos.shape[0] != n_embd or pos.shape[1] < n_pos:
        c.fail(f"tensor v.position_embd.weight has shape {list(pos.shape)}, expected [{n_embd}, {n_pos}]")
    n_in = n_embd * max(1, len(c.info.get("clip.vision.feature_layer") or []))
    if "mm.3.weight" in c.info.tensors:  # clip.cpp turns the projector into Yi-style mlp_norm
        hidden = _linear(c, "mm.0", n_in)
        for name in ("mm.1.weight", "mm.1.bias"):
            c.shape(c.tensor(name), hidden)
        out = _linear(c, "mm.3", hidden)
        for name in ("mm.4.weight", "mm.4.bias"):
            c.shape(c.tensor(name), out)
        return
    hidden = _linear(c, "mm.0", n_in)
    _linear(c, "mm.2", hidden)


def _linear(c: _Checker, prefix: str, n_in: int) -> int:
    """A weight [n_in, n_out] and its bias [n_out], both required; returns n_out."""
    w = c.tensor(prefix + ".weight")
    assert w is not None
    if len(w.shape) != 2 or w.shape[0] != n_in:
        c.fail(f"tensor {prefix}.weight has shape {list(w.shape)}, expected [{n_in}, n]")
    c.shape(c.tensor(prefix + ".bias"), w.shape[1])
    return w.shape[1]


def _qwen2vl(c: _Checker, n_embd: int, side: int, d_head: int) -> None:
    """clip_graph_qwen2vl: a 2x2 merge hard-wired in the graph, and M-RoPE over head_dim/4 sections.

    Images are resized to multiples of 2 x patch_size whatever image_size says, so it is not checked here.
    """
    merge = c.int_value("clip.vision.spatial_merge_size", 2, 2, required=False)
    del merge
    if d_head % 4:
        c.fail(f"the vision head size ({d_head}) is not a multiple of 4, as qwen2vl's M-RoPE needs")
    hidden = _linear(c, "mm.0", 4 * n_embd)
    _linear(c, "mm.2", hidden)


def _gemma3(c: _Checker, n_embd: int, side: int, d_head: int) -> None:
    """clip_graph_siglip for gemma3: position embeddings added, average pooling, norm, projection."""
    pos = c.tensor("v.position_embd.weight")
    c.shape(pos, n_embd, side * side)
    c.types(pos, {F32}, "position embeddings are added (ggml_add) as F32")
    pool = c.int_value("clip.vision.projector.scale_factor", 1, max(side, 1), required=False) or 4
    if side % pool:
        c.fail(f"the {side}x{side} patch grid cannot be pooled by clip.vision.projector.scale_factor {pool}")
    c.shape(c.tensor("mm.soft_emb_norm.weight"), n_embd)
    w = c.tensor("mm.input_projection.weight")
    assert w is not None
    if len(w.shape) != 2 or w.shape[1] != n_embd:
        c.fail(f"tensor mm.input_projection.weight has shape {list(w.shape)}, expected [n, {n_embd}]")
    c.types(w, _FLOATS, "the input projection is transposed in the graph, which quantized types cannot be")


BUILDERS: dict[str, Callable[[_Checker, int, int, int], None]] = {
    "mlp": _mlp,
    "qwen2vl_merger": _qwen2vl,
    "gemma3": _gemma3,
}
