"""Our CPU flash-attention decode kernel (cpp/ggml-cpu/vp-fattn.cpp) against upstream's, in the
style of llama.cpp's test-backend-ops: head dims 64/128/256, GQA 1/2/4/8, F16 and Q8_0 KV, KV
lengths 1..64K, masks with VisionPulse's holes, soft-capping and sinks, 1-3 threads
(tests/cpp/test-vp-fattn.cpp)."""

from __future__ import annotations

import pytest

from support.native import run_tool

# builds the C++ test program with the oracle's tools (minutes the first time); `make test` runs it
pytestmark = pytest.mark.slow


def test_kernel_matches_upstream_flash_attention():
    rc, out = run_tool("vp-test-vp-fattn", timeout=900)
    assert rc == 0, out[-6000:]
    summary = [line for line in out.splitlines() if line.startswith("vp-fattn:")]
    assert summary, out[-2000:]
    passed, total = map(int, summary[0].split()[1].split("/"))
    assert passed == total and total > 1000, summary[0]
