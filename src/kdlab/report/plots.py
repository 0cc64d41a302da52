"""Figures of a run or a sweep (matplotlib, Agg backend: no display needed, safe in workers).

Per run, three panels: (1) proxy, golden (and the proxy on training prompts) against the step on
log-log axes, with the proxy's early law (solid over the fit window, dashed where extrapolated), the
proxy detector's threshold, and both detectors' onsets; (2) golden against proxy, coloured by step
with arrows along the trajectory — a hacking run draws a U (or a J): the proxy keeps decreasing
(leftwards) while golden turns back up; (3) the training loss.
Per sweep, the same quantities with every run overlaid: one colour per condition, its mean over seeds
with a ±1 SE band (over seeds), its seeds as thin lines, onsets marked on the curves.

Two outputs from the same drawing code: composite PNGs for report.html (`plot_run`, `plot_sweep`) and
one PDF and one SVG per panel at a paper's column width (`save_run_panels`, `save_sweep_panels`;
3.4 in wide, text >= 7 pt, fonts embedded in the PDF and kept as text in the SVG). Text sizes come
from `SCREEN_RC` / `PAPER_RC`, never from the drawing functions.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: report generation must work without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

from kdlab import record  # noqa: E402
from kdlab.analysis.runs import RunAnalysis  # noqa: E402

UNITS = "nats per response"

# Text sizes come from rcParams, so one drawing function serves both outputs:
# - the composite PNGs embedded in report.html (wide figures shown scaled down: larger text);
# - one PDF and one SVG per panel, 3.4 in wide (a two-column paper's column), 7-8 pt text, fonts
#   embedded as TrueType (PDF) and kept as text (SVG), so a paper can use them as they are.
SCREEN_RC = {"font.size": 11, "legend.fontsize": 10, "axes.titlesize": 12, "axes.labelsize": 11}
PAPER_RC = {"font.size": 8, "legend.fontsize": 7, "axes.titlesize": 8, "axes.labelsize": 8,
            "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.markersize": 3, "pdf.fonttype": 42,
            "svg.fonttype": "none", "font.family": "DejaVu Sans"}
PAPER_SIZE = (3.4, 2.5)  # inches: one column of a two-column paper
PANEL_FORMATS = ("pdf", "svg")
PROXY_COLOR, GOLDEN_COLOR, TRAIN_COLOR = "tab:blue", "tab:red", "tab:green"


def metric_label(column: str, role: str) -> str:
    """Axis / legend text for a metric column: the divergence, its direction and the reference."""
    reference = {"proxy": "teacher", "golden": "oracle"}.get(role, role)
    if column.endswith("fkl"):
        return f"{role}: KL({reference} ‖ student)"
    if column.endswith("rkl"):
        return f"{role}: KL(student ‖ {reference})"
    return f"{role}: {column}"


def _plain_log_ticks(ax, axis: str = "both") -> None:
    """Tick labels as plain numbers (0.3, 2, 1,000) instead of 3×10⁻¹: easier to read off. An axis
    spanning less than two decades also gets labels at 2× and 5×, or it would show one number."""
    fmt = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 10 else f"{v:g}")
    for name in ("x", "y") if axis == "both" else (axis,):
        ax_axis = getattr(ax, f"{name}axis")
        if getattr(ax, f"get_{name}scale")() != "log":
            continue
        lo, hi = getattr(ax, f"get_{name}lim")()
        if lo > 0 and np.log10(hi / lo) < 2:
            ax_axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax_axis.set_major_formatter(fmt)
        ax_axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _positive(steps, values, se=None):
    """Points drawable on log axes: step > 0 and a finite positive value."""
    steps = np.asarray(steps, dtype=float)
    values = np.asarray(values, dtype=float)
    ok = (steps > 0) & np.isfinite(values) & (values > 0)
    return steps[ok], values[ok], (None if se is None else np.nan_to_num(np.asarray(se, dtype=float)[ok]))


def _value_at(steps, values, step):
    idx = np.flatnonzero(np.asarray(steps) == step)
    return float(values[idx[0]]) if len(idx) else None


def _curves_panel(ax, run: RunAnalysis) -> None:
    m = run.metrics
    steps = m.steps
    s, y, se = _positive(steps, m.proxy, m.proxy_se)
    ax.errorbar(s, y, yerr=se, fmt="o-", ms=3, lw=1.2, capsize=0, color=PROXY_COLOR,
                label=metric_label(m.proxy_col, "proxy") + " (held-out)")
    train_col = "train_" + m.proxy_col
    if m.has(train_col):
        ts, ty, tse = _positive(steps, m.column(train_col), m.optional(train_col + "_se"))
        ax.errorbar(ts, ty, yerr=tse, fmt="s-", ms=2.5, lw=1, capsize=0, color=TRAIN_COLOR, alpha=0.8,
                    label="proxy on training prompts")
    if m.golden is not None:
        gs, gy, gse = _positive(steps, m.golden, m.golden_se)
        ax.errorbar(gs, gy, yerr=gse, fmt="o-", ms=3, lw=1.2, capsize=0, color=GOLDEN_COLOR,
                    label=metric_label(m.golden_col, "golden"))

    verdict = run.proxy
    if verdict.fit is not None:
        lo, hi = verdict.fit_window
        ax.axvspan(lo, hi, color="0.85", alpha=0.6, lw=0, label=f"proxy fit window (steps {lo:,}–{hi:,})")
        grid_in = np.geomspace(lo, hi, 50)
        grid_out = np.geomspace(hi, s[-1], 80)
        law = "c + e^a s^−α" if verdict.law == "floor" else "e^a s^−α"
        ax.plot(grid_in, verdict.fit.predict(grid_in), "k-", lw=1.6,
                label=f"early law {law}, α = {verdict.fit.alpha:.2f}")
        ax.plot(grid_out, verdict.fit.predict(grid_out), "k--", lw=1.2, label="law extrapolated")
        if verdict.test_steps is not None:
            upper = verdict.fit.predict(verdict.test_steps) * np.exp(verdict.thresholds)
            ax.plot(verdict.test_steps, upper, ":", color="0.35", lw=1.2, label="departure threshold")
    if verdict.detected:
        ax.axvline(verdict.onset_step, color=PROXY_COLOR, ls="-.", lw=1.5,
                   label=f"proxy departs from step {verdict.onset_step:,}")
    if run.golden is not None and run.golden.onset_step is not None:
        style = "hacking" if run.golden.detected else run.golden.kind
        ax.axvline(run.golden.onset_step, color=GOLDEN_COLOR, ls=":", lw=1.8,
                   label=f"golden minimum ({style} onset) step {run.golden.onset_step:,}")
    _action_lines(ax, run)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training step (log scale; step 0 not shown)")
    ax.set_ylabel(f"sequence KL ({UNITS})")
    ax.set_title("Proxy and golden vs step" if m.golden is not None else "Proxy vs step")
    ax.grid(True, which="major", alpha=0.3)
    _plain_log_ticks(ax)
    # Below the axes: inside, the legend would hide the late part of the curves, where onsets are.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


ACTION_COLOR = "tab:purple"


def _action_lines(ax, run: RunAnalysis) -> None:
    """The stage-2 controller's actions as vertical lines at their steps (one legend entry per policy); a
    'stop' also marks the step whose weights the run ends with."""
    labelled = set()
    for a in run.actions or []:
        if a["step"] <= 0:
            continue
        label = None if a["policy"] in labelled else f"controller: {a['policy']}"
        labelled.add(a["policy"])
        ax.axvline(a["step"], color=ACTION_COLOR, ls="--", lw=1.4, label=label)
        if a.get("restored_step"):
            ax.axvline(a["restored_step"], color=ACTION_COLOR, ls=":", lw=1.4,
                       label=f"weights restored: step {a['restored_step']:,}")


def _arrow_path(ax, x, y, color, every: int | None = None) -> None:
    """Arrows along a trajectory so the direction of time reads off the plot."""
    n = len(x)
    if n < 2:
        return
    every = every or max(1, n // 8)
    for i in range(0, n - 1, every):
        ax.annotate("", xy=(x[i + 1], y[i + 1]), xytext=(x[i], y[i]),
                    arrowprops=dict(arrowstyle="-|>", color=color, lw=1.0, mutation_scale=11))


def _u_panel(ax, run: RunAnalysis, fig):
    """Golden against proxy coloured by step; returns the coloured scatter (None without one)."""
    m = run.metrics
    if m.golden is None:
        _residual_panel(ax, run)
        return None
    ok = np.isfinite(m.proxy) & np.isfinite(m.golden) & (m.proxy > 0) & (m.golden > 0)
    steps, x, y = m.steps[ok], m.proxy[ok], m.golden[ok]
    ax.plot(x, y, "-", color="0.6", lw=1, zorder=1)
    _arrow_path(ax, x, y, "0.35")
    # A log colour scale has no place for step 0: it is drawn apart (a grey square), and the colour
    # bar spans the positive steps only (it used to start at 10^0 and paint step 0 as step 1).
    later = steps > 0
    if (~later).any():
        ax.scatter(x[~later], y[~later], marker="s", s=26, color="0.5", zorder=3, label="step 0 (before training)")
    sc = None
    if later.any():
        sc = ax.scatter(x[later], y[later], c=steps[later], cmap="viridis", norm=LogNorm(), s=22, zorder=3,
                        edgecolors="none")
        bar = fig.colorbar(sc, ax=ax, label="training step (log scale)")
        # plain numbers (1,000), not 10³: a superscript is set at 70 % of the tick size
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
        bar.ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.annotate(f"start (step {int(steps[0]):,})", (x[0], y[0]), textcoords="offset points", xytext=(-8, -4),
                fontsize=plt.rcParams["legend.fontsize"], ha="right", va="top")
    ax.annotate(f"end (step {int(steps[-1]):,})", (x[-1], y[-1]), textcoords="offset points", xytext=(5, 8),
                fontsize=plt.rcParams["legend.fontsize"])
    if run.golden is not None and run.golden.onset_step is not None:
        gx, gy = _value_at(steps, x, run.golden.onset_step), _value_at(steps, y, run.golden.onset_step)
        if gx is not None:
            ax.plot([gx], [gy], marker="*", ms=14, color=GOLDEN_COLOR, mec="k", zorder=4, ls="none",
                    label=f"golden minimum, step {run.golden.onset_step:,}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{metric_label(m.proxy_col, 'proxy')} ({UNITS})")
    ax.set_ylabel(f"{metric_label(m.golden_col, 'golden')} ({UNITS})")
    ax.set_title("Golden vs proxy (arrows: time)")
    ax.grid(True, which="both", alpha=0.2)
    ax.margins(0.08)
    _plain_log_ticks(ax)
    return sc


def _residual_panel(ax, run: RunAnalysis) -> None:
    """Without an oracle the golden-vs-proxy view is empty; show instead what the proxy-only
    detector tests: log(measured / early law) against the step, with its one-sided threshold."""
    v = run.proxy
    if v.fit is None:
        ax.text(0.5, 0.5, f"no golden metric; proxy law not fitted:\n{v.reason}", ha="center", va="center",
                transform=ax.transAxes, color="0.4", wrap=True)
        ax.set_axis_off()
        return
    ax.axhline(0, color="k", lw=1)
    ax.plot(v.fit.steps, v.fit.residuals, "o", ms=3, color="0.5", label="fit window")
    ax.plot(v.test_steps, v.residuals, "o-", ms=3, color=PROXY_COLOR, label="after the window")
    ax.plot(v.test_steps, v.thresholds, ":", color="0.35", lw=1.4, label="departure threshold (one-sided)")
    if v.detected:
        ax.axvline(v.onset_step, color=PROXY_COLOR, ls="-.", lw=1.5, label=f"departs from step {v.onset_step:,}")
    _step_axes(ax, "log(proxy / early law)", "Proxy vs its early law (no oracle: golden not measured)", "upper left")


def _step_axes(ax, ylabel: str, title: str, legend_loc: str) -> None:
    """A log-scale training-step x axis with plain tick labels, a grid and a legend."""
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    _plain_log_ticks(ax, "x")
    ax.legend(loc=legend_loc)


def _loss_panel(ax, run: RunAnalysis) -> None:
    m = run.metrics
    if not m.has(record.TRAIN_LOSS):
        ax.text(0.5, 0.5, f"no {record.TRAIN_LOSS} logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_axis_off()
        return
    s, y, _ = _positive(m.steps, m.column(record.TRAIN_LOSS))
    ax.plot(s, y, "o-", ms=3, color="0.25", lw=1.2)
    _action_lines(ax, run)
    ax.set_xscale("log")
    if len(y) and np.all(y > 0):
        ax.set_yscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel("training loss (per token, as logged)")
    ax.set_title("Training loss")
    ax.grid(True, which="major", alpha=0.3)
    _plain_log_ticks(ax)


TASK_COLUMNS = {"task_rougeL": "ROUGE-L", "task_bleu": "BLEU"}


def _task_columns(run: RunAnalysis) -> list[tuple[str, str]]:
    """(column, label) of the task metrics a run logged (eval.task_metrics), references first."""
    return [(f"{stem}_{side}", f"{name} vs {'references' if side == 'ref' else 'oracle outputs'}")
            for stem, name in TASK_COLUMNS.items() for side in ("ref", "oracle") if run.metrics.has(f"{stem}_{side}")]


def _task_panel(ax, run: RunAnalysis) -> None:
    """Task metric against the step: what a reader of the outputs sees, beside the divergences."""
    m = run.metrics
    for (column, label), color in zip(_task_columns(run), ("tab:blue", "tab:red", "tab:green", "tab:purple")):
        v = m.column(column)
        keep = np.isfinite(v) & (m.steps > 0)
        ax.plot(m.steps[keep], v[keep], "o-", ms=3, lw=1.2, color=color, label=label)
    _step_axes(ax, "score (0-100, higher is better)", "Task metric of greedy outputs", "best")


def plot_run(run: RunAnalysis, path: str | Path) -> Path:
    """One PNG with the panels of a run (a fourth for task metrics when logged); returns its path."""
    task = bool(_task_columns(run))
    ratios = [1.25, 1.1, 0.8] + ([0.9] if task else [])
    with plt.rc_context(SCREEN_RC):
        fig, axes = plt.subplots(1, len(ratios), figsize=(18 + 5 * task, 6.6), gridspec_kw={"width_ratios": ratios})
        _curves_panel(axes[0], run)
        _u_panel(axes[1], run, fig)
        _loss_panel(axes[2], run)
        if task:
            _task_panel(axes[3], run)
        fig.suptitle(f"{run.name} — {run.condition}" + (f", seed {run.seed}" if run.seed is not None else "")
                     + f"\n{run.verdict_text()}", fontsize=12)
        # Fixed margins instead of tight_layout, which renders the figure once more just to measure it
        # (half the time of a report); the bottom margin holds the first panel's legend.
        fig.subplots_adjust(left=0.045, right=0.985, top=0.85, bottom=0.3, wspace=0.28)
        path = Path(path)
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return path


def _save_panel(draw, path_stem: Path, size=PAPER_SIZE) -> list[Path]:
    """Draw one panel alone at column width (`draw(ax, fig)`) and save it as PDF and SVG. The title
    is dropped (a paper's caption says it); the legend stays, below or inside the axes."""
    with plt.rc_context(PAPER_RC):
        fig, ax = plt.subplots(figsize=size)
        draw(ax, fig)
        ax.set_title("")
        if ax.get_legend_handles_labels()[0]:  # below the axes: at this size it would cover the data
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)
        out = []
        for fmt in PANEL_FORMATS:
            target = path_stem.with_suffix(f".{fmt}")
            fig.savefig(target, bbox_inches="tight", pad_inches=0.02)
            out.append(target)
        plt.close(fig)
    return out


