"""Evaluation harness: the same items through several selection modes, side by side.

Items are JSONL, one per line:

    {"id": "q1", "images": ["a.png"], "question": "What is shown?", "answer": "a cat"}
    {"id": "q2", "image": "b.jpg", "question": "Which colour?", "choices": ["red", "blue"], "answer": "B"}

``prompt`` may replace ``question`` (used as is, image markers included); image paths
are relative to the file. The glyph testbed's ``items.jsonl`` is read as it is.
Scoring: multiple choice when ``choices`` are given (the first option letter in the
reply, or the choice's text), else the reply's first words must equal the answer's
(the testbed's own rule for its tasks). Results are appended per (item, mode) to
``results.jsonl`` in the output folder, so an interrupted run resumes where it stopped (a row
torn by the interruption runs again). One run at a time writes to a folder: it is locked (flock).
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import VPGGUFError
from .runs import Progress, jsonl, lock_folder, read_log
from .video import Video
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
    videos: list[Video] = field(default_factory=list)  # after the images, in the markers' order


def read_items(path: str | Path, where: dict[str, str] | None = None) -> list[EvalItem]:
    path = Path(path)
    items = []
    for n, d in jsonl(path):
        try:
            imgs = d.get("images") or ([d["image"]] if "image" in d else [])
            sampling = d.get("video", {})  # optional: {"fps", "max_frames", "timestamp_ms"}
            videos = [Video(path.parent / v, **sampling) for v in d.get("videos", [])]
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
                    videos,
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
    from .testbed.tasks import TASKS, Item
    from .testbed.tasks import score as testbed_score

    if item.task in TASKS:
        return testbed_score(Item(item.id, item.task, 0, [], item.prompt, item.answer, item.max_tokens), text)
    words = _words(item.answer)
    return bool(words) and _words(text)[: len(words)] == words


def _log_softmax(x: Any) -> Any:
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _error_row(item: EvalItem, mode: str, err: Exception) -> dict[str, Any]:
    return {
        "id": item.id,
        "mode": mode,
        "correct": False,
        "text": "",
        "error": str(err),
        "n_generated": 0,
        "n_image_tokens": 0,
        "retention_mean": 1.0,
        "n_kept": [],
        "decode_tok_s": 0.0,
    }


def evaluate_item(
    model: Any,
    item: EvalItem,
    modes: Sequence[str],
    done: dict[str, dict[str, Any]] | None = None,
    anchor: int | None = None,
    steps: bool = False,
    logits: bool = False,
) -> Iterator[dict[str, Any]]:
    """One item through each mode: a row per mode as it finishes. ``done``: rows of this item already
    run (a control reads its matched mode's K there). ``steps``: each step's retention, mass and kept
    set in the row. ``logits``: each mode also teacher-forced on the dense answer (top-1 agreement and
    mean KL(dense || mode) of the next-token distribution)."""
    import numpy as np

    done = dict(done or {})
    ref_lp, dense = None, None
    # every mode prefills the same dense prompt: the cache keeps it from one mode to the next
    media: dict[str, Any] = {"images": item.images, "videos": item.videos}
    tf_media: dict[str, Any] = {"videos": item.videos, "cache_prompt": True}
    if logits:  # the dense answer, its logits the reference (and the "dense" mode's own result)
        dense = model.generate(item.prompt, **media, max_tokens=item.max_tokens, cache_prompt=True)
        ref_tokens = dense.tokens or [0]
        ref_lp = _log_softmax(model.teacher_forced(item.prompt, item.images, ref_tokens, **tf_media)[0])
    for m in modes:
        base = matched_mode(m)
        ref = done.get(base) if base else None
        matched = None if ref is None else (ref.get("n_kept", []), ref["retention_mean"])
        spec = comparison_spec(m, anchor, matched)
        if spec is not None and spec.min_pruned_layers is None:
            # fidelity is what the selection keeps, measured also where it would not pay for speed
            # (the library skips it there: Gemma 3 270M prunes one full-attention layer)
            spec = replace(spec, min_pruned_layers=0)
        try:
            r = (
                dense
                if spec is None and dense is not None
                else model.generate(
                    item.prompt, **media, max_tokens=item.max_tokens, visionpulse=spec, cache_prompt=True
                )
            )
        except VPGGUFError as e:  # a bad image or a too small context: recorded, the run goes on
            row = _error_row(item, m, e)
        else:
            rep = r.visionpulse
            row = {
                "id": item.id,
                "mode": m,
                "correct": score(item, r.text),
                "text": r.text,
                "n_generated": r.n_generated,
                "n_image_tokens": r.n_image_tokens,
                "retention_mean": rep.summary()["retention_mean"] if rep is not None and rep.steps else 1.0,
                "n_kept": [st.n_kept for st in rep.steps] if rep is not None else [],
                "decode_tok_s": r.timings.decode_tok_s,
            }
            if steps:
                row["tokens"] = r.tokens
                row["retention"] = [st.retention for st in rep.steps] if rep is not None else []
                row["mass"] = [st.mass for st in rep.steps] if rep is not None else []
                row["kept"] = [st.kept for st in rep.steps] if rep is not None else []
            if ref_lp is not None:
                lp = (
                    ref_lp
                    if spec is None
                    else _log_softmax(model.teacher_forced(item.prompt, item.images, ref_tokens, spec, **tf_media)[0])
                )
                row["top1_agree"] = float((lp.argmax(1) == ref_lp.argmax(1)).mean())
                row["kl"] = float((np.exp(ref_lp) * (ref_lp - lp)).sum(1).mean())
        done[m] = row
        yield row


def check_modes(modes: Sequence[str]) -> None:
    """ValueError for an unknown mode or a control listed before the mode it is matched to."""
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}: one of {', '.join(MODES)}")
        base = matched_mode(m)
        if base is not None and (base not in modes or list(modes).index(base) > list(modes).index(m)):
            raise ValueError(f"mode {m!r} is a control of {base!r}: list {base!r} before it")


def run_eval(
    model: Any,
    items: Sequence[EvalItem],
    modes: Sequence[str],
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (item, mode) not done yet; returns all rows of results.jsonl.

    The output folder is locked while it runs (FolderBusyError for a second run on it); a torn last
    row of an interrupted run is dropped and run again."""
    check_modes(modes)
    with lock_folder(out_dir, "eval") as out:
        return _run_locked(model, items, modes, out / "results.jsonl", resume, progress)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, row in read_log(path):
        if not (isinstance(row, dict) and isinstance(row.get("id"), str) and isinstance(row.get("mode"), str)):
            msg = f'{path}:{n}: not a result row (need "id" and "mode"); fix or delete that line'
            raise ValueError(msg)  # noqa: TRY004 - the file's content is wrong, not the caller's argument
        rows.append(row)
    return rows


def _run_locked(
    model: Any, items: Sequence[EvalItem], modes: Sequence[str], res_path: Path, resume: bool, progress: bool
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if resume and res_path.exists():
        rows = _read_rows(res_path)
    elif res_path.exists():
        res_path.unlink()
    n_todo = sum(1 for it in items for m in modes if not any(r["id"] == it.id and r["mode"] == m for r in rows))
    k = 0
    with open(res_path, "a") as f, Progress(n_todo, enabled=progress and n_todo > 0) as bar:
        for it in items:
            done = {r["mode"]: r for r in rows if r["id"] == it.id}
            todo = [m for m in modes if m not in done]
            if not todo:
                continue
            bar.at(k, it.id)
            for row in evaluate_item(model, it, todo, done):
                f.write(json.dumps(row) + "\n")
                f.flush()  # a stop loses at most the pair being run
                rows.append(row)
                k += 1
        bar.at(k, "done")
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
