#!/usr/bin/env python3
"""Decode speed with VisionPulse against the fastest dense setting (llama-bench-like).

    python3 scripts/speed_bench.py                  # both models -> docs/speed/
    python3 scripts/speed_bench.py --models gemma --sizes 576,4096 --reps 2 --out /tmp/sp

Per model and number of visual tokens N_v: a sequence of N_v visual cells followed by
256 text cells is put in the KV cache (a synthetic state with random K/V of the cache's
type, see tests/support/kv_state.py: a real 32K prefill would take an hour here), then
--steps tokens are decoded one by one in each run, runs interleaved, --reps times.

Dense is measured in every configuration a user could pick (CONFIGS: flash attention on
and off, F16 and Q8_0 KV), and with upstream's CPU flash-attention kernel instead of ours;
the fastest of them, per size, is the baseline of every speedup. VisionPulse 5 runs in
each configuration too; the other modes run in the default one (--config):

  vp5       VisionPulse preset 5 (attention path: auto)
  vp5-gather / vp5-mask   the same selection through each attention path (forced)
  fixed5    always 5% kept (the preset's upper budget: the most vp5 can cost)
  probe     the probe and the stats only (mode dense): what scoring costs
  vp5-lag   preset 5 plus the lagged selection below the anchor (opt-in)
  vp5+      preset 5 plus Quest pages below the anchor (opt-in): the pages' share follows the mass
  vp5+qN    the same with N% of the pages kept at every step (the speed side of the fidelity curve)
  floor     the same context without the visual cells (text only)

Prefill (real, token input) is timed at the --prefill-sizes with VisionPulse off and on.
Writes results.json, RESULTS.md and speed.png to --out.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import platform
import re
import statistics
import sys
from dataclasses import dataclass, replace
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic model and KV states: dev helpers, not shipped

from vp_gguf import VisionPulse  # noqa: E402
from vp_gguf import _vp_ctypes as V  # noqa: E402
from vp_gguf.visionpulse import ATTN_NAMES, comparison_spec  # noqa: E402
from vp_gguf._libs import llama_cpp as L  # noqa: E402
from vp_gguf.runs import Progress  # noqa: E402
from support import kv_state  # noqa: E402

# the speed bench's short names for modes of the one comparison table, and its variants of them:
# the same selection through each attention path, the probe alone, and the text-only floor
_TABLE = {"dense": "dense", "vp5": "visionpulse-5", "fixed5": "fixed-5%", "vp5-lag": "visionpulse-5-lagged",
          "vp5+": "visionpulse-5+"}
MODES: dict[str, VisionPulse | None] = {k: comparison_spec(v) for k, v in _TABLE.items()}
MODES.update({
    "vp5-mask": replace(MODES["vp5"], attn="mask"),
    "vp5-gather": replace(MODES["vp5"], attn="gather"),
    "probe": VisionPulse(mode="dense"),
    **{f"vp5+q{n}": replace(MODES["vp5+"], quest_budget_min=n / 100, quest_budget_max=n / 100)
       for n in (6, 12, 25, 50, 75)},
    "floor": None,
})


@dataclass(frozen=True)
class Config:
    """A dense configuration a user could pick: ModelParams' flash_attn and KV types."""
    flash_attn: str
    type_k: str = "f16"
    type_v: str = "f16"
    upstream_kernel: bool = False  # upstream's CPU flash-attention kernel instead of ours

    @property
    def context(self) -> tuple[str, str, str]:  # runs that differ only in the kernel share a context
        return self.flash_attn, self.type_k, self.type_v


# quantized V needs flash attention (llama.cpp), so without it only K is Q8_0
CONFIGS = {
    "fa-on": Config("on"),
    "fa-off": Config("off"),
    "fa-on-q8": Config("on", "q8_0", "q8_0"),
    "fa-off-q8k": Config("off", "q8_0", "f16"),
    "fa-on-upstream": Config("on", upstream_kernel=True),
}
KV_TYPES = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0}


@functools.cache
def _ggml_cpu() -> ctypes.CDLL:
    from vp_gguf._libdir import lib_dir
    lib = ctypes.CDLL(str(lib_dir() / ("libggml-cpu" + Path(L._lib._name).suffix)))
    lib.vp_fattn_set_enabled.argtypes = [ctypes.c_bool]
    return lib


