"""VisionPulse settings and per-step reports (Python side of cpp/include/llama-visionpulse.h)."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import _vp_ctypes as V
from .errors import InvalidArgumentError
from .sampling import INT32_MAX, UINT32_MAX, float_arg, int_arg

MODES = {
    "dense": V.LLAMA_VP_MODE_DENSE,  # nothing dropped; stats only
    "visionpulse": V.LLAMA_VP_MODE_DYNAMIC,  # the method: budget from the visual mass
    "fixed": V.LLAMA_VP_MODE_FIXED,  # fixed ratio per step
    "random": V.LLAMA_VP_MODE_RANDOM,  # same budget as visionpulse, random tokens (control)
    "static": V.LLAMA_VP_MODE_STATIC,  # FastV-style: ranked once at the last prompt token
    "forced": V.LLAMA_VP_MODE_FORCED,  # a given set (tests, tools)
}
ATTN = {"auto": V.LLAMA_VP_ATTN_AUTO, "mask": V.LLAMA_VP_ATTN_MASK, "gather": V.LLAMA_VP_ATTN_GATHER}
ATTN_NAMES = {v: k for k, v in ATTN.items()}
# Beyond the paper: Quest pages below the anchor ("bound": the pages with the highest score bound; "random":
# as many pages at random, the control). A preset written "5+" is preset 5 with "bound".
QUEST = {"off": V.LLAMA_VP_QUEST_OFF, "bound": V.LLAMA_VP_QUEST_BOUND, "random": V.LLAMA_VP_QUEST_RANDOM}
# Named settings that the CLI's eval, the evaluation harness and the testbed compare side by side (one table).
# A control names the run it is budget-matched to ("matches", run first on the same item) and how:
# "per-step" replays that run's K at every step, "mean" keeps a fixed ratio equal to its mean retention.
COMPARISON_MODES: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "visionpulse-5": {"mode": "visionpulse", "preset": 5},
    "visionpulse-10": {"mode": "visionpulse", "preset": 10},
    "visionpulse-5-anchor-pruned": {"mode": "visionpulse", "preset": 5, "prune_anchor": True},
    "fixed-5%": {"mode": "fixed", "ratio": 0.05},
    "fixed-1%": {"mode": "fixed", "ratio": 0.01},
    "random-5": {"mode": "random", "preset": 5, "seed": 1},
    "random-5-matched": {"mode": "random", "seed": 1, "matches": "visionpulse-5", "budget": "per-step"},
    "random-5-mean": {"mode": "random", "seed": 1, "matches": "visionpulse-5", "budget": "mean"},
    "static-5%": {"mode": "static", "ratio": 0.05},
    "visionpulse-5-lagged": {"mode": "visionpulse", "preset": 5, "lagged": True},  # opt-in, beyond the paper
    "visionpulse-5+": {"mode": "visionpulse", "preset": 5, "quest": "bound"},  # opt-in, beyond the paper
    "visionpulse-5+-random": {"mode": "visionpulse", "preset": 5, "quest": "random", "seed": 1},  # its control
}


def matched_mode(name: str) -> str | None:
    """The mode a control is budget-matched to (it must run first on the same item), or None."""
    s = COMPARISON_MODES[name]
    return None if s is None else s.get("matches")


def comparison_spec(
    name: str, anchor: int | None = None, matched: tuple[Sequence[int], float] | None = None
) -> VisionPulse | None:
    """A named comparison mode's settings. A control needs ``matched``: the matched run's K per step and
    its mean retention (K empty when it pruned nothing: the control then keeps one token, as K's floor)."""
    if name not in COMPARISON_MODES:
        raise ValueError(f"unknown mode {name!r}: one of {', '.join(COMPARISON_MODES)}")
    s = dict(COMPARISON_MODES[name] or {})
    if not s:
        return None
    if anchor is not None:
        s["anchor_layer"] = anchor
    s.pop("matches", None)
    budget = s.pop("budget", None)
    if budget is not None:
        if matched is None:
            raise ValueError(f"{name} is a control: it needs the per-step K of {matched_mode(name)}")
        ks, retention = matched
        if budget == "per-step":
            s["k_per_step"] = list(ks) or [1]
        else:  # a fixed ratio: K = floor(retention * N_v) at every step
            s["budget_min"] = s["budget_max"] = s["ratio"] = min(1.0, max(retention, 1e-6))
    return VisionPulse(**s)


@functools.cache
def presets() -> tuple[int, ...]:
    """The presets the C library defines (5 and 10: at most that percent of visual tokens per step)."""
    return tuple(n for n in range(1, 101) if V.llama_vp_preset_params(n).mode != V.LLAMA_VP_MODE_NONE)


def preset_settings(n: int | None) -> tuple[float, float, float]:
    """(tau, budget_min, budget_max) of a preset, as the C library defines them (the one table)."""
    names = " or ".join(map(str, presets()))
    k = -1 if n is None else int_arg("VisionPulse preset", n, 0, INT32_MAX, names)  # C's int32 would wrap
    p = V.llama_vp_preset_params(k)
    if p.mode == V.LLAMA_VP_MODE_NONE:
        raise InvalidArgumentError(f"unknown VisionPulse preset {n!r}: use {names}")
    # C holds floats: 0.1f reads back as 0.10000000149; six digits give the number it was written as
    return round(p.tau, 6), round(p.budget_min, 6), round(p.budget_max, 6)


@dataclass
class VisionPulse:
    """Per-step visual token selection settings.

    ``VisionPulse()`` is the paper's "<=5%" preset; ``VisionPulse(preset=10)`` the "<=10%" one.
    Every knob can be overridden; ``ratio`` is the kept fraction of ``fixed``/``static``
    (default: the preset's upper budget).
    """

    mode: str = "visionpulse"
    preset: int = 5
    tau: float | None = None
    budget_min: float | None = None
    budget_max: float | None = None
    ratio: float | None = None
    anchor_layer: int | None = None  # None: the full-attention layer nearest 47% of depth
    first_pruned_layer: int | None = None  # None: from prune_anchor ("forced" may go below the anchor)
    prune_anchor: bool | None = None  # the anchor attends to its own selection too (None: the library's default)
    seed: int = 0
    forced: Sequence[int] | None = None  # mode "forced": kept visual ordinals
    attn: str = "auto"  # how later layers skip dropped tokens: auto | mask | gather (same result)
    lagged: bool = False  # beyond the paper: layers before the anchor use the previous step's set
    prune_swa: bool = False  # also prune sliding-window layers (their cost is bounded by the window)
    # skip the selection (steps run dense, the report says why) where fewer full-attention layers than
    # this would be pruned: it cannot pay there. None: the library's default (2); 0: never skip
    min_pruned_layers: int | None = None
    # visionpulse/fixed/random: K at generation step i is k_per_step[i-1] (the last one once the list ends)
    # instead of the budget rule's; a control budget-matched to another run's steps
    k_per_step: Sequence[int] | None = None
    # beyond the paper: Quest pages below the anchor (QUEST: off | bound | random); None fields: the library's
    # defaults (llama_vp_default_params; the kept share of the pages = clamp(previous step's mass, min, max))
    quest: str = "off"
    quest_page: int | None = None
    quest_first_layer: int | None = None
    quest_budget_min: float | None = None
    quest_budget_max: float | None = None

    @classmethod
    def parse(cls, spec: VisionPulse | str | int | None, mode: str | None = None) -> VisionPulse | None:
        """``None``/"off" -> None; 5/"5"/10/"10" -> that preset (with ``mode`` if given); "5+"/"10+" -> that
        preset with Quest pages below the anchor (beyond the paper)."""
        if isinstance(spec, VisionPulse):
            return spec if mode is None else replace(spec, mode=mode)  # the caller's object stays as it was
        if spec is None:
            return cls(mode=mode) if mode and mode != "off" else None
        s = str(spec).strip().lower()
        if s in ("off", "none", ""):
            return None
        quest = "bound" if s.endswith("+") else "off"
        s = s.removesuffix("+")
        if s not in ("5", "10"):
            raise InvalidArgumentError(f"unknown VisionPulse preset {spec!r}: use 5, 10, 5+, 10+ or off")
        return cls(preset=int(s), mode=mode or "visionpulse", quest=quest)

    def resolved(self) -> dict[str, Any]:
        tau, bmin, bmax = preset_settings(self.preset)
        d = {
            "tau": self.tau if self.tau is not None else tau,
            "budget_min": self.budget_min if self.budget_min is not None else bmin,
            "budget_max": self.budget_max if self.budget_max is not None else bmax,
        }
        d["ratio"] = self.ratio if self.ratio is not None else d["budget_max"]
        return d

    def label(self) -> str:
        """These settings as a person would write them, for titles and captions: "VisionPulse 5",
        "VisionPulse 2-8%, tau 0.2", "fixed 5%", "static 5%", "random 1-5%" (its budget, as
        VisionPulse's), "dense"; then what departs from the method (", lagged", ...)."""

        def pct(f: float) -> str:
            return f"{100 * f:.3g}"

        r = self.resolved()
        span = pct(r["budget_min"]) + ("" if r["budget_min"] == r["budget_max"] else "-" + pct(r["budget_max"]))
        if self.k_per_step is not None and self.mode in ("visionpulse", "fixed", "random"):
            name = ("VisionPulse" if self.mode == "visionpulse" else self.mode) + ", K given per step"
        elif self.mode in ("fixed", "static"):
            name = f"{self.mode} {pct(r['ratio'])}%"
        elif self.mode == "random":
            name = f"random {span}%"
        elif self.mode == "visionpulse":
            own = (r["tau"], r["budget_min"], r["budget_max"]) != preset_settings(self.preset)
            name = f"VisionPulse {span}%, tau {r['tau']:g}" if own else f"VisionPulse {self.preset}"
        elif self.mode == "forced":
            name = f"forced, {len(self.forced or ())} tokens"
        else:
            name = str(self.mode)
        extras = [
            (bool(self.prune_anchor), "anchor pruned"),
            (self.lagged, "lagged"),
            (self.prune_swa, "sliding-window layers pruned"),
            (self.quest == "bound", "Quest pages below the anchor"),
            (self.quest == "random", "random pages below the anchor"),
        ]
        return ", ".join([name] + [text for on, text in extras if on])

    def check(self, n_layer: int | None = None) -> None:
        """Refuse impossible settings (InvalidArgumentError, a ValueError) before any work; the rules are
        the C library's. With the model's ``n_layer``, the layers named must be among its layers (whether
        the anchor is a full-attention layer only C knows: it says so when the settings are applied)."""
        params = self.to_c()
        if V.llama_vp_check_params(ctypes.byref(params)) != 0:
            raise InvalidArgumentError(f"VisionPulse: {V.last_error()}")
        if n_layer is not None:
            if self.anchor_layer is not None:
                int_arg(
                    "VisionPulse anchor_layer", self.anchor_layer, 0, n_layer - 1, f"the model has {n_layer} layers"
                )
            if self.first_pruned_layer is not None:
                int_arg(
                    "VisionPulse first_pruned_layer",
                    self.first_pruned_layer,
                    0,
                    n_layer,
                    f"the model has {n_layer} layers",
                )

    def enable(self, ctx) -> None:
        """Switch these settings on for a llama_context; C validates them (InvalidArgumentError with its message)."""
        params = self.to_c()
        if V.llama_vp_enable(ctx, ctypes.byref(params)) != 0:
            raise InvalidArgumentError(f"VisionPulse: {V.last_error()}")

    def _check_fields(self) -> None:
        """Each field of the right type and within its C type: a C int32 would wrap 2**32 + 1 to 1, and
        a non-number must be a clear error here, not a TypeError deep in ctypes."""
        for name in ("anchor_layer", "first_pruned_layer"):
            if getattr(self, name) is not None:  # None: the library's choice; below 0 is refused, not "auto"
                int_arg(f"VisionPulse {name}", getattr(self, name), 0, INT32_MAX)
        if self.min_pruned_layers is not None:
            int_arg("VisionPulse min_pruned_layers", self.min_pruned_layers, 0, INT32_MAX)
        for name in ("quest_page", "quest_first_layer"):
            if getattr(self, name) is not None:
                int_arg(f"VisionPulse {name}", getattr(self, name), 0, INT32_MAX)
        int_arg("VisionPulse seed", self.seed, 0, UINT32_MAX)
        for name in ("tau", "budget_min", "budget_max", "ratio", "quest_budget_min", "quest_budget_max"):
            if getattr(self, name) is not None:
                float_arg(f"VisionPulse {name}", getattr(self, name))
        for name in ("forced", "k_per_step"):
            seq = getattr(self, name)
            if seq is not None:
                if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
                    raise InvalidArgumentError(f"VisionPulse {name} must be a list of integers")
                for k in seq:
                    int_arg(f"VisionPulse {name} entries", k, 0 if name == "forced" else 1, INT32_MAX)

    def to_c(self) -> V.llama_vp_params:
        """The C struct; names that C has no number for (mode, attn, forced's set) are checked here."""
        if not isinstance(self.mode, str) or self.mode not in MODES:
            raise InvalidArgumentError(f"unknown VisionPulse mode {self.mode!r}: one of {', '.join(MODES)}")
        if not isinstance(self.attn, str) or self.attn not in ATTN:
            raise InvalidArgumentError(f"unknown VisionPulse attention path {self.attn!r}: one of {', '.join(ATTN)}")
        if not isinstance(self.quest, str) or self.quest not in QUEST:
            raise InvalidArgumentError(f"unknown VisionPulse quest {self.quest!r}: one of {', '.join(QUEST)}")
        if self.mode == "forced" and self.forced is None:
            raise InvalidArgumentError("VisionPulse mode 'forced' needs the kept ordinals (forced=[...])")
        self._check_fields()
        if self.k_per_step is not None:
            if self.mode not in ("visionpulse", "fixed", "random"):
                raise InvalidArgumentError("VisionPulse k_per_step needs mode visionpulse, fixed or random")
            if not self.k_per_step:
                raise InvalidArgumentError("VisionPulse k_per_step must be a non-empty list of counts >= 1")
        r = self.resolved()
        p = V.llama_vp_default_params()  # the library's defaults for what these settings leave open
        p.mode = MODES[self.mode]
        p.anchor_layer = -1 if self.anchor_layer is None else int(self.anchor_layer)
        p.tau, p.budget_min, p.budget_max, p.ratio = r["tau"], r["budget_min"], r["budget_max"], r["ratio"]
        p.seed = self.seed  # in [0, 2**32 - 1]: checked, never masked
        if self.prune_anchor is not None:
            p.prune_anchor = bool(self.prune_anchor)
        p.first_pruned_layer = -1 if self.first_pruned_layer is None else int(self.first_pruned_layer)
        p.attn = ATTN[self.attn]
        p.lagged = bool(self.lagged)
        p.prune_swa = bool(self.prune_swa)
        if self.min_pruned_layers is not None:
            p.min_pruned_layers = int(self.min_pruned_layers)
        p.quest = QUEST[self.quest]
        for name in ("quest_page", "quest_first_layer", "quest_budget_min", "quest_budget_max"):
            if getattr(self, name) is not None:
                setattr(p, name, getattr(self, name))
        return p


class VisionPulseControl:
    """One llama_context's VisionPulse, sequence 0: settings applied (and validated by C) only when they
    change, so that steps keep reusing their graphs; and each prompt's phases: ``new_prompt`` before it
    (prompt processing, a one-token tail included, is never pruned nor a step), ``begin_generation``
    after it (for "static", before the last prompt token, whose query ranks the image once)."""

    def __init__(self, ctx) -> None:
        self._ctx = ctx
        self.settings: VisionPulse | None = None  # what the context runs now
        self._generating = False  # begin_generation was called for the current prompt

    def apply(self, vp: VisionPulse | None) -> None:
        if vp == self.settings:
            return
        if vp is None:
            V.llama_vp_disable(self._ctx)
        else:
            vp.enable(self._ctx)
        self.settings = replace(vp) if vp is not None else None  # a copy: the caller may change theirs

    def new_prompt(self) -> None:
        V.llama_vp_reset(self._ctx, 0)
        self._generating = False
        vp = self.settings
        if vp is not None and vp.mode == "forced":  # the reset cleared it
            V.set_forced(self._ctx, 0, list(vp.forced or ()))

    def begin_generation(self) -> None:
        """Once per prompt: a second call (after static began at its last prompt token) changes nothing."""
        if not self._generating:
            V.llama_vp_begin_generation(self._ctx, 0)
            self._generating = True

    def before_step(self, i: int) -> None:
        """Generation step i (1 for the first decoded token) is about to be decoded."""
        ks = self.settings.k_per_step if self.settings is not None else None
        if ks:
            V.llama_vp_set_k(self._ctx, 0, int(ks[min(i, len(ks)) - 1]))

    def report(self) -> VisionPulseReport | None:
        """An empty report of the generation that begins; steps before it (static's ranking) are none of it."""
        vp = self.settings
        if vp is None:
            return None
        c = vp.to_c()
        settings = {
            **vp.resolved(),
            "prune_anchor": bool(c.prune_anchor),
            "quest": vp.quest,
        }  # library defaults filled in
        if vp.quest != "off":
            settings.update({k: getattr(c, k) for k in ("quest_page", "quest_first_layer")})
            settings.update({k: round(getattr(c, k), 6) for k in ("quest_budget_min", "quest_budget_max")})
        reason = V.llama_vp_skip_reason(self._ctx)
        rep = VisionPulseReport(
            mode=vp.mode,
            anchor_layer=V.llama_vp_anchor_layer(self._ctx),
            settings=settings,
            steps=[],
            skipped=reason.decode() if reason else None,
        )
        rep._last_step = V.step_no(self._ctx, 0)
        return rep


@dataclass
class StepStats:
    """One decode step's selection (sequence 0)."""

    step: int
    n_kv: int
    n_visual: int
    n_kept: int
    mass: float  # max over heads of the tau-softmax mass on visual tokens
    mass_kept: float  # share of the (head-mean) visual mass on the kept tokens
    kept: list[int] = field(default_factory=list)  # visual ordinals (images in order, row-major)
    skipped: bool = False  # the selection was skipped (it cannot pay on this model): the step ran dense
    # Quest (beyond the paper): the share of the candidate pages each layer below the anchor kept, or None
    quest_pages_kept: float | None = None

    @property
    def retention(self) -> float:
        return self.n_kept / self.n_visual if self.n_visual else 1.0


@dataclass
class VisionPulseReport:
    mode: str
    anchor_layer: int
    settings: dict[str, Any]
    steps: list[StepStats]
    attn: str = "none"  # the attention path the steps used: mask | gather
    probe: str = "none"  # where the scores came from: "anchor" (the layer's own kq, no flash attention) | "own"
    skipped: str | None = None  # why the selection was skipped on this model (min_pruned_layers), if it was
    _last_step: int = field(default=0, repr=False)  # the C side's step counter at the last record

    def record(self, ctx, with_kept: bool = True) -> None:
        """Append the C side's last step for sequence 0, if it is new since the last record."""
        st = V.llama_vp_stats()
        if V.llama_vp_get_stats(ctx, 0, ctypes.byref(st)) == 0 and st.step > self._last_step:
            self._last_step = int(st.step)
            if not self.steps:  # the path and the probe are fixed for a run: read them once
                self.attn = ATTN_NAMES.get(V.llama_vp_last_attn(ctx), self.attn)
                self.probe = {0: "own", 1: "anchor"}.get(V.llama_vp_last_probe(ctx), self.probe)
            kept: list[int] = []
            if with_kept and st.n_kept > 0:  # one call: the stats said how many
                buf = (ctypes.c_int32 * st.n_kept)()
                kept = list(buf[: min(V.llama_vp_get_kept(ctx, 0, buf, st.n_kept), st.n_kept)])
            self.steps.append(
                StepStats(
                    step=int(st.step),
                    n_kv=st.n_kv,
                    n_visual=st.n_visual,
                    n_kept=st.n_kept,
                    mass=float(st.mass),
                    mass_kept=float(st.mass_kept),
                    kept=kept,
                    skipped=bool(st.skipped),
                    # one more call into C per step only where Quest is on
                    quest_pages_kept=V.quest_share(ctx, 0) if self.settings.get("quest", "off") != "off" else None,
                )
            )

    def usage(self, per_step: bool = False) -> dict[str, Any] | None:
        """The selection as an API response's ``usage["visionpulse"]``; None when nothing was selected."""
        if not self.steps:
            return None
        s = self.summary()
        d: dict[str, Any] = {
            "mode": self.mode,
            "anchor_layer": self.anchor_layer,
            "attn": self.attn,
            "probe": self.probe,
            "skipped": self.skipped,
            "steps_pruned": s["steps"] - s["steps_skipped"],
            "retention_mean": s["retention_mean"],
            "retention_min": s["retention_min"],
            "retention_max": s["retention_max"],
            "mass_mean": s["mass_mean"],
            "visual_tokens": self.steps[-1].n_visual,
        }
        if per_step:
            d["steps"] = self.to_dict()["steps"]
        return d

    def summary(self) -> dict[str, float]:
        if not self.steps:
            return {"steps": 0, "steps_skipped": 0}
        ret = [s.retention for s in self.steps]
        scored = [s for s in self.steps if not s.skipped] or self.steps  # a skipped step has no scores
        mass = [s.mass for s in scored]
        cov = [s.mass_kept for s in scored]
        return {
            "steps": len(self.steps),
            "steps_skipped": sum(s.skipped for s in self.steps),
            "retention_mean": sum(ret) / len(ret),
            "retention_min": min(ret),
            "retention_max": max(ret),
            "mass_mean": sum(mass) / len(mass),
            "mass_min": min(mass),
            "mass_max": max(mass),
            "mass_kept_mean": sum(cov) / len(cov),
        }

    def to_dict(self, per_step: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mode": self.mode,
            "anchor_layer": self.anchor_layer,
            "attn": self.attn,
            "probe": self.probe,
            "skipped": self.skipped,
            "settings": self.settings,
            "summary": self.summary(),
        }
        if per_step:
            d["steps"] = [asdict(s) for s in self.steps]
        return d
