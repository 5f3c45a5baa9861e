"""scripts/speed_bench.py end to end on the packaged Gemma 3 270M at a small size: the
benchmark's table, JSON and plot, and the node-by-node profile (no timing is asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# runs the speed benchmark and its profile end to end
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "speed_bench.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--models", "gemma", *args],
                          capture_output=True, text=True, timeout=600)


def test_table_json_and_plot(tmp_path):
    r = _run("--sizes", "192", "--reps", "1", "--steps", "2", "--configs", "fa-on,fa-off,fa-on-q8,fa-on-upstream",
             "--modes", "vp5-gather,floor", "--prefill-sizes", "64", "--prefill-reps", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    res = data["results"]["gemma"]
    size = res["sizes"]["192"]
    runs = size["runs"]
    assert set(runs) == {f"{m}@{c}" for c in ("fa-on", "fa-off", "fa-on-q8", "fa-on-upstream") for m in ("dense", "vp5")} \
        | {"vp5-gather@fa-on", "floor@fa-on"}
    # the baseline is the fastest dense configuration of the size, whichever it is
    dense = {x["config"]: x["ms_per_tok_median"] for x in runs.values() if x["mode"] == "dense"}
    assert size["fastest_dense"] == min(dense, key=dense.__getitem__)
    assert runs[f"dense@{size['fastest_dense']}"]["speedup_vs_fastest_dense"] == 1.0
    assert all(x["speedup_vs_same_config_dense"] == 1.0 for x in runs.values() if x["mode"] == "dense")
    assert runs["dense@fa-on"]["path"] == "-"
    # Gemma 3 270M prunes one full-attention layer after its anchor: the selection is skipped
    assert all(runs[k]["path"] == "skipped" and runs[k]["retention_mean"] == 1.0 for k in runs if "vp5" in k)
    assert "cannot pay" in res["skipped"]
    assert runs["floor@fa-on"]["retention_mean"] == 1.0
    rows = data["rows"]
    assert len(rows) == len(runs)
    assert {"visual_tokens", "mode", "ms_per_token", "speedup_vs_fastest_dense"} <= set(rows[0])
    assert res["prefill"]["64"]["ratio"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| 192 | vp5-gather | fa-on | skipped |" in md and "fastest dense" in md and "cannot pay" in md
    assert (tmp_path / "speed.png").stat().st_size > 1000


def test_profile_splits_the_step(tmp_path):
    r = _run("--profile", "192", "--steps", "2", "-fa", "off", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    x = json.loads((tmp_path / "profile.json").read_text())[0]
    assert (x["flash_attn"], x["attn"]) == ("off", "gather")
    assert x["probe"] == "the anchor layer's own scores"
    parts = x["parts_ms"]
    assert parts["attention, dense layers (0..anchor)"] > 0 and parts["rest (weights, norms, rope, embeddings, output)"] > 0
    # the parts are the step's nodes, regrouped: they fit in the profiled step (which also holds
    # the callbacks themselves)
    assert 0 < sum(parts.values()) <= 1.05 * x["ms_per_token_profiled"]
    assert "scores from the anchor layer's own scores" in (tmp_path / "PROFILE.md").read_text()


def test_profile_splits_a_quest_step(tmp_path):
    """vp5+ (Quest pages below the anchor; on Gemma 3 270M layer 5): its parts beside the others."""
    r = _run("--profile", "192", "--profile-mode", "vp5+", "--steps", "2", "-fa", "on", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    x = json.loads((tmp_path / "profile.json").read_text())[0]
    parts = x["parts_ms"]
    assert all(parts[f"Quest {k}"] > 0 for k in ("bounds", "selection", "masks / gathers"))
    assert parts["Quest summaries"] == 0  # made once, on the first step: not in the steps after it
    assert x["summaries_once_ms"] > 0
    assert parts["attention, Quest layers (1: kept pages)"] > 0  # layer 5, the one full-attention layer below 11
    assert 0 < sum(parts.values()) <= 1.05 * x["ms_per_token_profiled"]
    md = (tmp_path / "PROFILE.md").read_text()
    assert "VisionPulse 5, Quest pages below the anchor" in md and "made once" in md