def set_fattn_kernel(upstream: bool) -> None:
    """Our CPU flash-attention kernel on or off (cpp/ggml-cpu/vp-fattn.h), process-wide."""
    _ggml_cpu().vp_fattn_set_enabled(not upstream)


def model_path(name: str, cache: Path) -> tuple[Path, str]:
    if name == "synthetic":
        from support.speed_model import SPEC_NAME, build_speed_model
        p = cache / "qwen25vl3b-lm-random-q4k.gguf"
        if not p.exists():
            print(f"writing the synthetic model to {p} (once) ...", file=sys.stderr)
            build_speed_model(p.with_suffix(".tmp"))
            p.with_suffix(".tmp").rename(p)
        return p, SPEC_NAME
    if name == "gemma":
        from vp_gguf.testbed import assets
        return assets.gemma_path(), f"Gemma 3 270M Q4_K_M ({assets.PACKAGE})"
    raise SystemExit(f"unknown model {name!r}: synthetic | gemma")


class Runner:
    def __init__(self, path: Path, n_ctx: int, threads: int, flash_attn: str = "auto", cb_eval=None,
                 type_k: str = "f16", type_v: str = "f16", gpu: bool = False) -> None:
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 999 if gpu else 0
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        cp.n_seq_max = 1
        cp.no_perf = True
        if cb_eval is not None:
            cp.cb_eval = cb_eval
        cp.type_k, cp.type_v = KV_TYPES[type_k], KV_TYPES[type_v]
        cp.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                              "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"could not create a context of {n_ctx} for {path}")
        self.n_layer = L.llama_model_n_layer(self.model)
        self.n_swa = L.llama_model_n_swa(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.mem = L.llama_get_memory(self.ctx)
        self.decode_tokens([1, 2, 3, 4])  # the template: the real layout of this context's state
        self.caches = kv_state.parse_template(self.get_state(), self.n_layer)
        self.flash_attn = "on" if not any(c.v_trans for c in self.caches) else "off"

    def get_state(self) -> bytes:
        n = L.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_uint8 * n)()
        n = L.llama_state_seq_get_data(self.ctx, buf, n, 0)
        return bytes(buf[:n])

    def make_state(self, n_visual: int, n_text: int) -> bytes:
        n = n_visual + n_text
        cells, first = [n], [0]
        if len(self.caches) > 1:  # sliding-window cache: only the window is kept
            w = min(n, self.n_swa)
            cells, first = [n, w], [0, n - w]
        return kv_state.synth_state(self.caches, cells, first, seed=n)

    def load(self, state: bytes) -> None:
        L.llama_memory_clear(self.mem, True)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if L.llama_state_seq_set_data(self.ctx, buf, len(state), 0) != len(state):
            raise RuntimeError("llama_state_seq_set_data refused the synthetic state")

    def decode_tokens(self, toks: list[int]) -> None:
        arr = (L.llama_token * len(toks))(*toks)
        for i in range(0, len(toks), 512):
            n = min(512, len(toks) - i)
            rc = L.llama_decode(self.ctx, L.llama_batch_get_one(ctypes.cast(ctypes.byref(arr, 4 * i),
                                                                            ctypes.POINTER(L.llama_token)), n))
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")

    def set_mode(self, vp: VisionPulse | None, n_visual: int) -> None:
        V.llama_vp_disable(self.ctx)
        V.llama_vp_clear_marks(self.ctx, -1)
        V.llama_vp_reset(self.ctx, -1)
        V.llama_vp_begin_generation(self.ctx, -1)  # the state holds the prompt: every decode is a step
        if vp is not None and n_visual > 0:
            p = vp.to_c()
            if V.llama_vp_enable(self.ctx, ctypes.byref(p)) != 0:
                raise RuntimeError(V.last_error())
            V.llama_vp_mark_visual(self.ctx, 0, 0, n_visual)

    def run_decode(self, steps: int, quest: bool = False) -> tuple[float, list[float], list[float]]:
        """Time of the steps, and per step the kept share of the visual tokens and, with Quest, of its pages."""
        self.decode_tokens([11])  # warm-up step (caches, first graph), not timed
        ret, pages = [], []
        t0 = time.perf_counter()
        for i in range(steps):
            self.decode_tokens([(i * 7919) % self.n_vocab])
            st = V.llama_vp_stats()
            if V.llama_vp_get_stats(self.ctx, 0, ctypes.byref(st)) == 0 and st.n_visual:
                ret.append(st.n_kept / st.n_visual)
            share = V.quest_share(self.ctx, 0) if quest else None  # a call into C only where Quest is on
            if share is not None:
                pages.append(share)
        return time.perf_counter() - t0, ret, pages

    def prefill(self, n_tokens: int) -> float:
        L.llama_memory_clear(self.mem, True)
        toks = [(i * 104729) % self.n_vocab for i in range(n_tokens)]
        t0 = time.perf_counter()
        self.decode_tokens(toks)
        return time.perf_counter() - t0

    def close(self) -> None:
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)


