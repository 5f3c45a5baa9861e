"""Upstream's test-llama-archs on our patched libllama: every architecture llama.cpp knows still
builds its graph and runs (our hooks sit in every architecture's attention)."""

from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_every_architecture_runs_on_the_patched_tree():
    import build_tools

    exe = build_tools.build(target="vp-test-llama-archs")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Summary: all" in out and "passed" in out, out[-2000:]
