"""The CLI never shows a traceback: a bad flag or input is one line on stderr and a non-zero exit (issue 16)."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vp(*args, stdin: str | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """The checkout's CLI in a subprocess (PYTHONPATH: this source tree, not the installed copy)."""
    e = {k: v for k, v in os.environ.items() if k != "VP_GGUF_TRACEBACK"}
    e.update(PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "vp_gguf.cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=e)


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    err = r.stderr.strip()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("vp-gguf") and "error:" in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, idat: bytes) -> bytes:
    """A PNG file of the given header and pixel stream, valid chunk by chunk (CRCs right)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture
def bomb(tmp_path) -> Path:
    """A 57-byte PNG that claims 30000x30000 pixels: Pillow refuses it as a decompression bomb."""
    p = tmp_path / "bomb.png"
    p.write_bytes(png(30000, 30000, zlib.compress(b"")))
    return p


@pytest.fixture
def bad_pixels(tmp_path) -> Path:
    """A PNG whose header and checksums are right but whose pixel stream does not inflate."""
    p = tmp_path / "bad-pixels.png"
    p.write_bytes(png(8, 8, b"\x78\x9c" + bytes(range(7, 90))))
    return p


# flag, bad value: each refused when the command line is read, the flag named, the range said
BAD_FLAGS = [
    ("-c", "0"), ("-c", "4294967596"), ("-c", "abc"), ("-n", "-5"), ("-n", "1.5"), ("--temp", "nan"),
    ("--temp", "-1"), ("-b", "0"), ("-t", "0"), ("-t", "100000"), ("--top-k", "-1"), ("--top-p", "1.5"),
    ("--min-p", "-0.1"), ("--seed", "-1"), ("--seed", "4294967296"), ("-ngl", "-2"), ("--video-fps", "0"),
    ("--video-max-frames", "0"), ("--video-timestamp-interval", "-1"), ("--vp-tau", "inf"),
    ("--vp-budget-min", "0"), ("--vp-budget-max", "nan"), ("--vp-ratio", "1.5"), ("--vp-anchor", "-1"),
    ("--vp-anchor", "4294967297"), ("--vp-seed", "-1"), ("--vp-min-pruned-layers", "-1"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_run_refuses_a_bad_number_in_one_line(tiny_paths, images, flag, value):
    model, mmproj = tiny_paths("llava")
    r = vp("run", "-m", model, "--mmproj", mmproj, "--image", images["a"], "-p", "x", "-n", 2, "-t", 2,
           "--visionpulse", "5", flag, value)
    assert_one_line_error(r, 2, flag, value)


VIZ = ["viz", "-p", "x", "--image", "IMAGE", "--visionpulse", "5", "-o", "OUT"]
USAGE_ERRORS = [  # each names its flag; IMAGE an image, ITEMS an eval file of two items, OUT a fresh folder
    (["chat", "-c", "0"], "--ctx-size"),
    ([*VIZ, "--frames", "0"], "--frames"),
    ([*VIZ, "--every", "-3"], "--every"),
    (["eval", "ITEMS", "--limit", "-1", "--modes", "dense", "-o", "OUT"], "--limit"),
    (["serve", "--port", "99999"], "--port"),
    (["serve", "--port", "0"], "--port"),
    (["run", "--bogus-flag", "-p", "x", "--image", "IMAGE"], "--bogus-flag"),
    (["run"], "-p/--prompt"),  # a required flag left out
]


@pytest.mark.parametrize(("args", "flag"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_other_usage_errors_are_one_line(tiny_paths, images, tmp_path, args, flag):
    model, mmproj = tiny_paths("llava")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(f'{{"id": "q{i}", "image": "{images["a"]}", "question": "x", "answer": "y"}}\n'
                             for i in range(2)))
    args = [{"IMAGE": images["a"], "ITEMS": items, "OUT": tmp_path / "out"}.get(x, x) for x in args]
    r = vp(*args, "-m", model, "--mmproj", mmproj, "-n", 2, "-t", 2, timeout=30)
    assert_one_line_error(r, 2, flag)


def test_a_bomb_image_is_one_line_not_a_traceback(tiny_paths, bomb):
    model, mmproj = tiny_paths("llava")
    r = vp("run", "-m", model, "--mmproj", mmproj, "--image", bomb, "-p", "x", "-n", 2, "-t", 2)
    assert_one_line_error(r, 1, "pixels")


def test_chat_session_survives_bad_media(tiny_paths, images, bomb, bad_pixels, tmp_path):
    """Each bad attachment is one error line; a turn whose image fails to decode is dropped with it,
    and the next turn is answered: the session and the model go on."""
    model, mmproj = tiny_paths("llava")
    (tmp_path / "text.png").write_text("not an image")
    script = "\n".join([
        f"/image {bomb}",
        f"/image {tmp_path / 'missing.png'}",
        f"/image {tmp_path / 'text.png'}",
        f"/video {tmp_path / 'missing.mp4'}",
        "/video",
        f"/image {bad_pixels}",  # its header is fine: it fails when the turn decodes it
        "Describe it.",
        "Hello?",
        "/quit",
    ]) + "\n"
    r = vp("chat", "-m", model, "--mmproj", mmproj, "-n", 3, "-c", 512, "-t", 2, stdin=script)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    errors = [x for x in r.stderr.splitlines() if x.startswith("vp-gguf: error:")]
    assert len(errors) == 6, r.stderr
    assert "bomb.png: too many pixels" in errors[0] and "missing.png: no such file" in errors[1]
    assert "text.png: cannot be read" in errors[2] and "missing.mp4: no such file" in errors[3]
    assert "bad-pixels.png" in errors[5] and "turn dropped with its 1 attachment" in r.stderr
    assert r.stdout.strip()  # "Hello?" was answered: the bad image did not stay attached


def test_main_reports_every_error_in_one_line(monkeypatch, capsys):
    """In-process: the catch-all of main() for what a command raises."""
    from vp_gguf import cli
    from vp_gguf.errors import ModelFileError

    def raising(exc):
        def cmd(a):
            raise exc
        return cmd

    monkeypatch.delenv("VP_GGUF_TRACEBACK", raising=False)
    cases = [
        (ModelFileError("model.gguf: truncated\nget it again"), 1, "vp-gguf: error: model.gguf: truncated get it again"),
        (FileNotFoundError(2, "No such file or directory", "x.jsonl"), 1, "vp-gguf: error: x.jsonl: No such file"),
        (ValueError("bad value"), 1, "vp-gguf: error: bad value"),
        (RuntimeError("a bug"), 1, "vp-gguf: error: RuntimeError: a bug (run with -v"),
        (KeyboardInterrupt(), 130, None),
    ]
    for exc, code, line in cases:
        monkeypatch.setitem(cli.COMMANDS, "models", raising(exc))
        assert cli.main(["models"]) == code
        err = capsys.readouterr().err
        if line is None:
            assert err == ""
        else:
            assert len(err.strip().splitlines()) == 1 and err.startswith(line), err
    monkeypatch.setenv("VP_GGUF_TRACEBACK", "1")
    monkeypatch.setitem(cli.COMMANDS, "models", raising(RuntimeError("a bug")))
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "vp-gguf: error: RuntimeError: a bug"
    monkeypatch.delenv("VP_GGUF_TRACEBACK")
    monkeypatch.setitem(cli.COMMANDS, "run", raising(RuntimeError("a bug")))
    assert cli.main(["run", "-p", "x", "-v"]) == 1  # -v, the flag of the model commands, shows it too
    assert "Traceback" in capsys.readouterr().err
