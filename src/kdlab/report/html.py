"""The self-contained HTML page: verdict tables, figures embedded as base64 PNG, run configs."""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path

from kdlab import record
from kdlab.analysis.detectors import GOLDEN, PROXY_DEVIATION
from kdlab.analysis.runs import RunAnalysis, golden_status, golden_tested, proxy_status

_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 24px auto; max-width: 1500px;
       padding: 0 16px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.hacking { background: #fde0dc; font-weight: 600; }
td.overfitting { background: #fff1c9; }
td.departs { background: #fde0dc; }
td.none { color: #555; }
td.untested { color: #8a5a00; font-style: italic; }
.holds { color: #176317; font-weight: 600; }
.fails { color: #a31515; font-weight: 600; }
img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
.muted { color: #666; font-size: 13px; }
.warn { background: #fff3cd; border-left: 4px solid #d39e00; padding: 6px 10px; }
"""


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _e(value) -> str:
    return html.escape("–" if value is None else str(value))


def _num(value, fmt="{:.3g}") -> str:
    return "–" if value is None else fmt.format(value)


def _step(value) -> str:
    return "–" if value is None else f"{int(value):,}"


def _run_row(run: RunAnalysis) -> str:
    g, p = run.golden, run.proxy
    if g is None or not golden_tested(g):
        text = golden_status(g) if g is None else f"not tested ({g.reason})"
        g_cells = f'<td class="{"none" if g is None else "untested"}">{_e(text)}</td><td>–</td><td>–</td><td>–</td>'
    else:
        rise = "–" if g.rise is None else f"{g.rise:+.3g} ± {g.rise_se:.2g} (z = {g.rise_z:.1f})"
        change = "–" if g.proxy_change is None else f"{g.proxy_change:+.3g} ± {g.proxy_change_se:.2g} ({g.proxy_trend})"
        g_cells = (f'<td class="{g.kind}">{_e(g.kind)}</td><td>{_step(g.onset_step)}</td>'
                   f"<td>{_e(rise)}</td><td>{_e(change)}</td>")
    status = proxy_status(p)
    p_class = {"departs": "departs", "on its law": "none"}.get(status, "untested")
    p_text = status if status != "not tested" else f"not tested ({p.reason})"
    p_cells = (f'<td class="{p_class}">{_e(p_text)}</td>'
               f"<td>{_step(p.onset_step)}</td><td>{_num(p.residual_at_end, '{:+.3f}')}</td>")
    q = run.sequential
    if q is None:
        q_cells = "<td>–</td><td>–</td>"
    elif q.statistic is None:  # too few evaluations: no verdict, not a clean bill
        q_cells = f'<td class="none">not tested</td><td>{_e(q.reason)}</td>'
    else:
        where = f"{_step(q.onset_step)} ({_step(q.onset_interval[0])}–{_step(q.onset_interval[1])})" if q.detected else "–"
        q_cells = (f'<td class="{"departs" if q.detected else "none"}">'
                   f'{"departs" if q.detected else "on its law"} ({_e(q.time_axis)} time)</td><td>{_e(where)}</td>')
    return (f"<tr><td>{_e(run.name)}</td><td>{_e(run.condition)}</td><td>{_e(run.seed)}</td>"
            f"<td>{_e(run.regime)}</td><td>{_step(run.metrics.steps[-1])}</td>{g_cells}{p_cells}{q_cells}"
            f"<td>{_e('; '.join(run.notes) or '')}</td></tr>")


def _condition_table(summary: dict) -> str:
    rows = []
    for c in summary["conditions"]:
        g = c[GOLDEN]
        golden = "no oracle" if g is None else f"{g['detected']}/{g['n']}"
        g_onset = "–" if g is None else _step(g["onset_median"])
        p = c[PROXY_DEVIATION]
        cls = "hacking" if g is not None and g["detected"] else "none"
        final = c.get("final") or {}
        rows.append(
            f"<tr><td>{_e(c['condition'])}</td><td>{_e(c['regime'])}</td><td>{len(c['runs'])}</td>"
            f'<td class="{cls}">{_e(golden)}</td><td>{g_onset}</td>'
            f"<td>{p['detected']}/{p['n']}</td><td>{_step(p['onset_median'])}</td>"
            f"<td>{_mean_se(final.get('golden'))}</td><td>{_mean_se(final.get('proxy'))}</td>"
            f"<td>{_mean_se(final.get('stage2_seconds'), '{:.0f}')}</td><td>{_e(c['verdict'])}</td></tr>"
        )
    return (
        "<table><tr><th>condition</th><th>regime</th><th>runs</th><th>golden: hacking</th>"
        "<th>golden onset (median)</th><th>proxy-only: departs</th><th>proxy onset (median)</th>"
        "<th>final golden (mean ± SE over seeds)</th><th>final proxy</th><th>stage-2 wall time (s)</th>"
        "<th>verdict</th></tr>" + "".join(rows) + "</table>"
    )


def _mean_se(v: dict | None, fmt: str = "{:.3f}") -> str:
    """A mean over seeds with its standard error ('–' when unknown; no ± with one seed)."""
    if not v or v["mean"] is None:
        return "–"
    return fmt.format(v["mean"]) + ("" if v.get("se") is None else " ± " + fmt.format(v["se"]))


def _findings(findings: list[dict]) -> str:
    """The paper's findings as `kdlab demo` checked them: status, evidence, and the budgets at which
    each was re-checked."""
    items = []
    for f in findings:
        status = {True: ("HOLDS", "holds"), False: ("DOES NOT HOLD", "fails"), None: ("UNDECIDED", "")}[f["holds"]]
        window = ", ".join(f"{b}: {'yes' if v else 'no' if v is False else '?'}" for b, v in f["by_budget"].items())
        items.append(f"<li><span class='{status[1]}'>[{status[0]}]</span> {_e(f['title'])}<br>"
                     f"<span class='muted'>{_e(f['evidence'])}<br>by budget (steps): {_e(window)}</span></li>")
    return "<ul>" + "".join(items) + "</ul>"


def render(summary: dict, runs: list[RunAnalysis], run_plots: dict[str, Path], sweep_plot: Path | None,
           title: str, findings: list[dict] | None = None, attribution: dict | None = None) -> str:
    """The HTML page as a string. `run_plots` maps run path (str) → its PNG; `findings` (dicts of
    `Finding.to_dict`) are shown first when given."""
    import yaml

    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class='muted'>Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by kdlab report from "
        f"{len(runs)} run(s). Divergences are sequence-level, in {_e('nats per response')}; ± is one standard error.</p>",
        _storage(runs),
        *(["<h2>Findings of the paper, checked on these runs</h2>", _findings(findings)] if findings else []),
        "<h2>Verdicts by condition</h2>",
        _condition_table(summary),
        "<h2>Verdicts by run</h2>",
        "<table><tr><th>run</th><th>condition</th><th>seed</th><th>regime</th><th>last step</th>"
        "<th>golden verdict</th><th>golden onset (minimum)</th><th>golden rise</th><th>proxy change over the rise</th>"
        "<th>proxy-only</th><th>proxy onset</th><th>log residual at end</th>"
        "<th>sequential proxy-only (experimental)</th><th>onset (interval)</th><th>notes</th></tr>",
        "".join(_run_row(r) for r in runs),
        "</table>",
        "<p class='muted'><b>Golden detector</b>: golden (KL to the oracle) rises from its minimum by more than "
        "its noise while the held-out proxy (KL to the teacher) keeps falling or stays flat within its noise → "
        "teacher hacking (Tiapkin et al. 2025); when the held-out proxy rises beyond its noise too, both rise: "
        "over-fitting; a proxy rising while golden does not is 'proxy_rise'. <b>Proxy-only detector</b> (no oracle "
        "needed): the proxy leaves the power law of an early window <i>upwards</i> for good (a healthy run stays "
        "on or below the line). <b>Sequential proxy-only</b> (experimental: on held-out curves it caught 8 % of hacking runs and raised up to 24 % false alarms, bench/DETECTION.md): each evaluation is tested against the law of the "
        "ones before it (CUSUM, confirmed by a broken power law), in cumulative-learning-rate time when the run "
        "logs its learning rate; the onset comes with an interval.</p>",
    ]
    if any(r.actions is not None for r in runs):
        parts += ["<h2>Controller actions</h2>", _actions(runs)]
    if attribution is not None:
        parts += ["<h2>Attribution of the golden rises</h2>", _attribution(attribution)]
    if sweep_plot is not None:
        parts += ["<h2>All runs, by condition</h2>", _img(sweep_plot)]
    parts.append("<h2>Runs</h2>")
    for run in runs:
        parts.append(f"<h3 id='{_e(run.name)}'>{_e(run.name)} <span class='muted'>({_e(run.path)})</span></h3>")
        parts.append(f"<p>{_e(run.verdict_text())}.</p>")
        reasons = []
        if run.golden is not None:
            reasons.append(f"golden: {run.golden.reason}")
        reasons.append(f"proxy-only: {run.proxy.reason}")
        for name, alarm in run.alarms.items():  # the drift panel's alarms, when the run logged it (issue 21)
            reasons.append(f"alarm {name}: {'FIRED' if alarm.fired else 'quiet'} — {alarm.reason}")
        parts.append("<ul>" + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>")
        plot = run_plots.get(str(run.path))
        if plot is not None:
            parts.append(_img(plot))
        config_text = yaml.safe_dump(run.config, sort_keys=False) if run.config else "(no config.yaml)"
        parts.append(f"<details><summary>config of {_e(run.name)}</summary><pre>{_e(config_text)}</pre></details>")
    parts.append("<h2>Detector thresholds</h2>")
    parts.append(f"<pre>{_e(json.dumps(summary.get('thresholds', {}), indent=2))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _actions(runs: list[RunAnalysis]) -> str:
    """The stage-2 controller's actions (controller.jsonl of each run that has one): when, on which detector's
    alarm, what it did and what it cost. Marked on the curves as vertical lines."""
    rows = []
    for run in runs:
        if run.actions is None:
            continue
        if not run.actions:
            rows.append(f"<tr><td>{_e(run.name)}</td><td colspan='8' class='none'>no action (the trigger never fired "
                        "while the controller could act)</td></tr>")
        for a in run.actions:
            detail = []
            if a.get("replaced"):
                detail.append(f"{a['replaced']} sequences replaced" + (f", {a['new_prompts']} new prompts"
                                                                       if a.get("new_prompts") else ""))
            if a.get("lmbda") is not None:
                detail.append(f"on-policy fraction {a['lmbda']:g} from the next step")
            if a.get("restored_step") is not None:
                detail.append(f"run stopped; weights of step {a['restored_step']:,} restored (golden "
                              f"{_num(a.get('restored_golden_fkl'))}, proxy {_num(a.get('restored_proxy_fkl'))})")
            budget = f" of {a['budget']:,}" if a.get("budget") is not None else ""
            rows.append(f"<tr><td>{_e(run.name)}</td><td>{_step(a['step'])}</td><td>{_e(a['policy'])}</td>"
                        f"<td>{_e(a.get('detector'))}</td><td>{_step(a.get('onset_step'))}</td>"
                        f"<td>{a.get('teacher_samples', 0):,} ({a.get('teacher_samples_total', 0):,}{budget} so far)</td>"
                        f"<td>{_num(a.get('sampling_seconds'), '{:.2f}')} / {_num(a.get('seconds'), '{:.2f}')}</td>"
                        f"<td>{_e('; '.join(detail))}</td><td>{_e(a.get('reason'))}</td></tr>")
    return ("<table><tr><th>run</th><th>step</th><th>policy</th><th>detector</th><th>onset</th>"
            "<th>extra teacher samples (run total)</th><th>seconds sampling / whole action</th><th>what changed</th>"
            "<th>detector's reason</th></tr>" + "".join(rows) + "</table><p class='muted'>stage2.controller "
            "(kdlab.pipeline.controller): after each evaluation the detectors run on the curve so far; an action "
            "takes effect from the next training step. On-policy batches after a 'mix' cost student sampling and a "
            "live teacher forward each; that cost shows in the run's wall time, not here.</p>")


def _storage(runs: list[RunAnalysis]) -> str:
    """Which storage produced the metrics: one line when every number is exact, a warning naming the
    runs whose metrics are top-k lower bounds (issue 18)."""
    labels = sorted({label for run in runs for label in run.storage.values()})
    bounded = sorted({f"{run.name}: {col}" for run in runs for col in record.lower_bounds(run.metrics.rows)})
    if bounded:
        return ("<p class='warn'><b>Lower bounds</b>: these metrics kept only the reference's top-k log-probs, so "
                "they are lower bounds of the full-vocabulary KL, not the KL: " + _e("; ".join(bounded)) +
                ". Run the evaluation with eval.storage=auto for exact values.</p>")
    if not labels:
        return "<p class='muted'>The logs do not say how the references' distributions were held.</p>"
    return (f"<p class='muted'>Every metric is exact (the reference's distributions held as: {_e(', '.join(labels))}; "
            "'hidden' = its final hidden states and output head, 'live' = the model run at each evaluation).</p>")


def _attribution(a: dict) -> str:
    """The attribution table: ordering, and per condition the teacher floor and the iso-proxy gap."""
    def pm(pair):
        mean, se = pair if isinstance(pair, (list, tuple)) else (pair, None)
        return "–" if mean is None else f"{mean:+.3f}" + (f" ± {se:.2g}" if se else "")

    head = (f"<p>Teacher's own golden: {_num(a['teacher_golden'])}; online control's best golden: "
            f"{_num(a['online_best'])}. ")
    ordering = a.get("ordering") or {}
    if ordering.get("holds"):
        head += "The paper's ordering holds: every student stays above the teacher's golden, online ones approach it.</p>"
    elif a.get("online_best") is not None and a.get("teacher_golden") is not None and a["teacher_golden"] > a["online_best"]:
        head += ("<b>Not the paper's ordering</b>: students get closer to the truth than their teacher, so a golden "
                 "rise can be a student converging towards a worse teacher (case i), whatever the data.</p>")
    else:
        head += "Ordering: " + _e("; ".join(ordering.get("reasons") or ["not determined"])) + "</p>"
    rows = ["<table><tr><th>condition</th><th>hacking (paper's sense)</th><th>golden below the teacher's</th>"
            "<th>iso-proxy gap (vs online control)</th><th>part of the golden change the regime adds</th>"
            "<th>part the online path gives</th></tr>"]
    for name, c in a["conditions"].items():
        gap = c.get("iso_proxy_gap") or {}
        rows.append(f"<tr><td>{_e(name)}</td><td>{c['hacking']}/{c['seeds']}</td>"
                    f"<td>{_e(c.get('teacher_floor_crossed', '–'))}/{c['seeds']}</td>"
                    f"<td>{pm((gap.get('gap_end'), gap.get('gap_end_se'))) if gap.get('gap_end') is not None else _e(gap.get('reason') or '–')}</td>"
                    f"<td>{pm((gap.get('regime_part'), gap.get('regime_part_se')))}</td>"
                    f"<td>{pm(gap.get('control_part'))}</td></tr>")
    rows.append("</table><p class='muted'>The iso-proxy gap: at the same proxy (closeness to the teacher), how much "
                "further from the truth a condition is than the online control (SE over seeds) — the data regime's "
                "own cost, case (ii). kdlab.analysis.attribution.</p>")
    return head + "".join(rows)
