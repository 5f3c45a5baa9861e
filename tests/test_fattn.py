"""Our CPU flash-attention decode kernel (cpp/ggml-cpu/vp-fattn.cpp) against upstream's, in the
style of llama.cpp's test-backend-ops: head dims 64/128/256, GQA 1/2/4/8, F16 and Q8_0 KV, KV
lengths 1..64K, masks with VisionPulse's holes, soft-capping and sinks, 1-3 threads
(tests/cpp/test-vp-fattn.cpp)."""

from __future__ import annotations

import subprocess


def test_kernel_matches_upstream_flash_attention():
    import build_tools

    exe = build_tools.build(target="vp-test-vp-fattn")
    r = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    summary = [line for line in out.splitlines() if line.startswith("vp-fattn:")]
    assert summary, out[-2000:]
    passed, total = map(int, summary[0].split()[1].split("/"))
    assert passed == total and total > 1000, summary[0]
