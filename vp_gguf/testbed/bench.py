"""Fidelity benchmark: the testbed's items through every selection mode, side by side.

The evaluation harness runs each item (evaluate.evaluate_item): dense greedy generation first; then
each mode generates (exact match, retention, visual mass, length) and is teacher-forced on the dense
answer (per-step top-1 agreement and KL(dense || mode) of the next-token distribution). This file
adds the testbed's models (one projector per grid size) and its tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import VisionModel
from ..evaluate import EvalItem, evaluate_item
from ..runs import Progress
from ..video import Video
from ..visionpulse import COMPARISON_MODES, matched_mode
from . import assets
from .tasks import Item

MODES = COMPARISON_MODES


def add_quest_curve(shares: list[int]) -> list[str]:
    """Points of visionpulse-5+'s fidelity curve: the same settings with N% of the candidate pages kept below
    the anchor at every step (instead of the share the visual mass sets). Registered for this process in the
    comparison table under "visionpulse-5+-N%"; returns their names."""
    names = []
    for n in shares:
        if not 0 < n <= 100:
            raise ValueError(f"a Quest page share is a percentage in (0, 100], not {n}")
        name = f"visionpulse-5+-{n}%"
        MODES[name] = {**(MODES["visionpulse-5+"] or {}), "quest_budget_min": n / 100, "quest_budget_max": n / 100}
        names.append(name)
    return names


def ordered(modes: list[str]) -> list[str]:
    """The modes with every control's matched mode before it (added when missing)."""
    out: list[str] = []
    for name in modes:
        base = matched_mode(name)
        if base is not None and base not in out:
            out.append(base)
        if name not in out:
            out.append(name)
    return out


class Bench:
    """The testbed's items through the evaluation harness (evaluate.evaluate_item), one glyph projector
    per grid size, with per-step selections and teacher-forced agreement with the dense answer."""

    def __init__(self, suite_dir: Path, n_threads: int | None = None, n_ctx: int = 8192, **params: Any) -> None:
        self.suite_dir = Path(suite_dir)
        self.model_path = assets.gemma_path()
        self.n_threads, self.n_ctx = n_threads, n_ctx
        self.params = params  # more ModelParams (the video bench: swa_full, flash_attn)
        self._models: dict[int, VisionModel] = {}

    def model(self, grid: int) -> VisionModel:
        if grid not in self._models:
            self._models[grid] = VisionModel(
                self.model_path,
                assets.glyph_mmproj(grid, self.model_path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                **self.params,
            )
        return self._models[grid]

    def close(self) -> None:
        for m in self._models.values():
            m.close()

    def run_item(self, item: Item, modes: list[str], anchor: int | None) -> dict[str, dict[str, Any]]:
        ev = EvalItem(
            item.id,
            item.image_paths(self.suite_dir),
            item.prompt,
            item.answer,
            None,
            item.max_tokens,
            item.task,
            videos=item_videos(item, self.suite_dir),
        )
        rows = evaluate_item(self.model(item.grid), ev, ordered(modes), anchor=anchor, steps=True, logits=True)
        return {r["mode"]: r for r in rows}


def item_videos(item: Item, suite_dir: Path) -> list[Video]:
    """An item's videos as its generator meant them to be sampled: every frame, no timestamps."""
    m = item.meta
    return [
        Video(p, fps=m.get("fps", 1), max_frames=m.get("n_frames", 64), timestamp_ms=m.get("timestamp_ms", 0))
        for p in item.video_paths(suite_dir)
    ]


def summarize(results: list[dict[str, Any]], modes: list[str]) -> dict[str, dict[str, float]]:
    table = {}
    dense_acc = np.mean([r["modes"]["dense"]["correct"] for r in results]) if results else 0.0
    for name in modes:
        rs = [r["modes"][name] for r in results]
        ret = [x for r in rs for x in r["retention"]] or [1.0]
        mass = [x for r in rs for x in r["mass"]] or [float("nan")]
        acc = float(np.mean([r["correct"] for r in rs]))
        table[name] = {
            "accuracy": acc,
            "rel_accuracy": acc / dense_acc if dense_acc else float("nan"),
            "retention_mean": float(np.mean(ret)),
            "retention_min": float(np.min(ret)),
            "retention_max": float(np.max(ret)),
            "mass_mean": float(np.mean(mass)),
            "gen_len_mean": float(np.mean([r["n_generated"] for r in rs])),
            "top1_agree": float(np.mean([r["top1_agree"] for r in rs])),
            "kl_mean": float(np.mean([r["kl"] for r in rs])),
        }
    return table


def markdown_table(table: dict[str, dict[str, float]], n_items: int, anchor_desc: str) -> str:
    lines = [
        f"Anchor: {anchor_desc}; {n_items} items.",
        "",
        (
            "| mode | accuracy | vs dense | retention mean (min-max) | visual mass | gen. length | "
            "top-1 agree (TF) | KL vs dense (TF) |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, t in table.items():
        lines.append(
            f"| {name} | {100 * t['accuracy']:.1f}% | {100 * t['rel_accuracy']:.1f}% | "
            f"{100 * t['retention_mean']:.2f}% ({100 * t['retention_min']:.2f}-{100 * t['retention_max']:.2f}%) | "
            f"{t['mass_mean']:.3f} | {t['gen_len_mean']:.1f} | {100 * t['top1_agree']:.1f}% | {t['kl_mean']:.4f} |"
        )
    return "\n".join(lines)


def by_task_table(results: list[dict[str, Any]], modes: list[str]) -> str:
    """Correct items per task and visual-token count, per mode (where each mode loses answers)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(f"{r['task']} ({r['n_visual']} tokens)", []).append(r)
    lines = ["| task (visual tokens) | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for g, rs in groups.items():
        cells = [f"{sum(r['modes'][m]['correct'] for r in rs)}/{len(rs)}" for m in modes]
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "MODES",
    "Bench",
    "Progress",
    "add_quest_curve",
    "by_task_table",
    "item_videos",
    "markdown_table",
    "ordered",
    "summarize",
]
