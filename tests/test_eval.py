"""The evaluation harness: item format, scoring, resumable side-by-side runs, the testbed's files."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vp_gguf.evaluate import EvalItem, read_items, score


def test_read_and_score(tmp_path, images):
    f = tmp_path / "items.jsonl"
    f.write_text(json.dumps({"id": "mc", "image": str(images["a"]), "question": "Colour?",
                             "choices": ["red", "blue"], "answer": "B"}) + "\n" +
                 json.dumps({"id": "open", "images": [str(images["a"])], "question": "What?",
                             "answer": "a red square"}) + "\n")
    mc, op = read_items(f)
    assert "A. red\nB. blue" in mc.prompt and mc.images == [images["a"]]
    assert score(mc, "B") and score(mc, "The answer is B.") and not score(mc, "A") and score(mc, "blue sky")
    assert score(op, "A red square, on white.") and not score(op, "a red")
    assert score(EvalItem("t", [], "", "1 2 3", task="copy"), " 1 2 3 4")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "image": "x.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_items(bad)


def vp(*args):
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_eval_cli_resumes(tiny_paths, images, tmp_path):
    model, mmproj = tiny_paths("qwen2vl")
    f = tmp_path / "items.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"q{i}", "images": [str(images["a"])], "question": "Describe.",
                                       "answer": "x", "max_tokens": 4}) for i in range(2)) + "\n")
    out = tmp_path / "out"
    args = ("eval", f, "-m", model, "--mmproj", mmproj, "-t", 2, "--modes", "dense,visionpulse-5,random-5", "-o", out)
    r = vp(*args)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {x["mode"] for x in rows} == {"dense", "visionpulse-5", "random-5"}
    assert all(x["retention_mean"] < 1 for x in rows if x["mode"] != "dense")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dense"]["items"] == 2 and "| visionpulse-5 |" in (out / "RESULTS.md").read_text()
    again = vp(*args)  # resumes: nothing left to run
    assert again.returncode == 0 and len((out / "results.jsonl").read_text().splitlines()) == 6
    bad = vp("eval", f, "-m", model, "--mmproj", mmproj, "--modes", "dense,turbo", "-o", tmp_path / "o2")
    assert bad.returncode == 2 and "unknown mode 'turbo'" in bad.stderr


def test_eval_reads_the_testbed_suite(tmp_path):
    from vp_gguf.testbed import assets
    from vp_gguf.testbed.tasks import make_suite
    make_suite("quick", tmp_path / "suite", seed=0)
    g = assets.gemma_path()
    r = vp("eval", tmp_path / "suite" / "items.jsonl", "-m", g, "--mmproj", assets.glyph_mmproj(16, g), "-t", 2,
           "--modes", "dense,visionpulse-5", "--where", "task=copy", "-o", tmp_path / "out", "-c", 2048)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["dense"]["items"] == 2 and s["dense"]["accuracy"] == 1.0
    assert s["visionpulse-5"]["accuracy"] >= 0.5 and s["visionpulse-5"]["retention_mean"] <= 0.05


def test_controls_are_budget_matched(load_model, images, tmp_path):
    """random-5-matched replays visionpulse-5's K on the same item; random-5-mean keeps its mean ratio."""
    from vp_gguf.evaluate import run_eval

    m = load_model("llava")
    items = [EvalItem("q", [images["a"]], "Describe.", "x", max_tokens=8)]
    with pytest.raises(ValueError, match="control of 'visionpulse-5'"):
        run_eval(m, items, ["random-5-matched"], tmp_path / "bad", progress=False)
    rows = {r["mode"]: r for r in run_eval(m, items, ["visionpulse-5", "random-5-matched", "random-5-mean"],
                                           tmp_path / "out", progress=False)}
    vp5 = rows["visionpulse-5"]["n_kept"]
    assert vp5 and rows["random-5-matched"]["n_kept"][:len(vp5)] == vp5
    mean_k = set(rows["random-5-mean"]["n_kept"])
    assert len(mean_k) == 1  # one fixed ratio of one image: the same K at every step


def test_eval_n_predict_overrides_the_items(tiny_paths, images, tmp_path):
    """-n given wins over every item's max_tokens (either way); without it each item keeps its own."""
    model, mmproj = tiny_paths("qwen2vl")
    f = tmp_path / "items.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"q{i}", "images": [str(images["a"])], "question": "Describe.",
                                       "answer": "x", "max_tokens": 4}) for i in range(2)) + "\n")

    def generated(out, *n):
        r = vp("eval", f, "-m", model, "--mmproj", mmproj, "-t", 2, "--modes", "dense", "-o", tmp_path / out,
               *n)
        assert r.returncode == 0, r.stderr
        return [json.loads(x)["n_generated"] for x in (tmp_path / out / "results.jsonl").read_text().splitlines()]

    assert generated("more", "-n", 7) == [7, 7]  # the tiny model never ends a reply early
    assert generated("fewer", "--n-predict", 2) == [2, 2]
    assert generated("own") == [4, 4]
