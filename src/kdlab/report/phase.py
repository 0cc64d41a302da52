"""The phase map's heat map: one panel per student capacity, teacher quality down, offline data across.

Each cell's colour is its golden rise in units of its paired SE (blue: still falling, white: flat,
red: rising; clipped at ±10 SE), so a glance finds where the golden turns up. Each cell is annotated
with its verdict (hacking / over-fitting / mixed / none, with the seeds that hack) and the iso-proxy
gap against the online control. A row label gives the teacher's golden over the online student's
best and whether the paper's ordering holds there (✓) or not (✗). Written as PNG and PDF at a
paper's two-column width.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

SHORT = {"hacking": "HACK", "over-fitting": "overfit", "mixed": "mixed", "none": "–", "not run": "not run"}


def _mean(values):
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.mean(v)) if v else None


def plot_phase(result: dict, stem: str | Path) -> list[Path]:
    """Draw `result` (pipeline.phase.judge_phase) to `<stem>.png` and `<stem>.pdf`."""
    stem = Path(stem)
    rows, cols, panels = result["rows"], result["columns"], result["panels"]
    width = 7.0  # inches: a paper's full text width
    height = 1.0 + 0.55 * len(rows) * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False)
    im = None
    for ax, panel in zip(axes[:, 0], panels):
        z = np.full((len(rows), len(cols)), np.nan)
        text = [["" for _ in cols] for _ in rows]
        row_labels = []
        for i, row in enumerate(rows):
            worlds = [w for w in result["worlds"] if w["panel"] == panel and w["row"] == row]
            ratio = _mean([w["ratio"] for w in worlds])
            order = [w["paper_ordering"] for w in worlds if w["paper_ordering"] is not None]
            mark = "✓" if order and all(order) else ("✗" if order and not any(order) else f"{sum(map(bool, order))}/{len(order)}")
            row_labels.append(f"{row}\nteacher/online {ratio:.2f} {mark}" if ratio is not None else row)
            for j, col in enumerate(cols):
                cells = [c for c in result["cells"] if c["panel"] == panel and c["row"] == row and c["column"] == col]
                if not cells:
                    continue
                zs = [c["golden_rise"] / c["golden_rise_paired_se"] for c in cells
                      if c["golden_rise"] is not None and c["golden_rise_paired_se"]]
                z[i, j] = np.clip(np.mean(zs), -10, 10) if zs else np.nan
                hack = sum(c["hacking_seeds"] for c in cells)
                n = sum(c["seeds"] for c in cells)
                verdicts = {c["verdict"] for c in cells}
                verdict = SHORT.get(verdicts.pop(), "?") if len(verdicts) == 1 else "varies"
                gap = _mean([c["iso_proxy_gap"] for c in cells])
                rise = _mean([c["golden_rise"] for c in cells])
                text[i][j] = "not run" if rise is None else f"{verdict} {hack}/{n}\nrise {rise:+.2f}" + (
                    f"\ngap {gap:+.2f}" if gap is not None else "")
        im = ax.imshow(z, cmap="RdBu_r", vmin=-10, vmax=10, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=6.5,
                        color="black" if np.isnan(z[i, j]) or abs(z[i, j]) < 6 else "white")
        ax.set_xticks(range(len(cols)), cols, fontsize=8)
        ax.set_yticks(range(len(rows)), row_labels, fontsize=7)
        ax.set_title(panel or "phase map", fontsize=9)
        ax.tick_params(length=0)
    axes[-1, 0].set_xlabel("offline data (prompts × generations)", fontsize=8)
    cbar = fig.colorbar(im, ax=axes[:, 0].tolist(), shrink=0.9, pad=0.02)
    cbar.set_label("golden rise / paired SE", fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        fig.savefig(path, dpi=200, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths
