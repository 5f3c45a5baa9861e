"""GGUF mutation fuzz test: seeded mutations of the tiny models (model and mmproj) never crash a load.

Each mutated pair must load or be refused with a ModelFileError / ProjectorMismatchError. The loads run
in child processes (test_gguf_hardening.run_all), many per child; a child that dies names the mutation
that killed it. Mutations: single-byte flips in the header, integer keys set to extremes, tensor
types relabelled, tensor dimensions changed, truncations. A failure prints each mutation's seed and
description: ``mutate(family, which, seed)`` rebuilds it.
"""
from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import pytest
from test_gguf_hardening import U32, GGUFEdit, run_all

FAMILIES = ("llava", "qwen2vl", "gemma3")
PER_FILE = 50  # mutations per (family, model|mmproj): 300 in all
EXTREMES = (0, 1, 2, 3, 7, 31, 255, 1000, 65535, 100000, 2**31 - 1, 2**31, 2**32 - 1)
TYPES = (0, 1, 2, 3, 6, 7, 8, 10, 12, 14, 16, 24, 26, 28, 30, 39, 40, 99)
CLEAN = {"ModelFileError", "ProjectorMismatchError"}


def _header_size(ed: GGUFEdit) -> int:
    return len(ed.header())


def mutate(path: Path, seed: int, out: Path) -> str:
    """Write one seeded mutation of `path` to `out`; returns what was done."""
    rng = random.Random(seed)
    kind = rng.choice(("flip", "flip", "int", "int", "type", "dims", "truncate"))
    raw = path.read_bytes()
    if kind == "flip":  # a few random bytes of the header region
        ed = GGUFEdit.load(path)
        n = _header_size(ed)
        data = bytearray(raw)
        what = []
        for _ in range(rng.choice((1, 1, 2, 4))):
            i = rng.randrange(n)
            data[i] ^= 1 << rng.randrange(8)
            what.append(str(i))
        out.write_bytes(bytes(data))
        return f"flip bytes at {','.join(what)}"
    if kind == "truncate":
        n = rng.choice((rng.randrange(len(raw)), rng.randrange(min(len(raw), 4096))))
        out.write_bytes(raw[:n])
        return f"truncate to {n}"
    ed = GGUFEdit.load(path)
    if kind == "int":  # an integer key (a hyper-parameter) set to an extreme value
        keys = [k for k, v in ed.kv.items() if struct.unpack("<I", v[:4])[0] in (4, 5, 10, 11)]
        key = rng.choice(keys)
        v = rng.choice(EXTREMES)
        ed.set_int(key, v, U32)
        ed.write(out)
        return f"set {key.decode()} = {v}"
    t = rng.choice(ed.tensors)
    if kind == "type":  # a tensor's type relabelled (its data re-laid out for the new size)
        t.ggml_type = rng.choice(TYPES)
        ed.write(out)
        return f"retype {t.name.decode()} to {t.ggml_type}"
    d = rng.randrange(len(t.shape))
    old = t.shape[d]
    t.shape[d] = rng.choice((0, 1, old // 2 or 1, old * 2, old + 1))
    ed.write(out)
    return f"dims of {t.name.decode()}: ne[{d}] {old} -> {t.shape[d]}"


@pytest.mark.slow  # 60-85 s on 2 shared cores
def test_mutated_ggufs_never_crash(tiny_paths, tmp_path):
    started = time.monotonic()
    cases, pairs = [], []
    for fi, family in enumerate(FAMILIES):
        model, mmproj = tiny_paths(family)
        for wi, which in enumerate(("model", "mmproj")):
            src = model if which == "model" else mmproj
            for k in range(PER_FILE):
                seed = 1000 * (2 * fi + wi) + k
                out = tmp_path / f"{family}-{which}-{seed}.gguf"
                desc = mutate(src, seed, out)
                cases.append(f"{family} {which} seed {seed}: {desc}")
                pairs.append((out, mmproj) if which == "model" else (model, out))
    results = run_all(pairs, tmp_path)
    bad = [f"{case} -> {res}" for case, res in zip(cases, results)
           if res["result"] != "ok" and res.get("error") not in CLEAN]
    loaded = sum(r["result"] == "ok" for r in results)
    print(f"\nfuzz: {len(results)} mutations, {loaded} loaded, {len(results) - loaded - len(bad)} refused, "
          f"{len(bad)} bad, {time.monotonic() - started:.1f} s")
    assert not bad, f"{len(bad)} mutations crashed or raised a foreign error:\n" + "\n".join(bad)
