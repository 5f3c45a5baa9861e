"""`vp-gguf eval` resumes past a torn last row and locks its output folder (issue 16)."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vp_gguf.evaluate import EvalItem, run_eval
from vp_gguf.runs import FolderBusyError, lock_folder, read_log

ROOT = Path(__file__).resolve().parents[1]
MODES = ["dense", "visionpulse-5"]


def vp(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_read_log_cuts_a_torn_last_line(tmp_path, capsys):
    log = tmp_path / "results.jsonl"
    good = '{"id": "a", "mode": "dense"}\n\n{"id": "b", "mode": "dense"}\n'
    log.write_text(good + '{"id": "c", "mo')  # the process died in the middle of this write
    assert [n for n, _ in read_log(log)] == [1, 3]
    assert log.read_text() == good  # cut off the file: the next row starts on a line of its own
    assert "results.jsonl:4: a torn last line" in capsys.readouterr().err
    log.write_text('{"id": "a", "mode": "dense"}')  # a whole last row without its newline gets one
    assert [r for _, r in read_log(log)] == [{"id": "a", "mode": "dense"}] and log.read_text().endswith("}\n")
    log.write_text('{"id": "a", "mode": "dense"}\n{"id": "b\n{"id": "c", "mode": "dense"}\n')
    with pytest.raises(ValueError, match=r"results.jsonl:2: not JSON"):
        read_log(log)  # a bad line before good ones is no crash's doing: named, not skipped


@pytest.fixture
def item(images) -> EvalItem:
    return EvalItem("q", [images["a"]], "Describe.", "x", max_tokens=3)


def test_eval_resumes_past_a_torn_row(load_model, item, tmp_path):
    m, out = load_model("llava"), tmp_path / "out"
    first = run_eval(m, [item], MODES, out, progress=False)
    log = out / "results.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text(lines[0] + lines[1][:25])  # the second row torn by a crash
    rows = run_eval(m, [item], MODES, out, progress=False)
    assert [r["mode"] for r in rows] == MODES and rows[0] == first[0]  # only the torn row ran again
    assert [json.loads(x)["mode"] for x in log.read_text().splitlines()] == MODES


def test_a_bad_row_names_the_file_and_line(tiny_paths, images, tmp_path):
    model, mmproj = tiny_paths("llava")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "q", "image": str(images["a"]), "question": "x", "answer": "y"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    row = json.dumps({"id": "q", "mode": "dense", "correct": False}) + "\n"
    for bad in ("{not json\n", "[1, 2]\n"):
        (out / "results.jsonl").write_text(row + bad + row)
        r = vp("eval", items, "-m", model, "--mmproj", mmproj, "-t", 2, "--modes", "dense", "-o", out)
        err = r.stderr.strip()
        assert r.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert f"{out / 'results.jsonl'}:2:" in err, err


def test_a_second_eval_on_a_busy_folder_is_refused(tiny_paths, images, tmp_path):
    """Another process holds the folder's lock: the eval stops at once, its rows never mix in."""
    model, mmproj = tiny_paths("llava")
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "q", "image": str(images["a"]), "question": "x", "answer": "y"}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    args = ("eval", items, "-m", model, "--mmproj", mmproj, "-t", 2, "-n", 2, "--modes", "dense", "-o", out)
    with open(out / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = vp(*args)
    err = r.stderr.strip()
    assert r.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert str(out) in err and "another eval is writing to this folder" in err
    assert not (out / "results.jsonl").exists()
    again = vp(*args)  # the lock went with its holder
    assert again.returncode == 0, again.stderr
    assert len((out / "results.jsonl").read_text().splitlines()) == 1


def test_lock_is_per_thread_and_reentrant(load_model, item, tmp_path):
    m, out = load_model("llava"), tmp_path / "out"
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            run_eval(m, [item], ["dense"], out, progress=False)
        except FolderBusyError as e:
            errors.append(e)

    with lock_folder(out, "eval"):
        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert len(errors) == 1 and not (out / "results.jsonl").exists()
        assert len(run_eval(m, [item], ["dense"], out, progress=False)) == 1  # its holder may run in it