# without flash attention: the scores, their softmax and the weighted sum of V (llama.cpp's names)
ATTN_NODE = re.compile(r"^(kq|kq_soft_max|kqv)-\d+$")


class NodeTimer:
    """cb_eval that asks for every node, so each is computed alone; the time between two
    callbacks is that node's. Nodes are grouped by layer (llama.cpp names them "<what>-<il>";
    unnamed ones belong to the layer being built) and by whether they are attention (flash
    attention, or the scores, softmax and weighted sum without it)."""

    def __init__(self) -> None:
        import ctypes as C
        from support.capture import _ggml
        _ggml.ggml_op_desc.argtypes = [C.c_void_p]
        _ggml.ggml_op_desc.restype = C.c_char_p
        self.rows: list[tuple[int, str, float]] = []  # (layer, kind: attention | other | a QUEST_PART, seconds)
        self.on = False
        self._t = 0.0
        self._layer = -1

        @L.ggml_backend_sched_eval_callback
        def cb(t, ask, user_data):
            if ask:
                return True
            now = time.perf_counter()
            name = (_ggml.ggml_get_name(t) or b"").decode()
            m = re.search(r"-(\d+)$", name)
            if m:
                self._layer = int(m.group(1))
            elif name.startswith(("inp_", "result")):  # the input embeddings, the output head
                self._layer = -1
            if self.on:
                kind = "other"
                if _ggml.ggml_op_desc(t) == b"FLASH_ATTN_EXT" or ATTN_NODE.match(name) is not None:
                    kind = "attention"
                elif name.startswith("vp_quest_"):
                    kind = QUEST_PARTS.get(name.split(" ")[0], "selection")
                self.rows.append((self._layer, kind, now - self._t))
            self._t = time.perf_counter()
            return True
        self.cb = cb

    def budget(self, anchor: int, n_layer: int, steps: int) -> dict[str, float]:
        att = [0.0] * n_layer
        other = [0.0] * n_layer
        parts = dict.fromkeys(dict.fromkeys(QUEST_PARTS.values()), 0.0)
        quest = {il for il, kind, _ in self.rows if kind in parts}  # the layers that kept Quest pages
        rest = 0.0
        for il, kind, dt in self.rows:
            if kind in parts:
                parts[kind] += dt
            elif 0 <= il < n_layer:
                (att if kind == "attention" else other)[il] += dt
            else:
                rest += dt
        base = statistics.median(other[:anchor]) if anchor > 0 else 0.0  # a plain layer's non-attention work
        ms = 1e3 / steps
        extra = [other[il] - base for il in range(anchor, n_layer)]  # unclipped: layer-to-layer noise cancels
        out = {"attention, dense layers (0..anchor)": sum(att[il] for il in range(anchor + 1) if il not in quest) * ms}
        if quest:
            out[f"attention, Quest layers ({len(quest)}: kept pages)"] = sum(att[il] for il in quest) * ms
            out.update({f"Quest {k}": v * ms for k, v in parts.items()})
        out.update({"attention, sparse layers (after the anchor)": sum(att[anchor + 1:]) * ms,
                    "probe and selection (anchor)": extra[0] * ms,
                    "masks / gathers (layers after the anchor)": sum(extra[1:]) * ms,
                    "rest (weights, norms, rope, embeddings, output)": (rest + sum(other) - sum(extra)) * ms})
        return out


