"""``vp-gguf rpc-server``: llama.cpp's rpc-server, built from the pinned tree with our libraries.

Run one on each host that lends its memory and compute to a model; the client names them with
``--rpc host:port,...`` (``run``, ``chat``, ``serve``) or ``rpc=`` in Python. The protocol has no
authentication or encryption: bind a trusted network's address only (the default is loopback).
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_common import MAX_THREADS, UsageError, _int_in
from .rpc import DEFAULT_PORT

EPILOG = """example (two hosts lend their CPU; the client offloads every layer to them):
  host1$ vp-gguf rpc-server -H 0.0.0.0 -p 50052
  host2$ vp-gguf rpc-server -H 0.0.0.0 -p 50052
  client$ vp-gguf run -m model.gguf --mmproj mmproj.gguf --rpc host1:50052,host2:50052 -ngl all --image cat.png -p "What is this?"
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rpc-server",
        help="lend this host to a model split over several (llama.cpp's rpc-server)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-H", "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    p.add_argument("-p", "--port", type=_int_in(1, 65535), default=DEFAULT_PORT, help=f"(default {DEFAULT_PORT})")
    p.add_argument(
        "-t", "--threads", type=_int_in(1, MAX_THREADS), default=None, help="CPU threads (default: all cores)"
    )
    p.add_argument("-d", "--device", default=None, help="devices to serve, comma-separated (default: all)")
    p.add_argument("-c", "--cache", action="store_true", help="cache weights on local disk for faster reloads")


def cmd(a: argparse.Namespace) -> int:
    """Replace this process by the server: its signals and exit status are the server's own."""
    from .rpc import server_binary

    exe = server_binary()
    if not exe.is_file():
        raise UsageError("this build has no rpc-server: rebuild without CMAKE_ARGS=-DGGML_RPC=OFF")
    argv = [str(exe), "-H", a.host, "-p", str(a.port), "-t", str(a.threads or os.cpu_count() or 1)]
    if a.device:
        argv += ["-d", a.device]
    if a.cache:
        argv.append("-c")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(exe), argv)
