#!/usr/bin/env python3
"""Time to first token, turn by turn: a conversation about a 1024-token image keeps its KV cache.

    python3 scripts/turn_bench.py            # -> docs/speed/TURNS.md, turns.json

Gemma 3 270M reads a glyph image (32 x 32 tiles: 1024 visual tokens) through the testbed's
projector. It is a base model without a chat template, so a turn is the conversation so far as
raw text (each reply kept, a new request appended), sent with cache_prompt on, as `Chat` and the
server send theirs; right after each later turn the same prompt goes again with cache_prompt off
(the image encoded and the whole prompt prefilled again: what a client without prompt caching
costs). Time to first token is measured from the call to the first streamed piece.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vp_gguf import VisionModel  # noqa: E402
from vp_gguf.testbed import assets  # noqa: E402
from vp_gguf.testbed.glyphs import GlyphGrid  # noqa: E402

GRID = 32
QUESTIONS = ["\nSequence again:", "\nOnce more, the sequence:", "\nAnd the sequence again:"]


def ttft(stream) -> tuple[float, str]:
    t0 = time.perf_counter()
    pieces = iter(stream)
    first = next(pieces, "")
    dt = time.perf_counter() - t0
    return dt, first + "".join(pieces)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "speed"))
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args()
    rng = random.Random(0)
    digits = " ".join(str(rng.randrange(10)) for _ in range(GRID * GRID // 2))
    img = Path(tempfile.mkdtemp()) / "digits.png"
    GlyphGrid(GRID).render((" " + digits)[: GRID * GRID]).save(img)
    model = assets.gemma_path()
    vm = VisionModel(model, assets.glyph_mmproj(GRID, model), n_ctx=4096, n_threads=a.threads, swa_full=True)
    rows = []
    for rep in range(a.reps):
        history = f"Sequence:{vm.marker}"
        vm.generate("Warm-up.", max_tokens=1)  # each repetition starts from a cache that holds none of it
        for turn, q in enumerate(QUESTIONS, 1):
            history += q
            dt, reply = ttft(vm.stream(history, images=[img], max_tokens=16, cache_prompt=True))
            res = vm.last_result
            rows.append({"rep": rep, "turn": turn, "cache": True, "ttft_ms": 1e3 * dt,
                         "n_prompt": res.n_prompt_tokens, "n_cached": res.n_cached_tokens,
                         "encode_ms": res.timings.image_encode_ms})
            if turn > 1:  # the same prompt, prefilled from scratch
                dt, _ = ttft(vm.stream(history, images=[img], max_tokens=16))
                res = vm.last_result
                rows.append({"rep": rep, "turn": turn, "cache": False, "ttft_ms": 1e3 * dt,
                             "n_prompt": res.n_prompt_tokens, "n_cached": res.n_cached_tokens,
                             "encode_ms": res.timings.image_encode_ms})
                # the next turn continues from the conversation's own cache, as a client's would
                vm.generate(history, images=[img], max_tokens=16)
            history += reply
    vm.close()

    def med(turn: int, cache: bool, key: str = "ttft_ms") -> float:
        return statistics.median(r[key] for r in rows if r["turn"] == turn and r["cache"] == cache)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "turns.json").write_text(json.dumps({"machine": platform.platform(), "threads": a.threads,
                                                "rows": rows}, indent=1))
    cmd = " ".join(["python3 scripts/turn_bench.py", *sys.argv[1:]])
    md = ["# Time to first token, turn by turn", "",
          f"Written by `{cmd}` on {platform.machine()} (CPU, {a.threads or 'all'} threads): Gemma 3 270M "
          f"Q4_K_M reading a {GRID * GRID}-token glyph image, a three-turn conversation (the KV cache kept), "
          f"{a.reps} repetitions, medians. \"Full prefill\" asks each later turn's prompt again with "
          "cache_prompt off: the image encoded and the whole prompt prefilled again.", "",
          "| turn | prompt tokens | kept from the cache | TTFT, cache kept (ms) | TTFT, full prefill (ms) | ratio |",
          "|---|---|---|---|---|---|"]
    for turn in range(1, len(QUESTIONS) + 1):
        n_prompt = int(med(turn, True, "n_prompt"))
        n_cached = int(med(turn, True, "n_cached"))
        kept = med(turn, True)
        if turn == 1:
            md.append(f"| 1 | {n_prompt} | {n_cached} | {kept:.0f} | (the same) | 1.00 |")
        else:
            full = med(turn, False)
            md.append(f"| {turn} | {n_prompt} | {n_cached} | {kept:.0f} | {full:.0f} | {kept / full:.3f} |")
    md += ["", f"Turn 2 against turn 1: {med(2, True) / med(1, True):.3f} of its time to first token.", ""]
    (out / "TURNS.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
