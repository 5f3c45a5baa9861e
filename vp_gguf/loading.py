"""Loading a vision-language model: its files checked, then the model, a context and the projector.

Wrong, truncated or mismatched files are caught here, before the C loaders see them; what the
loaders still refuse comes back as a ModelFileError with llama.cpp's own message.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _log, gguf_check, gpu, rpc
from ._libs import llama_cpp as L
from ._libs import mtmd_cpp as M
from .errors import InvalidArgumentError, ModelFileError, ProjectorMismatchError, ResourceLimitError, RpcError
from .gguf_file import read_gguf_info
from .gpu import GpuLayers
from .sampling import INT32_MAX, int_arg

DEFAULT_MARKER = "<__media__>"
FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type ids
# llama.cpp pads n_ctx up to a multiple of 256 in a uint32 and counts positions in an int32: the largest
# n_ctx whose padded size still fits a position (2**32 + 300 would wrap to 300, 2**32 - 1 pad to 0)
MAX_N_CTX = 2**31 - 256
LLAMA_MAX_SEQ = 256  # llama-cparams.h: a context holds at most this many sequences
GGML_MAX_N_THREADS = 512  # ggml.h: more threads overrun ggml's fixed per-thread arrays (a segfault)


def max_threads() -> int:
    """The most threads a model may use: 4x the CPUs (more only thrash; 20000 hung thread creation), within ggml's cap."""
    return min(GGML_MAX_N_THREADS, 4 * (os.cpu_count() or 1))


# projectors whose image tokens attend to each other (non-causally): an image must fit one ubatch
NON_CAUSAL_IMAGE_PROJECTORS = {"gemma3", "gemma4v", "gemma4uv", "deepseek4v"}


@dataclass
class ModelParams:
    """Load-time settings; names follow llama-cpp-python's ``Llama`` arguments."""

    n_ctx: int = 4096
    n_batch: int = 2048  # logical batch; image chunks are decoded in pieces of this size
    n_ubatch: int = 512  # physical batch (llama.cpp's default); raised for non-causal images
    n_threads: int | None = None  # None: all cores
    # layers on the GPU: a count (-1: all), "all", or "auto" (all that fit: vp_gguf.gpu); 0 on a CPU build
    n_gpu_layers: GpuLayers = 0
    flash_attn: str = "auto"  # "on" | "off" | "auto"
    mmproj_use_gpu: bool = True  # the projector follows n_gpu_layers != 0 unless this is False
    warmup: bool = True  # run the projector once at load, as llama.cpp's tools do
    verbose: bool = False  # llama.cpp's logs on stderr
    n_seq_max: int = 1  # sequences one context can hold (for multi-sequence use)
    kv_unified: bool = True  # one KV stream for all sequences (False: one per sequence)
    type_k: str = "f16"  # KV cache types: "f16" or "q8_0" (quantized V needs flash attention)
    type_v: str = "f16"
    # llama.cpp's --swa-full: sliding-window layers keep the whole context, so that a conversation's
    # earlier turns stay reusable however long the window has moved on (costs their full-size cache)
    swa_full: bool = False
    # llama.cpp's cb_eval: a ggml_backend_sched_eval_callback called for graph nodes (tests read tensors
    # with it: tests/support/capture.py; profilers time nodes); the model keeps it alive
    cb_eval: Any = None
    # the chat template of chat_template=True, chat and the server: one of llama.cpp's names
    # ("chatml", "gemma", ...) or a Jinja file (llama.cpp's --chat-template); None: the model's own
    chat_template: str | None = None
    # llama.cpp's --rpc: rpc-server hosts ("host:port,host:port" or a list) that n_gpu_layers offloads
    # to, before any local GPU (vp_gguf.rpc)
    rpc: str | Sequence[str] | None = None
    # llama.cpp's --repack / --no-repack: CPU weights in the layouts of its faster kernels (False keeps
    # the file's layout, whose kernels an RPC server runs: its results then match this machine's)
    repack: bool = True

    def check(self) -> None:
        """Refuse (InvalidArgumentError, a ValueError) settings the C side would wrap, crash or hang on;
        the KV cache's size against the machine's memory is checked at load (check_kv_fits)."""
        int_arg("n_ctx", self.n_ctx, 16, MAX_N_CTX)
        int_arg("n_batch", self.n_batch, 1, INT32_MAX)
        int_arg("n_ubatch", self.n_ubatch, 1, INT32_MAX)
        if self.n_threads is not None:
            int_arg("n_threads", self.n_threads, 1, max_threads(), f"at most 4x the {os.cpu_count() or 1} CPUs")
        if self.n_gpu_layers not in (gpu.AUTO, gpu.ALL):
            int_arg("n_gpu_layers", self.n_gpu_layers, -1, INT32_MAX, '-1 or "all": all; "auto": what fits')
        int_arg("n_seq_max", self.n_seq_max, 1, LLAMA_MAX_SEQ)
        for name in ("type_k", "type_v"):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in KV_TYPES:
                raise InvalidArgumentError(f"{name} must be one of {sorted(KV_TYPES)}")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise InvalidArgumentError("chat_template must be a template's name or file, or None")
        if self.rpc is not None:
            rpc.parse_servers(self.rpc)
        if not isinstance(self.repack, bool):
            raise InvalidArgumentError(f"repack must be True or False, got {self.repack!r}")
        if not isinstance(self.flash_attn, str) or self.flash_attn not in FLASH_ATTN:
            raise InvalidArgumentError(f"flash_attn must be one of {sorted(FLASH_ATTN)}, got {self.flash_attn!r}")