# the graph nodes of Quest's layers (cpp/src/llama-vp-quest.cpp names them), by part of its profile
QUEST_PARTS = {"vp_quest_summaries": "summaries", "vp_quest_q": "bounds", "vp_quest_bounds": "bounds",
               "vp_quest_select": "selection", "vp_quest_mask": "masks / gathers",
               "vp_quest_k": "masks / gathers", "vp_quest_v": "masks / gathers"}


def profile(name: str, a: argparse.Namespace, cache: Path, nv: int) -> dict:
    path, desc = model_path(name, cache)
    timer = NodeTimer()
    r = Runner(path, nv + a.text + a.steps + 16, a.threads, a.flash_attn, cb_eval=timer.cb)
    r.load(r.make_state(nv, a.text))
    vp = replace(MODES[a.profile_mode], min_pruned_layers=0)  # the parts, also where the preset would skip
    r.set_mode(vp, nv)
    r.decode_tokens([11])  # the first step makes the page summaries: profiled separately below
    timer.on = True
    t0 = time.perf_counter()
    for i in range(a.steps):
        r.decode_tokens([(i * 7919) % r.n_vocab])
    wall = (time.perf_counter() - t0) * 1e3 / a.steps
    b = timer.budget(V.llama_vp_anchor_layer(r.ctx), r.n_layer, a.steps)
    summ_ms = None
    if vp.quest != "off":  # the summaries of a whole image: once, on the first step after it (a new state, same graph)
        timer.rows.clear()
        r.load(r.make_state(nv, a.text))
        r.set_mode(vp, nv)
        r.decode_tokens([11])
        summ_ms = sum(dt for _, kind, dt in timer.rows if kind == "summaries") * 1e3
    out = {"model": desc, "n_visual": nv, "ms_per_token_profiled": wall, "parts_ms": b, "flash_attn": r.flash_attn,
           "mode": a.profile_mode, "summaries_once_ms": summ_ms,
           "attn": ATTN_NAMES.get(V.llama_vp_last_attn(r.ctx), "-"),
           "probe": {0: "a probe of its own", 1: "the anchor layer's own scores"}.get(V.llama_vp_last_probe(r.ctx), "-")}
    r.close()
    return out


def plan_runs(a: argparse.Namespace) -> list[tuple[str, str]]:
    """(config, mode) pairs: dense and vp5 in every configuration, the other modes in --config."""
    configs = a.configs.split(",")
    runs = [(c, m) for c in configs for m in ("dense", "vp5")]
    runs += [(a.config, m) for m in a.modes.split(",") if m not in ("dense", "vp5")]
    return runs


def summarise(times: dict, rets: dict, paths: dict, pages: dict) -> dict:
    """Per run: median and min ms/token, speedups against the fastest dense configuration and
    against dense in the run's own configuration, the gap to the text-only floor closed."""
    row = {}
    for (c, m), t in times.items():
        med, best = statistics.median(t), min(t)
        row[f"{m}@{c}"] = {"config": c, "mode": m, "ms_per_tok_median": 1e3 * med, "ms_per_tok_min": 1e3 * best,
                           "tok_s": 1 / med, "path": paths.get((c, m), "-"),
                           "retention_mean": statistics.fmean(rets[c, m]) if rets[c, m] else 1.0,
                           "quest_pages_kept_mean": statistics.fmean(pages[c, m]) if pages[c, m] else None}
    dense = {x["config"]: x for x in row.values() if x["mode"] == "dense"}
    fastest = min(dense.values(), key=lambda x: x["ms_per_tok_median"])
    floor = next((x["ms_per_tok_median"] for x in row.values() if x["mode"] == "floor"), None)
    for x in row.values():
        own = dense[x["config"]]
        x["speedup_vs_fastest_dense"] = fastest["ms_per_tok_median"] / x["ms_per_tok_median"]
        x["speedup_vs_fastest_dense_min"] = min(d["ms_per_tok_min"] for d in dense.values()) / x["ms_per_tok_min"]
        x["speedup_vs_same_config_dense"] = own["ms_per_tok_median"] / x["ms_per_tok_median"]
        d = fastest["ms_per_tok_median"]
        # no gap where dense is within 10% of the floor: a ratio of two small differences is noise
        x["gap_closed"] = (d - x["ms_per_tok_median"]) / (d - floor) if floor is not None and d > 1.1 * floor else None
    return {"fastest_dense": fastest["config"], "runs": row}


