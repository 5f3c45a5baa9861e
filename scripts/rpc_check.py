#!/usr/bin/env python3
"""A model split over llama.cpp rpc-servers against the same model on this machine.

    python3 scripts/rpc_check.py -m model.gguf --mmproj mmproj.gguf --image cat.png --out docs/rpc
    python3 scripts/rpc_check.py ... --rpc host1:50052,host2:50052      # servers of your own

Without --rpc it starts --servers `vp-gguf rpc-server` processes on 127.0.0.1 (what tests/test_rpc.py
does). For each selection mode it generates greedily on this machine, then with every layer on the
servers, and reports whether the tokens and the per-step kept sets are equal, and which backend ran
each op the VisionPulse hooks built (VisionModel.trace_backends). Writes RPC.md and rpc.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vp_gguf import VisionModel, VisionPulse  # noqa: E402
from vp_gguf.cli_common import process_escapes  # noqa: E402

DEFAULT_PROMPT_ARG = r"<__media__>\nDescribe the picture."  # escapes processed, as vp-gguf run does
MODES = {
    "visionpulse (preset 5)": VisionPulse(),
    "fixed 5%": VisionPulse(mode="fixed", ratio=0.05),
    "random (preset 5)": VisionPulse(mode="random", seed=7),
    "static 5%": VisionPulse(mode="static", ratio=0.05),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_servers(n: int, threads: int = 1) -> Iterator[tuple[list[str], list[subprocess.Popen]]]:
    """n `vp-gguf rpc-server` processes on loopback, listening when this yields (endpoints, processes)."""
    ports = [_free_port() for _ in range(n)]
    cmd = [sys.executable, "-m", "vp_gguf.cli", "rpc-server", "-t", str(threads), "-p"]
    procs = [subprocess.Popen([*cmd, str(p)], cwd=ROOT, stdout=subprocess.DEVNULL) for p in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rpc-server on port {port} exited with {proc.returncode}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"rpc-server on port {port} never listened") from None
                    time.sleep(0.05)
        yield [f"127.0.0.1:{p}" for p in ports], procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def run_modes(m: VisionModel, prompt: str, image: str, n: int, min_pruned: int | None) -> dict[str, dict]:
    out = {}
    for name, vp in MODES.items():
        vp = dataclasses.replace(vp, min_pruned_layers=min_pruned)
        t0 = time.perf_counter()
        res = m.generate(prompt, images=[image], max_tokens=n, visionpulse=vp)
        steps = res.visionpulse.steps if res.visionpulse else []
        out[name] = {
            "tokens": res.tokens,
            "kept": [s.kept for s in steps],
            "retention": sum(s.retention for s in steps) / max(1, len(steps)),
            "ops": m.op_backends(),
            "seconds": time.perf_counter() - t0,
        }
    return out


def compare(args: argparse.Namespace, endpoints: list[str]) -> dict:
    kw = {"n_ctx": args.ctx_size, "n_threads": args.threads, "flash_attn": args.flash_attn}
    # the servers' kernels: weights in the file's layout (they never repack) and as many threads
    with VisionModel(args.model, args.mmproj, repack=False, **kw) as local:
        local.trace_backends()
        here = run_modes(local, process_escapes(args.prompt), args.image, args.n_predict, args.min_pruned_layers)
    with VisionModel(args.model, args.mmproj, rpc=endpoints, n_gpu_layers="all", **kw) as split:
        split.trace_backends()
        there = run_modes(split, process_escapes(args.prompt), args.image, args.n_predict, args.min_pruned_layers)
        n_layer = split.n_layer
    return {"endpoints": endpoints, "n_layer": n_layer, "local": here, "rpc": there}


def markdown(args: argparse.Namespace, r: dict) -> str:
    name = {ep: f"server {i + 1}" for i, ep in enumerate(r["endpoints"])}

    def short(backend: str) -> str:
        return next((f"{backend.split('[')[0]} ({name[ep]})" for ep in name if ep in backend), backend)

    lines = [
        "# A model split over RPC servers against one machine",
        "",
        f"`python3 scripts/rpc_check.py -m {Path(args.model).name} --mmproj {Path(args.mmproj).name} "
        f"--image {Path(args.image).name} -fa {args.flash_attn} -n {args.n_predict} -t {args.threads} "
        f"--servers {args.servers}"
        + (f" -p {shlex.quote(args.prompt)}" if args.prompt != DEFAULT_PROMPT_ARG else "")
        + (f" --min-pruned-layers {args.min_pruned_layers}" if args.min_pruned_layers is not None else "")
        + "`"
        f" on {platform.machine()}: {len(r['endpoints'])} servers on 127.0.0.1 with -t {args.threads}, every one of the "
        f"{r['n_layer']} layers and the output offloaded to them (`-ngl all`), greedy, {args.n_predict} tokens; "
        "here with as many threads and `--no-repack`, the kernels the servers run.",
        "",
        "| mode | tokens equal | kept sets equal | mean retention | seconds here | seconds over RPC |",
        "|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        a, b = r["local"][mode], r["rpc"][mode]
        lines.append(
            f"| {mode} | {a['tokens'] == b['tokens']} | {a['kept'] == b['kept']} | {b['retention']:.2f} "
            f"| {a['seconds']:.2f} | {b['seconds']:.2f} |"
        )
    ops = r["rpc"][next(iter(MODES))]["ops"]
    lines += [
        "",
        f"Which backend ran the ops VisionPulse built at the last step ({next(iter(MODES))}); "
        "count per backend:",
        "",
        "| op | " + " | ".join(short(ep) for ep in sorted({b for v in ops.values() for b in v})) + " |",
    ]
    backends = sorted({b for v in ops.values() for b in v})
    lines.append("|---|" + "---|" * len(backends))
    for op in sorted(ops):
        lines.append(f"| {op} | " + " | ".join(str(ops[op].get(b, "")) for b in backends) + " |")
    lines += [
        "",
        "Loopback RPC is slower than one process (every step crosses the sockets twice): RPC is for a",
        "model that does not fit one machine, not for speed; the seconds are for the record only.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--mmproj", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("-p", "--prompt", default=DEFAULT_PROMPT_ARG)
    ap.add_argument("-n", "--n-predict", type=int, default=12)
    ap.add_argument("-c", "--ctx-size", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int, default=2, help="here and on each local server (default 2)")
    ap.add_argument("-fa", "--flash-attn", choices=["on", "off", "auto"], default="auto")
    ap.add_argument(
        "--min-pruned-layers", type=int, default=None, help="VisionPulse's skip rule (0: never skip, for tiny models)"
    )
    ap.add_argument("--rpc", default=None, help="servers of your own (host:port,...) instead of local ones")
    ap.add_argument("--servers", type=int, default=2, help="local servers to start (default 2)")
    ap.add_argument("--out", default=None, help="folder for RPC.md and rpc.json (default: print)")
    args = ap.parse_args(argv)
    if args.rpc:
        r = compare(args, args.rpc.split(","))
    else:
        with local_servers(args.servers, args.threads) as (endpoints, _):
            r = compare(args, endpoints)
    text = markdown(args, r)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "RPC.md").write_text(text)
        (out / "rpc.json").write_text(json.dumps(r, indent=1) + "\n")
    print(text)
    ok = all(r["local"][m]["tokens"] == r["rpc"][m]["tokens"] and r["local"][m]["kept"] == r["rpc"][m]["kept"]
             for m in MODES)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