KV_BYTES_PER_ELEMENT = {"f16": 2.0, "q8_0": 34 / 32}  # q8_0: blocks of 32 int8 and one f16 scale


def _meta_int(model: Any, key: str) -> int | None:
    buf = ctypes.create_string_buffer(64)
    if L.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) < 0:
        return None
    try:
        return int(buf.value)
    except ValueError:
        return None


def kv_cache_bytes(model: Any, p: ModelParams, n_gpu: int = 0) -> int:
    """The host memory a context of these settings takes for its KV cache, as an upper bound: every
    layer left on the CPU at the full padded context. llama.cpp gives sliding-window layers less
    (n_swa + n_ubatch cells), but which layers slide is set per architecture in its code and no API
    says it: they are counted in full, on the safe side (Gemma 3 at 128K: about 6x its real cache)."""
    n_layer = int(L.llama_model_n_layer(model))
    head_dim = int(L.llama_model_n_embd(model)) // max(1, int(L.llama_model_n_head(model)))
    buf = ctypes.create_string_buffer(64)
    L.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
    arch = buf.value.decode(errors="replace")
    k_len = _meta_int(model, f"{arch}.attention.key_length") or head_dim
    v_len = _meta_int(model, f"{arch}.attention.value_length") or head_dim
    pad = 256  # llama_context pads n_ctx (each sequence's share when not unified) to 256 cells
    n_cells = -(-p.n_ctx // pad) * pad
    if not p.kv_unified:
        n_cells = -(-(p.n_ctx // p.n_seq_max) // pad) * pad * p.n_seq_max
    # n_gpu counts the output layer as one; the last layers go to the GPU, their KV with them
    n_cpu = max(0, min(n_layer, n_layer + 1 - n_gpu))
    per_cell = int(L.llama_model_n_head_kv(model)) * (
        k_len * KV_BYTES_PER_ELEMENT[p.type_k] + v_len * KV_BYTES_PER_ELEMENT[p.type_v]
    )
    return int(n_cells * n_cpu * per_cell)


def available_memory() -> int | None:
    """Bytes of memory the system can still give without swapping (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_kv_fits(model: Any, p: ModelParams, path: Path, n_gpu: int = 0) -> None:
    """Refuse a context whose KV cache would not fit in memory, before llama.cpp allocates and clears it
    (n_ctx=2e9 grew a process to 20 GB and woke the out-of-memory killer)."""
    need, have = kv_cache_bytes(model, p, n_gpu), available_memory()
    if have is not None and need > have:
        raise ResourceLimitError(
            f"n_ctx={p.n_ctx} needs a KV cache of {need / 2**30:.2f} GiB for {path.name} but only "
            f"{have / 2**30:.2f} GiB of memory is available: lower n_ctx (or use type_k/type_v='q8_0')"
        )


class LoadedModel:
    """The native handles of one model: llama_model, its vocab, a llama_context and the mtmd context."""

    def __init__(self, model_path: str | os.PathLike, mmproj_path: str | os.PathLike, params: ModelParams) -> None:
        self.model_path, self.mmproj_path, self.params = Path(model_path), Path(mmproj_path), params
        params.check()
        _log.install(params.verbose)
        self._model: Any = None
        self._ctx: Any = None
        self._mctx: Any = None
        self._chat_templates: dict = {}  # chat template spec -> the chosen template (prompt.chat_template_of)
        self._kv_units: list = []  # what the KV cache holds, as decoding.prompt_units describes it
        self.rpc_servers: tuple[str, ...] = rpc.parse_servers(params.rpc) if params.rpc is not None else ()
        self.rpc_lost: str | None = None  # the error once a server was lost: the model is unusable then
        self._devices: Any = None  # the device list llama_model_params points to, kept alive
        self._check_files()
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _check_files(self) -> None:
        """Catch wrong, truncated or mismatched files before the C loaders see them."""
        info = read_gguf_info(self.model_path)
        if info.architecture == "clip":
            raise ModelFileError(
                f"{self.model_path} is a multimodal projector (mmproj), not a "
                "language model: pass it as mmproj_path / --mmproj"
            )
        proj = read_gguf_info(self.mmproj_path)
        if proj.architecture != "clip":
            raise ModelFileError(
                f"{self.mmproj_path} is not a multimodal projector (mmproj) "
                f"but a '{proj.architecture}' model; pass the mmproj GGUF that "
                "belongs to the language model"
            )
        if not proj.get("clip.has_vision_encoder", True):
            raise ModelFileError(f"{self.mmproj_path} has no vision encoder (audio-only projector)")
        # what llama.cpp's loaders assert or dereference, refused here instead of crashing there
        gguf_check.check_language_model(info)
        gguf_check.check_projector(proj)
        self.architecture = info.architecture
        self._n_layer = int(info.get(f"{info.architecture}.block_count", 0))  # checked above
        self.projector_type = proj.get("clip.projector_type") or proj.get("clip.vision.projector_type")
        n_embd = info.get(f"{info.architecture}.embedding_length")
        n_proj = proj.get("clip.vision.projection_dim")
        if n_embd and n_proj and int(n_embd) != int(n_proj):
            raise ProjectorMismatchError(
                f"{self.mmproj_path.name} projects images to {n_proj}-dim embeddings but "
                f"{self.model_path.name} has embedding size {n_embd}: this mmproj belongs to "
                "another model; use the mmproj published with this model"
            )

    def _load(self) -> None:
        p = self.params
        _log.clear()
        n_threads = p.n_threads or min(os.cpu_count() or 1, GGML_MAX_N_THREADS)
        mp = L.llama_model_default_params()
        weights = self.model_path.stat().st_size + (self.mmproj_path.stat().st_size if p.mmproj_use_gpu else 0)
        if self.rpc_servers:
            self._use_rpc_devices(mp, weights)
        else:
            self.n_gpu_layers = gpu.layers_to_offload(p.n_gpu_layers, self._n_layer, weights)
        mp.n_gpu_layers = self.n_gpu_layers
        mp.use_extra_bufts = bool(p.repack)
        self._model = L.llama_model_load_from_file(str(self.model_path).encode(), mp)
        if not self._model:
            self.check_rpc()
            raise ModelFileError(f"llama.cpp could not load {self.model_path}: {_log.last_error() or 'unknown error'}")
        self._vocab: Any = L.llama_model_get_vocab(self._model)
        check_kv_fits(self._model, p, self.model_path, self.n_gpu_layers)

        cp = L.llama_context_default_params()
        cp.n_ctx = p.n_ctx
        cp.n_batch = p.n_batch
        cp.n_ubatch = p.n_ubatch
        if self.projector_type in NON_CAUSAL_IMAGE_PROJECTORS:
            cp.n_ubatch = p.n_batch  # an image is attended non-causally: it must fit one ubatch
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.flash_attn_type = FLASH_ATTN[p.flash_attn]
        cp.no_perf = True
        cp.n_seq_max = p.n_seq_max
        cp.kv_unified = p.kv_unified
        cp.type_k, cp.type_v = KV_TYPES[p.type_k], KV_TYPES[p.type_v]
        cp.swa_full = p.swa_full
        self._cb_eval = p.cb_eval
        if p.cb_eval is not None:
            cp.cb_eval = p.cb_eval
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise ModelFileError(
                f"llama.cpp could not create a context for {self.model_path} "
                f"(n_ctx={p.n_ctx}): {_log.last_error() or 'unknown error'}"
            )
        self.n_ctx: int = int(L.llama_n_ctx(self._ctx))
        self.n_batch: int = int(L.llama_n_batch(self._ctx))
        self.n_ubatch: int = int(L.llama_n_ubatch(self._ctx))

        mparams = M.mtmd_context_params_default()
        mparams.use_gpu = bool(p.mmproj_use_gpu and self.n_gpu_layers != 0)
        mparams.n_threads = n_threads
        mparams.print_timings = False
        mparams.flash_attn_type = FLASH_ATTN[p.flash_attn]
        mparams.warmup = p.warmup
        self._mctx = M.mtmd_init_from_file(str(self.mmproj_path).encode(), self._model, mparams)
        if not self._mctx:
            err = _log.last_error() or "unknown error"
            if "mismatch between text model" in err:
                raise ProjectorMismatchError(
                    f"{self.mmproj_path.name} does not belong to {self.model_path.name}: {err.strip()}"
                )
            raise ModelFileError(f"libmtmd could not load the projector {self.mmproj_path}: {err.strip()}")
        if not M.mtmd_support_vision(self._mctx):
            raise ModelFileError(f"{self.mmproj_path} does not support image input")
        self.marker: str = (M.mtmd_default_marker() or DEFAULT_MARKER.encode()).decode()

    def _use_rpc_devices(self, mp: Any, weights: int) -> None:
        """The model's devices: the RPC servers' first, then the local GPUs (llama.cpp's order when it
        finds them itself), given to this model alone."""
        if self.params.n_gpu_layers == 0:
            warnings.warn(
                "rpc servers are given but n_gpu_layers=0 offloads no layer to them: "
                "pass n_gpu_layers='all' (or 'auto', or a count)",
                stacklevel=5,
            )
        remote, local = rpc.devices(self.rpc_servers), gpu.local_devices()
        free = gpu.free_bytes(remote) + gpu.free_bytes(local)
        self.n_gpu_layers = gpu.layers_to_offload(self.params.n_gpu_layers, self._n_layer, weights, free, remote=True)
        devs = remote + local
        self._devices = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
        mp.devices = ctypes.cast(self._devices, ctypes.c_void_p)

    def check_rpc(self) -> None:
        """Raise RpcError if a server of this model was lost (then and at every later call)."""
        if self.rpc_lost is None and self.rpc_servers:
            gone = rpc.lost(self.rpc_servers)
            if gone:
                self.rpc_lost = (
                    f"RPC server {', '.join(gone)} was lost (the server stopped or its host is unreachable): "
                    "this model's layers there are gone; load the model again once it is back"
                )
        if self.rpc_lost is not None:
            raise RpcError(self.rpc_lost)

    def close(self) -> None:
        """Free the native model, context and projector (also done on garbage collection)."""
        if getattr(self, "_mctx", None):
            M.mtmd_free(self._mctx)
            self._mctx = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None
            self._vocab = None  # the model owned it

    @property
    def context(self):
        """The llama_context (a llama-cpp-python ctypes pointer): for llama.cpp calls of one's own."""
        return self._ctx

    @property
    def mtmd_context(self):
        """The libmtmd context of the projector."""
        return self._mctx

    @property
    def n_vocab(self) -> int:
        return int(L.llama_vocab_n_tokens(self._vocab))
