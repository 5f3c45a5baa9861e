"""Our C++ test programs (CMake targets built with the oracle's tools), run to completion."""

from __future__ import annotations

import subprocess


def run_tool(target: str, *args: str, timeout: float = 1200) -> tuple[int, str]:
    """Build `target` (scripts/build_tools.py) and run it: its exit status and all it printed."""
    import build_tools

    exe = build_tools.build(target=target)
    r = subprocess.run([str(exe), *args], check=False, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr
