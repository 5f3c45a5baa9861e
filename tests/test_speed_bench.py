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


@pytest.mark.parametrize("fa", ["on", "off"])
def test_table_json_and_plot(tmp_path, fa):
    r = _run("--sizes", "192", "--reps", "1", "--steps", "2", "--modes", "dense,vp5,vp5-gather,floor",
             "--prefill-sizes", "64", "--prefill-reps", "1", "-fa", fa, "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())["results"]["gemma"]
    assert res["flash_attn"] == fa
    row = res["sizes"]["192"]
    assert set(row) == {"dense", "vp5", "vp5-gather", "floor"}
    assert row["dense"]["speedup"] == 1.0 and row["dense"]["path"] == "-"
    assert row["vp5-gather"]["path"] == "gather"
    assert row["vp5"]["path"] == ("mask" if fa == "on" else "gather")  # auto on CPU
    assert 0 < row["vp5"]["retention_mean"] < 1 and row["floor"]["retention_mean"] == 1.0
    assert res["prefill"]["64"]["ratio"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| 192 | vp5-gather | gather |" in md and ("V is read whole" in md) == (fa == "off")
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