def save_run_panels(run: RunAnalysis, directory: str | Path) -> list[Path]:
    """Each panel of a run as its own PDF and SVG in `directory` (curves, golden_vs_proxy or
    residuals, loss, and task when logged), sized for one column of a paper."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    panels = [("curves", lambda ax, fig: _curves_panel(ax, run), PAPER_SIZE),
              ("golden_vs_proxy" if run.metrics.golden is not None else "proxy_residuals",
               lambda ax, fig: _u_panel(ax, run, fig), (PAPER_SIZE[0], 3.0)),  # room for the long y label
              ("loss", lambda ax, fig: _loss_panel(ax, run), PAPER_SIZE)]
    if _task_columns(run):
        panels.append(("task", lambda ax, fig: _task_panel(ax, run), PAPER_SIZE))
    return [p for name, draw, size in panels for p in _save_panel(draw, directory / name, size)]


def condition_band(runs: list[RunAnalysis], column: str):
    """(steps, mean, SE) of `column` over the runs of one condition at the steps > 0 where every run
    has a finite positive value; SE = sample SD over runs / √n. None with fewer than two runs or no
    common step."""
    if len(runs) < 2:
        return None
    tables = []
    for r in runs:
        s, y, _ = _positive(r.metrics.steps, r.metrics.column(column))
        tables.append(dict(zip(s.astype(int).tolist(), y.tolist())))
    common = sorted(set.intersection(*(set(t) for t in tables)))
    if not common:
        return None
    values = np.array([[t[s] for s in common] for t in tables])
    return (np.array(common), values.mean(0), values.std(0, ddof=1) / np.sqrt(len(runs)))


def _sweep_axes(groups: dict[str, list[RunAnalysis]], axes) -> bool:
    """Draw the sweep's three comparisons on `axes`; returns whether any run has a golden metric.
    Each condition: its mean over seeds with a ±1 SE band (over seeds) where it has several, its
    seeds as thin lines, and the onsets (▲ proxy departure, ★ golden minimum of a hacking run)."""
    cmap = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    any_golden = False
    for ci, (label, runs) in enumerate(groups.items()):
        color = cmap(ci % cmap.N)
        m0 = runs[0].metrics
        bands = {"proxy": condition_band(runs, m0.proxy_col),
                 "golden": condition_band(runs, m0.golden_col) if m0.golden is not None else None}
        thin = dict(lw=0.8, alpha=0.35) if len(runs) > 1 else dict(lw=1.2, alpha=0.9)
        for k, run in enumerate(runs):
            m = run.metrics
            tag = label if k == 0 and bands["proxy"] is None else None  # one legend entry per condition
            s, y, _ = _positive(m.steps, m.proxy)
            axes[0].plot(s, y, "-", color=color, label=tag, **thin)
            if run.proxy.detected:
                v = _value_at(s, y, run.proxy.onset_step)
                axes[0].plot([run.proxy.onset_step], [v], "^", color=color, mec="k", ms=8, zorder=4)
            for a in run.actions or []:  # the controller's actions: a diamond on the curve at each
                v = _value_at(s, y, a["step"])
                if v is not None:
                    axes[0].plot([a["step"]], [v], "D", color=color, mec=ACTION_COLOR, mew=1.5, ms=7, zorder=4)
            if m.golden is None:
                continue
            any_golden = True
            gs, gy, _ = _positive(m.steps, m.golden)
            axes[1].plot(gs, gy, "-", color=color, label=tag if bands["golden"] is None else None, **thin)
            ok = np.isfinite(m.proxy) & np.isfinite(m.golden) & (m.proxy > 0) & (m.golden > 0)
            axes[2].plot(m.proxy[ok], m.golden[ok], "-", color=color, label=tag if bands["golden"] is None else None,
                         **thin)
            if len(runs) == 1:
                _arrow_path(axes[2], m.proxy[ok], m.golden[ok], color, every=max(1, ok.sum() // 4))
            if run.golden is not None and run.golden.onset_step is not None:
                v = _value_at(gs, gy, run.golden.onset_step)
                marker = "*" if run.golden.detected else "X"
                axes[1].plot([run.golden.onset_step], [v], marker, color=color, mec="k", ms=10, zorder=4)
        for ax, band in ((axes[0], bands["proxy"]), (axes[1], bands["golden"])):
            if band is not None:
                bs, mean, se = band
                ax.plot(bs, mean, "-", color=color, lw=1.8, label=f"{label} (mean ± SE, {len(runs)} seeds)")
                ax.fill_between(bs, np.maximum(mean - se, 1e-12), mean + se, color=color, alpha=0.25, lw=0)
        if bands["proxy"] is not None and bands["golden"] is not None:
            # golden vs proxy: the mean trajectory over the steps both bands share
            ps, pm, _ = bands["proxy"]
            gs_, gm, _ = bands["golden"]
            both = np.intersect1d(ps, gs_)
            px, gx = pm[np.isin(ps, both)], gm[np.isin(gs_, both)]
            axes[2].plot(px, gx, "-", color=color, lw=1.8, label=f"{label} (mean)")
            _arrow_path(axes[2], px, gx, color, every=max(1, len(both) // 4))
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
        _plain_log_ticks(ax)
    first = next(iter(groups.values()))[0].metrics
    acted = any(run.actions for runs in groups.values() for run in runs)
    axes[0].set_title("Proxy vs step (▲ proxy-only departure onset" + (", ◆ controller action)" if acted else ")"))
    axes[0].set_xlabel("training step (log scale)")
    axes[0].set_ylabel(f"{metric_label(first.proxy_col, 'proxy')} ({UNITS})")
    axes[1].set_title("Golden vs step (★ golden minimum of a hacking run, ✖ over-fitting)")
    axes[1].set_xlabel("training step (log scale)")
    axes[1].set_ylabel(f"{metric_label(first.golden_col, 'golden')} ({UNITS})")
    axes[2].set_title("Golden vs proxy (arrows: time)")
    axes[2].set_xlabel(f"proxy ({UNITS})")
    axes[2].set_ylabel(f"golden ({UNITS})")
    if not any_golden:
        for ax in axes[1:]:
            ax.cla()
            ax.text(0.5, 0.5, "no golden metric in these runs", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
    return any_golden


def plot_sweep(groups: dict[str, list[RunAnalysis]], path: str | Path) -> Path:
    """All runs overlaid, one colour per condition: proxy vs step, golden vs step, golden vs proxy,
    each condition's mean over seeds with a ±1 SE band. Onsets are marked on the curves."""
    with plt.rc_context(SCREEN_RC):
        fig, axes = plt.subplots(1, 3, figsize=(18, 6.2))
        _sweep_axes(groups, axes)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), frameon=False,
                   title="condition (thin lines: its seeds; band: ±1 SE over seeds)")
        fig.subplots_adjust(left=0.045, right=0.99, top=0.93, bottom=0.26 + 0.05 * ((len(labels) - 1) // 4),
                            wspace=0.22)
        path = Path(path)
        fig.savefig(path, dpi=90)
        plt.close(fig)
    return path


def save_sweep_panels(groups: dict[str, list[RunAnalysis]], directory: str | Path) -> list[Path]:
    """The sweep's three comparisons as one PDF and one SVG each, at column width, legend below."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(("proxy_vs_step", "golden_vs_step", "golden_vs_proxy")):
        def draw(ax, fig, i=i):
            with plt.rc_context({"figure.figsize": PAPER_SIZE}):
                scratch = [plt.figure().add_subplot() for _ in range(3)]
            scratch[i] = ax
            _sweep_axes(groups, scratch)
            for other in scratch:
                if other is not ax:
                    plt.close(other.figure)
        if i > 0 and all(r.metrics.golden is None for runs in groups.values() for r in runs):
            continue
        out += _save_panel(draw, directory / name, PAPER_SIZE if i < 2 else (PAPER_SIZE[0], 3.0))
    return out