def bench_model(name: str, a: argparse.Namespace, cache: Path) -> dict:
    path, desc = model_path(name, cache)
    sizes = [int(x) for x in a.sizes.split(",")]
    runs = plan_runs(a)
    n_ctx = max(sizes) + a.text + a.steps + 16
    runners: dict[tuple[str, str, str], Runner] = {}
    for c in dict.fromkeys(c for c, _ in runs):
        cfg = CONFIGS[c]
        if cfg.context not in runners:
            runners[cfg.context] = Runner(path, n_ctx, a.threads, cfg.flash_attn, type_k=cfg.type_k,
                                          type_v=cfg.type_v, gpu=a.gpu)
    first = runners[CONFIGS[a.config].context]
    anchor = None
    out = {"model": desc, "file": path.name, "n_layer": first.n_layer, "n_swa": first.n_swa,
           "configs": {c: vars(CONFIGS[c]) for c in dict.fromkeys(c for c, _ in runs)},
           "default_config": a.config, "sizes": {}, "prefill": {}}
    n_work = len(sizes) * a.reps * len(runs)
    k, bar = 0, Progress(n_work)
    for nv in sizes:
        states = {(ctx, floor): r.make_state(0 if floor else nv, a.text)
                  for ctx, r in runners.items() for floor in (False, True)}
        times: dict = {run: [] for run in runs}
        rets: dict = {run: [] for run in runs}
        pages: dict = {run: [] for run in runs}
        paths: dict = {}
        for _ in range(a.reps):
            for c, m in runs:  # interleaved: drift on a shared machine hits every run alike
                bar.at(k, f"{name} N_v={nv} {m}@{c}")
                cfg, floor = CONFIGS[c], m == "floor"
                r = runners[cfg.context]
                set_fattn_kernel(cfg.upstream_kernel)
                r.load(states[cfg.context, floor])
                r.set_mode(MODES[m], 0 if floor else nv)
                if MODES[m] is not None:
                    anchor = V.llama_vp_anchor_layer(r.ctx)
                dt, ret, kept_pages = r.run_decode(a.steps, quest=MODES[m] is not None and MODES[m].quest != "off")
                if MODES[m] is not None:
                    skipped = V.llama_vp_skip_reason(r.ctx)
                    paths[c, m] = "skipped" if skipped else ATTN_NAMES.get(V.llama_vp_last_attn(r.ctx), "-")
                    if skipped:
                        out["skipped"] = skipped.decode()
                times[c, m].append(dt / a.steps)
                rets[c, m] += ret
                pages[c, m] += kept_pages
                k += 1
        out["sizes"][nv] = summarise(times, rets, paths, pages)
        del states
    bar.at(n_work, "done")
    set_fattn_kernel(False)
    first.set_mode(None, 0)
    for n in [int(x) for x in a.prefill_sizes.split(",") if x]:
        res = {}
        ts = {"dense": [], "vp5": []}
        for _ in range(a.prefill_reps):
            for m in ts:  # interleaved, VisionPulse off and on: prefill must cost the same
                first.set_mode(MODES[m], n)
                ts[m].append(first.prefill(n + a.text))
        for m, t in ts.items():
            res[m] = {"tok_s": (n + a.text) / statistics.median(t), "s_min": min(t), "s_median": statistics.median(t)}
        res["ratio"] = res["vp5"]["tok_s"] / res["dense"]["tok_s"]
        out["prefill"][n] = res
    out["anchor_layer"] = anchor
    for r in runners.values():
        r.close()
    return out


def flat_rows(results: dict) -> list[dict]:
    """One row per model, size and run: what results.json's "rows" hold."""
    return [{"model": name, "visual_tokens": int(nv), "mode": x["mode"], "config": x["config"],
             "path": x["path"], "ms_per_token": x["ms_per_tok_median"], "ms_per_token_min": x["ms_per_tok_min"],
             "speedup_vs_fastest_dense": x["speedup_vs_fastest_dense"],
             "speedup_vs_same_config_dense": x["speedup_vs_same_config_dense"],
             "fastest_dense": size["fastest_dense"], "kept": x["retention_mean"]}
            for name, r in results.items() for nv, size in r["sizes"].items() for x in size["runs"].values()]


