"""Habits, checked by the test command: ruff (lint, format) and mypy on vp_gguf/, clang-format on our C++.

The tools are pinned in pyproject's `dev` extra (what `make` installs), so a new release of one
cannot turn this red; the settings live in pyproject.toml and .clang-format.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CPP = sorted(str(p.relative_to(ROOT)) for d in ("cpp/src", "cpp/include", "cpp/ggml-cpu") for p in (ROOT / d).glob("*.[ch]*"))

CHECKS = {
    "ruff-lint": [str(BIN / "ruff"), "check", "vp_gguf"],
    "ruff-format": [str(BIN / "ruff"), "format", "--check", "vp_gguf"],
    "mypy": [str(BIN / "mypy")],
    "clang-format": [str(BIN / "clang-format"), "--dry-run", "-Werror", *CPP],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_clean(name):
    cmd = CHECKS[name]
    assert Path(cmd[0]).exists(), f"{cmd[0]} is missing: `make install` puts the dev tools in .venv"
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-4000:]}{r.stderr[-4000:]}"


def test_every_cpp_file_is_checked():
    assert any(p.endswith("llama-vp-plan.cpp") for p in CPP) and any(p.endswith("llama-visionpulse.h") for p in CPP)


def test_the_testbed_imports_nothing_private():
    """The demo runs the testbed from an installed package: it leans only on public modules and names."""
    import ast

    bad = []
    for f in sorted((ROOT / "vp_gguf" / "testbed").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                parts = (node.module or "").split(".")
                names = [a.name for a in node.names]
                if any(p.startswith("_") for p in parts) or any(n.startswith("_") for n in names):
                    bad.append(f"{f.name}: from {'.' * node.level}{node.module} import {', '.join(names)}")
    assert not bad, bad


def test_no_test_helpers_ship():
    assert not (ROOT / "vp_gguf" / "testing").exists() and not (ROOT / "vp_gguf" / "_capture.py").exists()
