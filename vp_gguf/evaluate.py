"""Evaluation harness: the same items through several selection modes, side by side.

Items are JSONL, one per line:

    {"id": "q1", "images": ["a.png"], "question": "What is shown?", "answer": "a cat"}
    {"id": "q2", "image": "b.jpg", "question": "Which colour?", "choices": ["red", "blue"], "answer": "B"}

``prompt`` may replace ``question`` (used as is, image markers included); image paths
are relative to the file. The glyph testbed's ``items.jsonl`` is read as it is.
Scoring: multiple choice when ``choices`` are given (the first option letter in the
reply, or the choice's text), else the reply's first words must equal the answer's
(the testbed's own rule for its tasks). Results are appended per (item, mode) to
``results.jsonl`` in the output folder, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import re
import string
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VPGGUFError
from .runs import jsonl
from .runs import progress as progress_bar
from .visionpulse import COMPARISON_MODES, comparison_spec, matched_mode

MODES = COMPARISON_MODES
DEFAULT_MODES = ("dense", "visionpulse-5", "visionpulse-10", "static-5%", "random-5")
LETTERS = string.ascii_uppercase


@dataclass
class EvalItem:
    id: str
    images: list[Path]
    prompt: str
    answer: str
    choices: list[str] | None = None
    max_tokens: int = 64
    task: str | None = None
    meta: dict = field(default_factory=dict)


def read_items(path: str | Path, where: dict[str, str] | None = None) -> list[EvalItem]:
    path = Path(path)
    items = []
    for n, d in jsonl(path):
        try:
            imgs = d.get("images") or ([d["image"]] if "image" in d else [])
            if where and any(str(d.get(k)) != v for k, v in where.items()):
                continue
            choices = d.get("choices")
            prompt = d.get("prompt")
            if prompt is None:
                prompt = d["question"]
                if choices:
                    prompt += (
                        "\n"
                        + "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
                        + "\nAnswer with the option's letter."
                    )
            items.append(
                EvalItem(
                    str(d.get("id", n)),
                    [(path.parent / p) for p in imgs],
                    prompt,
                    str(d["answer"]),
                    choices,
                    int(d.get("max_tokens", 16 if choices else 64)),
                    d.get("task"),
                    d.get("meta", {}),
                )
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f'{path}:{n}: not an eval item ({e.__class__.__name__}: {e}); need "question" or "prompt", and "answer"'
            ) from None
    return items


def _words(s: str) -> list[str]:
    """Lower-case words, punctuation at their ends dropped ("Square," == "square")."""
    return [w for w in (x.strip(string.punctuation) for x in s.lower().split()) if w]


def score(item: EvalItem, text: str) -> bool:
    if item.choices:
        want = item.answer.strip()
        if len(want) == 1 and want.upper() in LETTERS[: len(item.choices)]:
            want_i = LETTERS.index(want.upper())
        else:
            want_i = next((i for i, c in enumerate(item.choices) if c.strip().lower() == want.lower()), -1)
        m = re.search(rf"\b([{LETTERS[: len(item.choices)]}])\b", text)
        if m:
            return LETTERS.index(m.group(1)) == want_i
        return want_i >= 0 and text.strip().lower().startswith(item.choices[want_i].strip().lower())
    if item.task in ("copy", "second", "many", "lookup"):
        from .testbed.tasks import Item
        from .testbed.tasks import score as testbed_score

        return testbed_score(Item(item.id, item.task, 0, [], item.prompt, item.answer, item.max_tokens), text)
    words = _words(item.answer)
    return bool(words) and _words(text)[: len(words)] == words


def run_eval(
    model: Any,
    items: Sequence[EvalItem],
    modes: Sequence[str],
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (item, mode) not done yet; returns all rows of results.jsonl."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}: one of {', '.join(MODES)}")
        base = matched_mode(m)
        if base is not None and (base not in modes or list(modes).index(base) > list(modes).index(m)):
            raise ValueError(f"mode {m!r} is a control of {base!r}: list {base!r} before it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.jsonl"
    rows: list[dict[str, Any]] = []
    if resume and res_path.exists():
        rows = [json.loads(line) for line in res_path.read_text().splitlines() if line.strip()]
    elif res_path.exists():
        res_path.unlink()
    done = {(r["id"], r["mode"]) for r in rows}
    todo = [(it, m) for it in items for m in modes if (it.id, m) not in done]
    t0 = time.time()
    with open(res_path, "a") as f:
        for k, (it, m) in enumerate(todo):
            if progress:
                progress_bar(k, len(todo), t0, f"{it.id} {m}")
            base = matched_mode(m)
            ref = next((r for r in rows if r["id"] == it.id and r["mode"] == base), None) if base else None
            matched = None if ref is None else (ref.get("n_kept", []), ref["retention_mean"])
            try:
                r = model.generate(
                    it.prompt,
                    images=it.images,
                    max_tokens=it.max_tokens,
                    visionpulse=comparison_spec(m, matched=matched),
                )
            except VPGGUFError as e:  # a bad image or a too small context: recorded, the run goes on
                row = {
                    "id": it.id,
                    "mode": m,
                    "correct": False,
                    "text": "",
                    "error": str(e),
                    "n_generated": 0,
                    "n_image_tokens": 0,
                    "retention_mean": 1.0,
                    "decode_tok_s": 0.0,
                }
            else:
                rep = r.visionpulse.summary() if r.visionpulse is not None and r.visionpulse.steps else None
                row = {
                    "id": it.id,
                    "mode": m,
                    "correct": score(it, r.text),
                    "text": r.text,
                    "n_generated": r.n_generated,
                    "n_image_tokens": r.n_image_tokens,
                    "retention_mean": rep["retention_mean"] if rep else 1.0,
                    "n_kept": [st.n_kept for st in r.visionpulse.steps] if r.visionpulse is not None else [],
                    "decode_tok_s": r.timings.decode_tok_s,
                }
            f.write(json.dumps(row) + "\n")
            f.flush()  # a stop loses at most the pair being run
            rows.append(row)
        if progress and todo:
            progress_bar(len(todo), len(todo), t0, "done")
    return rows


def summarize(rows: Sequence[dict[str, Any]], modes: Sequence[str], ids: set[str] | None = None) -> dict[str, dict]:
    table = {}
    by_mode = {m: [r for r in rows if r["mode"] == m and (ids is None or r["id"] in ids)] for m in modes}
    dense = by_mode.get("dense") or []
    dense_acc = sum(r["correct"] for r in dense) / len(dense) if dense else None
    for m, rs in by_mode.items():
        if not rs:
            continue
        acc = sum(r["correct"] for r in rs) / len(rs)
        table[m] = {
            "items": len(rs),
            "accuracy": acc,
            "vs_dense": acc / dense_acc if dense_acc else None,
            "retention_mean": sum(r["retention_mean"] for r in rs) / len(rs),
            "gen_len_mean": sum(r["n_generated"] for r in rs) / len(rs),
            "decode_tok_s": sum(r["decode_tok_s"] for r in rs) / len(rs),
        }
    return table


def markdown(table: dict[str, dict], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "| mode | items | accuracy | vs dense | retention mean | gen. length | decode tok/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, t in table.items():
        vs = "-" if t["vs_dense"] is None else f"{100 * t['vs_dense']:.1f}%"
        lines.append(
            f"| {m} | {t['items']} | {100 * t['accuracy']:.1f}% | {vs} | {100 * t['retention_mean']:.2f}% | "
            f"{t['gen_len_mean']:.1f} | {t['decode_tok_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"