def _config_text(c: str, cfg: dict) -> str:
    kernel = ", upstream's kernel" if cfg["upstream_kernel"] else ""
    return f"`{c}`: flash attention {cfg['flash_attn']}, K {cfg['type_k']}, V {cfg['type_v']}{kernel}"


def ceiling(r: dict, size: dict, dense_layers: float | None = None) -> float | None:
    """The most a mode could gain over the fastest dense run here when dense_layers layers' worth of
    visual attention stay (vp5: the layers up to the anchor, which the method runs dense) and the probe,
    the selections and the pruned layers cost nothing. Text-only floor + dense_layers / n_layer of the
    fastest dense run's visual-attention time."""
    floor = next((x for x in size["runs"].values() if x["mode"] == "floor"), None)
    if floor is None or r.get("anchor_layer") is None:
        return None
    if dense_layers is None:
        dense_layers = r["anchor_layer"] + 1
    fast = size["runs"][f"dense@{size['fastest_dense']}"]["ms_per_tok_median"]
    f = floor["ms_per_tok_median"]
    return fast / (f + dense_layers / r["n_layer"] * max(fast - f, 0.0))


def quest_dense_layers(anchor: int) -> float:
    """Layers' worth of visual attention vp5+ keeps at its least: the layers below Quest's first and the
    anchor whole, each Quest layer its minimum share of the pages (the library's defaults; every layer
    below the anchor full attention, as in the synthetic model)."""
    p = V.llama_vp_default_params()
    first = min(p.quest_first_layer, anchor)
    return first + 1 + p.quest_budget_min * (anchor - first)


def summary_table(r: dict) -> list[str]:
    """Per size: the fastest dense run, VisionPulse 5 at its best, what bounds it, and our kernel's
    effect on dense."""
    md = ["| visual tokens | fastest dense | ms/token | vp5, best config | ms/token | vp5 vs fastest dense | "
          "ceiling | dense, our FA kernel vs upstream's |", "|---|---|---|---|---|---|---|---|"]
    for nv, size in r["sizes"].items():
        runs = size["runs"]
        fast = runs[f"dense@{size['fastest_dense']}"]
        vp = min((x for x in runs.values() if x["mode"] == "vp5"), key=lambda x: x["ms_per_tok_median"])
        ours, up = runs.get("dense@fa-on"), runs.get("dense@fa-on-upstream")
        kernel = f"{up['ms_per_tok_median'] / ours['ms_per_tok_median']:.2f}x" if ours and up else "-"
        top = ceiling(r, size)
        md.append(f"| {nv} | {fast['config']} | {fast['ms_per_tok_median']:.1f} | {vp['config']} | "
                  f"{vp['ms_per_tok_median']:.1f} | {vp['speedup_vs_fastest_dense']:.2f}x | "
                  f"{'-' if top is None else f'{top:.2f}x'} | {kernel} |")
    md += ["", "Ceiling: the most vp5 could gain here, were the probe and the layers after the anchor free: "
           "the text-only floor plus (anchor + 1) / layers of the fastest dense run's visual-attention time "
           "(the method keeps the layers up to the anchor dense)."]
    quest = [(nv, x) for nv, size in r["sizes"].items() for x in size["runs"].values() if x["mode"] == "vp5+"]
    if quest and r.get("anchor_layer") is not None:
        layers = quest_dense_layers(r["anchor_layer"])
        md += ["", "| visual tokens | vp5+ ms/token | vp5+ vs fastest dense | ceiling of vp5+ |", "|---|---|---|---|"]
        for nv, x in quest:
            top = ceiling(r, r["sizes"][nv], layers)
            md.append(f"| {nv} | {x['ms_per_tok_median']:.1f} | {x['speedup_vs_fastest_dense']:.2f}x | "
                      f"{'-' if top is None else f'{top:.2f}x'} |")
        md += ["", f"Ceiling of vp5+: as above with {layers:g} layers' worth of visual attention kept: the layers "
               "below Quest's first and the anchor whole, each Quest layer at its least share of the pages "
               "(the library's defaults), were bounds, selection and masks free."]
    return md


