"""llama.cpp's RPC backend: a model's layers split over ``rpc-server`` hosts (``--rpc host:port,...``).

Each host runs ``vp-gguf rpc-server`` (the pinned tree's ``ggml-rpc-server``); the client names the
servers, and ``n_gpu_layers`` offloads layers to them as it would to local GPUs: RPC devices first,
then local GPUs, split by their free memory (llama.cpp's order). Servers are passed to the model as
its device list rather than registered process-wide, so that a model loaded later without ``rpc``
stays on this machine.

Failures are errors naming the host, never an abort: an unreachable server is refused before
llama.cpp connects (a TCP connect bounded by ``CONNECT_TIMEOUT_S``), and a server lost mid-generation
(patch 0006 marks it) fails the step that needed it and every later one with RpcError; the model must
be loaded again once the host is back.
"""

from __future__ import annotations

import ctypes
import functools
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidArgumentError, RpcError

DEFAULT_PORT = 50052  # rpc-server's own default
CONNECT_TIMEOUT_S = 5.0
# IPv4 or a host name: ggml-rpc's transport connects over AF_INET only
_ENDPOINT = re.compile(r"^(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?):(?P<port>[0-9]{1,5})$")


def parse_servers(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``host:port`` endpoints from llama.cpp's ``--rpc`` text (comma-separated) or a list of them."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgumentError(f"an RPC server is a 'host:port' string, got {item!r}")
        ep = item.strip()
        m = _ENDPOINT.match(ep)
        if not m or not 1 <= int(m["port"]) <= 65535:
            raise InvalidArgumentError(
                f"RPC server {ep!r} is not host:port (IPv4 address or host name, port 1-65535), "
                f"e.g. 192.168.1.10:{DEFAULT_PORT}"
            )
        if ep in out:
            raise InvalidArgumentError(f"RPC server {ep} is named twice")
        out.append(ep)
    if not out:
        raise InvalidArgumentError("rpc names no server: give host:port[,host:port...]")
    return tuple(out)


@functools.cache
def _lib() -> ctypes.CDLL | None:
    """libggml-rpc of our build, or None when it was built with GGML_RPC=OFF."""
    from ._libs import optional_library

    lib = optional_library("ggml-rpc")
    if lib is None:
        return None
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_server_lost.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_server_lost.restype = ctypes.c_bool
    return lib


def supported() -> bool:
    return _lib() is not None


def server_binary() -> Path:
    """The rpc-server built with the libraries (installed beside them)."""
    from ._libs import lib_dir

    return Path(lib_dir()) / ("ggml-rpc-server.exe" if sys.platform == "win32" else "ggml-rpc-server")


def _check_reachable(endpoint: str) -> None:
    host, port = endpoint.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        why = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise RpcError(f"RPC server {endpoint}: cannot connect ({why}); is `vp-gguf rpc-server` running there?") from e


def devices(endpoints: Sequence[str]) -> list[int]:
    """The ggml devices of these servers (connecting to each), in order."""
    from . import _log, gpu  # here: parsing --rpc must not load the libraries

    lib, ggml = _lib(), gpu.ggml()
    if lib is None or ggml is None:
        raise RpcError("this build of llama.cpp has no RPC backend: rebuild without CMAKE_ARGS=-DGGML_RPC=OFF")
    out: list[int] = []
    for ep in endpoints:
        _check_reachable(ep)
        _log.clear()
        reg = lib.ggml_backend_rpc_add_server(ep.encode())
        if not reg or lib.ggml_backend_rpc_server_lost(ep.encode()):
            why = (_log.last_error() or "no device").strip()
            raise RpcError(f"RPC server {ep}: {why}")
        out += [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return out


def lost(endpoints: Sequence[str]) -> list[str]:
    """The servers among these whose connection was lost (or never made)."""
    lib = _lib()
    return [ep for ep in endpoints if lib is not None and lib.ggml_backend_rpc_server_lost(ep.encode())]
