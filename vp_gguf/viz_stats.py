"""stats.png: VisionPulse's visual mass, budget and K per step, drawn with matplotlib (optional:
``pip install 'vp-gguf[viz]'``); ``plot_missing`` says up front whether it can be drawn."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .visionpulse import VisionPulse, VisionPulseReport

PLOT_NEEDS = "the stats plot needs matplotlib: pip install 'vp-gguf[viz]'"


def plot_missing() -> str | None:
    """None when the stats plot can be drawn, else the line that says how to get it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return PLOT_NEEDS
    return None


def report_setting(report: VisionPulseReport) -> VisionPulse:
    """The settings a report was made with, as far as it tells: mode, budget, ratio, anchor pruning, Quest."""
    from .visionpulse import VisionPulse, preset_settings, presets

    s = report.settings
    rule = (s["tau"], s["budget_min"], s["budget_max"])
    preset = next((n for n in presets() if preset_settings(n) == rule), VisionPulse.preset)
    return VisionPulse(
        mode=report.mode,
        preset=preset,
        tau=s["tau"],
        budget_min=s["budget_min"],
        budget_max=s["budget_max"],
        ratio=s["ratio"],
        prune_anchor=bool(s.get("prune_anchor")) or None,
        quest=s.get("quest", "off"),
    )


def _budget_shares(setting: VisionPulse, report: VisionPulseReport) -> list[float] | None:
    """The share of the visual tokens each step's rule asked for: the visual mass clamped to the
    budget range (visionpulse, random), the ratio (fixed, static); None where no share rules K."""
    s = report.settings
    if setting.k_per_step is not None or setting.mode not in ("visionpulse", "random", "fixed", "static"):
        return None
    if setting.mode in ("fixed", "static"):
        return [s["ratio"]] * len(report.steps)
    return [min(max(st.mass, s["budget_min"]), s["budget_max"]) for st in report.steps]


def stats_figure(report: VisionPulseReport, setting: VisionPulse | None = None) -> Figure:
    """stats.png's figure. Above: the visual mass M per step (the anchor layer's attention on the
    image) and the budget range it is clamped to. Below: the budget and K in visual tokens, the
    right axis the same in % of them. Both y axes start at 0, so a constant K reads as constant;
    steps are whole numbers, 1 the first token decoded with VisionPulse (the strip's numbering);
    one legend for both, under them."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no backend to switch
        from matplotlib.ticker import MaxNLocator, PercentFormatter
    except ImportError:
        raise ImportError(PLOT_NEEDS) from None
    steps = report.steps
    if not steps:
        raise ValueError("no VisionPulse steps to plot")
    setting = setting or report_setting(report)
    s = report.settings
    x = list(range(1, len(steps) + 1))
    n_vis = max(st.n_visual for st in steps) or 1
    fig = Figure(figsize=(8, 7), dpi=110, layout="constrained")
    top, low = fig.subplots(2, 1, sharex=True, height_ratios=(2, 3))

    mass = [100 * st.mass for st in steps]
    top.plot(x, mass, color="tab:blue", marker=".", label="visual mass M: the anchor layer's attention on the image")
    shares = _budget_shares(setting, report)
    peak = max(mass)
    if shares is not None and setting.mode in ("visionpulse", "random"):
        lo, hi = 100 * s["budget_min"], 100 * s["budget_max"]
        top.axhspan(
            lo,
            hi,
            color="tab:orange",
            alpha=0.35,
            label=f"budget range {lo:.3g}-{hi:.3g}%: the budget is M clamped to it",
        )
        peak = max(peak, hi)
    top.set_ylim(0, min(110.0, 1.25 * peak) or 1.0)  # room above a mass of 100%, none below 0
    top.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    top.set_ylabel("share of attention")

    kept = [st.n_kept for st in steps]
    heights = [float(k) for k in kept]
    if shares is not None:
        budget = [b * st.n_visual for b, st in zip(shares, steps)]
        what = "ratio" if setting.mode in ("fixed", "static") else "budget"
        low.plot(
            x,
            budget,
            color="tab:orange",
            linewidth=2,
            label=f"{what} x {n_vis} visual tokens: K is this rounded down, at least 1",
        )
        heights += budget
    low.plot(x, kept, color="tab:red", marker="o", markersize=3, label="K: visual tokens kept")
    low.set_ylim(0, 1.25 * max(max(heights), 1))
    low.yaxis.set_major_locator(MaxNLocator(integer=True))  # tokens come whole
    low.set_ylabel("visual tokens kept")
    right = low.secondary_yaxis("right", functions=(lambda k: 100 * k / n_vis, lambda p: p * n_vis / 100))
    right.set_ylabel(f"% of the {n_vis} visual tokens")
    right.yaxis.set_major_formatter(PercentFormatter(decimals=None))
    low.xaxis.set_major_locator(MaxNLocator(integer=True))
    low.set_xlim(0.5, len(steps) + 0.5)
    low.set_xlabel("step (1 = the first token decoded with VisionPulse)")
    fig.legend(loc="outside lower center", fontsize=9, frameon=False)
    # skipped: the steps ran dense (K is every visual token), and the title says why
    sub = f"selection skipped: {report.skipped}" if report.skipped else f"selected at layer {report.anchor_layer}"
    fig.suptitle(f"{setting.label()}: visual mass, budget and K per step\n{sub}", fontsize=12)
    return fig


def stats_plot(report: VisionPulseReport, out_path: str | Path, setting: VisionPulse | None = None) -> Path:
    """stats.png: visual mass, budget and K per step (``stats_figure``; needs matplotlib)."""
    fig = stats_figure(report, setting)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path
