"""Fidelity benchmark: the same items through every selection mode, side by side.

Per item: dense greedy generation first; then each mode generates (exact match,
retention, visual mass, length) and is teacher-forced on the dense answer
(per-step top-1 agreement and KL(dense || mode) of the next-token distribution).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import VisionModel
from ..runs import progress
from ..visionpulse import COMPARISON_MODES, comparison_spec, matched_mode
from . import assets
from .tasks import Item, score

MODES = COMPARISON_MODES


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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@dataclass
class ModeResult:
    correct: bool
    text: str
    n_generated: int
    retention: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    top1_agree: float = 1.0
    kl: float = 0.0
    decode_tok_s: float = 0.0
    kept: list[list[int]] = field(default_factory=list)
    n_kept: list[int] = field(default_factory=list)


class Bench:
    def __init__(self, suite_dir: Path, n_threads: int | None = None, n_ctx: int = 8192) -> None:
        self.suite_dir = Path(suite_dir)
        self.model_path = assets.gemma_path()
        self.n_threads, self.n_ctx = n_threads, n_ctx
        self._models: dict[int, VisionModel] = {}

    def model(self, grid: int) -> VisionModel:
        if grid not in self._models:
            self._models[grid] = VisionModel(
                self.model_path, assets.glyph_mmproj(grid, self.model_path), n_ctx=self.n_ctx, n_threads=self.n_threads
            )
        return self._models[grid]

    def close(self) -> None:
        for m in self._models.values():
            m.close()

    def run_item(self, item: Item, modes: list[str], anchor: int | None) -> dict[str, ModeResult]:
        m = self.model(item.grid)
        imgs = item.image_paths(self.suite_dir)
        dense = m.generate(item.prompt, images=imgs, max_tokens=item.max_tokens)
        ref_tokens = dense.tokens or [0]
        ref_logits, _ = m.teacher_forced(item.prompt, imgs, ref_tokens)
        ref_lp = _log_softmax(ref_logits)
        out: dict[str, ModeResult] = {}
        for name in ordered(modes):
            base = matched_mode(name)
            matched = None if base is None else (out[base].n_kept, float(np.mean(out[base].retention or [1.0])))
            spec = comparison_spec(name, anchor, matched)
            if spec is None:
                r = dense
            else:
                r = m.generate(item.prompt, images=imgs, max_tokens=item.max_tokens, visionpulse=spec)
            res = ModeResult(
                correct=score(item, r.text), text=r.text, n_generated=r.n_generated, decode_tok_s=r.timings.decode_tok_s
            )
            if r.visionpulse is not None:
                res.retention = [s.retention for s in r.visionpulse.steps]
                res.mass = [s.mass for s in r.visionpulse.steps]
                res.kept = [s.kept for s in r.visionpulse.steps]
                res.n_kept = [s.n_kept for s in r.visionpulse.steps]
                lg, _ = m.teacher_forced(item.prompt, imgs, ref_tokens, spec)
                lp = _log_softmax(lg)
                res.top1_agree = float((lp.argmax(1) == ref_lp.argmax(1)).mean())
                res.kl = float((np.exp(ref_lp) * (ref_lp - lp)).sum(1).mean())
            out[name] = res
        return out


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


def to_jsonable(r: dict[str, ModeResult]) -> dict[str, Any]:
    return {k: v.__dict__ for k, v in r.items()}


__all__ = ["MODES", "Bench", "by_task_table", "markdown_table", "ordered", "progress", "summarize", "to_jsonable"]