def kept_text(x: dict) -> str:
    """The kept share of the visual tokens (after the anchor) and, with Quest, of its pages (below it)."""
    pages = x.get("quest_pages_kept_mean")
    return f"{100 * x['retention_mean']:.1f}%" + ("" if pages is None else f"; pages {100 * pages:.0f}%")


def markdown(results: dict, meta: dict) -> str:
    md = ["# Decode speed: VisionPulse against the fastest dense setting", "",
          f"Written by `{meta['command']}` ({meta['elapsed_min']:.1f} min, {meta['machine']}, "
          f"{meta['threads']} threads, {'every layer on the GPU' if meta.get('gpu') else 'CPU only'}). {meta['text']} text tokens after the visual ones, "
          f"{meta['steps']} decode steps per run, {meta['reps']} interleaved repetitions; times are the "
          "median (min) per token. Dense runs in every configuration a user could pick; **the baseline of "
          "every speedup is the fastest of them at that size** (its ratio to the min-of-runs in brackets, "
          "which noise on a shared machine disturbs less); the same-configuration ratio is beside it. "
          "Gap closed = share of the fastest-dense-minus-floor time that the run removes. The KV cache is "
          "a synthetic state (random K/V of the cache's type, `tests/support/kv_state.py`); the weights' "
          "work is real.", ""]
    for name, r in results.items():
        md += [f"## {r['model']}", "",
               f"{r['n_layer']} layers, anchor layer {r['anchor_layer']}. Configurations: "
               + "; ".join(_config_text(c, cfg) for c, cfg in r["configs"].items())
               + f". Modes other than dense and vp5 run in `{r['default_config']}`.", ""]
        if r.get("skipped"):
            md += [f"VisionPulse on this model: {r['skipped']} (path `skipped` below).", ""]
        md += summary_table(r) + [""]
        md += ["| visual tokens | mode | config | path | ms/token median (min) | tok/s | vs fastest dense (min) | "
               "vs dense, same config | gap closed | kept |", "|---|---|---|---|---|---|---|---|---|---|"]
        for nv, size in r["sizes"].items():
            for x in size["runs"].values():
                none = x["gap_closed"] is None or x["mode"] in ("dense", "floor") or x["path"] == "skipped"
                gap = "-" if none else f"{100 * x['gap_closed']:.0f}%"
                star = " *" if x["mode"] == "dense" and x["config"] == size["fastest_dense"] else ""
                md.append(f"| {nv} | {x['mode']}{star} | {x['config']} | {x['path']} | {x['ms_per_tok_median']:.1f} "
                          f"({x['ms_per_tok_min']:.1f}) | {x['tok_s']:.2f} | {x['speedup_vs_fastest_dense']:.2f}x "
                          f"({x['speedup_vs_fastest_dense_min']:.2f}x) | {x['speedup_vs_same_config_dense']:.2f}x | "
                          f"{gap} | {kept_text(x)} |")
        if r["prefill"]:
            md += ["", f"Prefill (real, token input, `{r['default_config']}`; VisionPulse is dense during prefill "
                   "by design):", "",
                   "| visual + text tokens | dense tok/s | vp5 tok/s | vp5 / dense (best runs) |", "|---|---|---|---|"]
            for n, x in r["prefill"].items():
                best = x["dense"]["s_min"] / x["vp5"]["s_min"]
                md.append(f"| {n} + {meta['text']} | {x['dense']['tok_s']:.1f} | {x['vp5']['tok_s']:.1f} | "
                          f"{x['ratio']:.3f} ({best:.3f}) |")
        md.append("")
    md += ["`*` marks the fastest dense configuration of each size. Kept: the share of the visual tokens the "
           "layers after the anchor attend to; pages: the share of Quest's pages the layers below it keep (the "
           "budget follows the visual mass, which this synthetic cache sets, not the content of an image).", "", "![decode speed](speed.png)", "",
           "Where the time of a step goes (node by node): `PROFILE.md`, written by `--profile N_V`.", ""]
    return "\n".join(md)


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (_name, r) in zip(axes[0], results.items()):
        sizes = list(r["sizes"])
        for key in next(iter(r["sizes"].values()))["runs"]:
            ax.plot(sizes, [r["sizes"][n]["runs"][key]["tok_s"] for n in sizes], marker="o", label=key,
                    linestyle="-" if key.startswith(("dense", "vp5@")) else ":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens in context")
        ax.set_ylabel("decode tokens / s")
        ax.set_title(r["model"][:60], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="synthetic,gemma")
    ap.add_argument("--sizes", default="576,4096,8192,16384,32768")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="dense configurations (dense and vp5 run in each): " + ", ".join(CONFIGS))
    ap.add_argument("--config", default="fa-on", help="where the other modes run")
    ap.add_argument("--modes", default="vp5-gather,fixed5,probe,vp5-lag,floor",
                    help="modes besides dense and vp5 (in --config): " + ", ".join(MODES))
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--prefill-sizes", default="576")
    ap.add_argument("--prefill-reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("-fa", "--flash-attn", choices=["auto", "on", "off"], default="auto", help="for --profile")
    ap.add_argument("--gpu", action="store_true", help="offload every layer (a GPU build)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "speed"))
    ap.add_argument("--cache", default=str(ROOT / ".vp-cache" / "bench"))
    ap.add_argument("--render", action="store_true", help="only rewrite RESULTS.md and the plot from results.json")
    ap.add_argument("--profile", type=int, default=0, metavar="N_V",
                    help="instead: time every graph node of vp5 steps at N_V visual tokens (where the time goes)")
    ap.add_argument("--profile-mode", default="vp5", help="the mode --profile times (vp5+: Quest's parts too)")
    a = ap.parse_args()
    out = Path(a.out)
    if a.render:
        d = json.loads((out / "results.json").read_text())
        (out / "RESULTS.md").write_text(markdown(d["results"], d["meta"]))
        plot(d["results"], out / "speed.png")
        return 0
    for m in a.modes.split(","):
        if m and m not in MODES:
            raise SystemExit(f"unknown mode {m!r}: {', '.join(MODES)}")
    for c in [*a.configs.split(","), a.config]:
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}: {', '.join(CONFIGS)}")
    if a.config not in a.configs.split(","):
        a.configs += "," + a.config
    if a.profile:
        out.mkdir(parents=True, exist_ok=True)
        res = [profile(name, a, Path(a.cache), a.profile) for name in a.models.split(",")]
        mode_name = MODES[a.profile_mode].label() if MODES[a.profile_mode] else a.profile_mode
        md = [f"# Where a {mode_name} step's time goes at {a.profile} visual tokens", "",
              f"Written by `python3 scripts/speed_bench.py {' '.join(sys.argv[1:])}`: every graph node computed "
              "alone (cb_eval), its time attributed to its layer; non-attention work above a plain layer's "
              "median counts as VisionPulse's own (probe and selection at the anchor, mask or gather later). "
              "Node-by-node execution adds overhead to the small nodes; read the shares, not the totals. "
              "The selection runs also where the preset would skip it (min_pruned_layers 0).", ""]
        for x in res:
            tot = sum(x["parts_ms"].values())
            md += [f"## {x['model']}", "",
                   f"Flash attention {x['flash_attn']}; path {x['attn']}; scores from {x['probe']}."
                   + ("" if x["summaries_once_ms"] is None else
                      f" Quest's page summaries of the whole image, made once on the first step after it: "
                      f"{x['summaries_once_ms']:.1f} ms."), "",
                   "| part | ms per token | share |", "|---|---|---|"]
            md += [f"| {k} | {v:.1f} | {100 * v / tot:.0f}% |" for k, v in x["parts_ms"].items()]
            md.append("")
        (out / "PROFILE.md").write_text("\n".join(md))
        (out / "profile.json").write_text(json.dumps(res, indent=1))
        print("\n".join(md))
        return 0
    t0 = time.time()
    results = {name: bench_model(name, a, Path(a.cache)) for name in a.models.split(",")}
    out.mkdir(parents=True, exist_ok=True)
    argv = " ".join(sys.argv[1:])
    meta = {"command": f"python3 scripts/speed_bench.py {argv}".strip(), "machine": platform.platform(),
            "threads": a.threads, "gpu": a.gpu, "text": a.text, "steps": a.steps, "reps": a.reps,
            "elapsed_min": (time.time() - t0) / 60}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": flat_rows(results), "results": results},
                                                 indent=1))
    (out / "RESULTS.md").write_text(markdown(results, meta))
    try:
        plot(results, out / "speed.png")
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
