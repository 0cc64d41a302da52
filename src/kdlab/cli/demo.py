"""`kdlab demo`: the teacher-hacking study reproduced on the embedded synthetic world."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from kdlab.data.regimes import OFFLINE, ONLINE_REGIMES, ONLINE_TEACHER


def command(
    quick: Annotated[bool, typer.Option(help="A reduced study on a tiny world (for tests; shows nothing).")] = False,
    out: Annotated[Path, typer.Option(help="Study directory (one subdirectory per condition and seed).")] = Path("runs/demo"),
    seeds: Annotated[int, typer.Option(min=0, help="Seeds per condition (they vary data and sampling); 0 = 3, or 2 with --quick.")] = 0,
    jobs: Annotated[int, typer.Option(min=1, help="Runs in parallel (one torch thread each).")] = 2,
) -> None:
    """Reproduce the teacher-hacking study on the embedded synthetic world: build the world, distil
    under offline / online-teacher / on-policy data and the diversity variants on equal budgets,
    then print per-condition verdicts and whether each finding of the paper holds."""
    from kdlab.analysis import analyse, find_runs
    from kdlab.analysis.findings import budgets_for, check_findings, condition_rows
    from kdlab.analysis.runs import group_conditions
    from kdlab.pipeline.demo import DIVERSITY_ORDER, GENERATIONS_ORDER, demo_conditions, demo_config
    from kdlab.pipeline.study import run_study, study_configs
    from kdlab.report import write_report

    t0 = time.time()
    cfg = demo_config(quick)
    n_seeds = seeds or (2 if quick else 3)
    conditions = demo_conditions(cfg)
    configs = study_configs(cfg, conditions, list(range(n_seeds)), out)
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    s2 = cfg.stage2
    say(f"kdlab demo{' --quick' if quick else ''}: {len(conditions)} conditions x {n_seeds} seeds -> {out}")
    say(f"budget per run: {s2.steps} steps x batch {s2.batch_size} x {cfg.world.response_length} response tokens")
    run_study(configs, jobs=jobs, log=say)

    runs = [analyse(d) for d in find_runs([out])]
    groups = group_conditions(runs)
    n = s2.offline.num_prompts
    budgets = budgets_for(s2.steps)
    # the demo names its regime conditions by their regimes (kdlab.pipeline.demo.demo_conditions)
    online = [c.name for c in conditions if c.name in ONLINE_REGIMES]
    findings = check_findings(groups, offline=OFFLINE, online=online,
                              diversity=DIVERSITY_ORDER(n), generations=GENERATIONS_ORDER(n), budgets=budgets)
    rows = condition_rows(groups)
    report = write_report([out], findings=findings)  # the findings go on the report's page too
    epochs = {c.name: _epochs(c.overrides, s2.steps, s2.batch_size) for c in conditions}

    typer.echo(_table(rows, epochs))
    typer.echo("")
    typer.echo(f"Findings (budget: {s2.steps} steps x batch {s2.batch_size}; re-checked at steps {budgets}):")
    if quick:
        typer.echo("  (--quick runs a tiny world on a short budget to check that the study runs end to end; it is too "
                   "small to show the findings, so DOES NOT HOLD below says nothing about them. "
                   "Run `kdlab demo` without --quick for the study.)")
    for f in findings:
        status = {True: "HOLDS", False: "DOES NOT HOLD", None: "UNDECIDED"}[f.holds]
        window = ", ".join(f"{b}: {'yes' if v else 'no' if v is False else '?'}" for b, v in f.by_budget.items())
        typer.echo(f"  [{status}] {f.title}\n      {f.evidence}\n      by budget (steps): {window}")
    from kdlab.analysis.worlds import assess_runs
    from kdlab.pipeline.demo import attribution_lines, evidence_lines

    assessment = assess_runs(runs, control=ONLINE_TEACHER)
    offline_names = [c.name for c in conditions if c.name not in online]
    typer.echo(f"\nAttribution of the golden rises (vs the {ONLINE_TEACHER} control; kdlab.analysis.attribution):")
    for line in attribution_lines(assessment, offline_names):
        typer.echo(f"  {line}")
    evidence = evidence_lines()
    if evidence and not quick:
        typer.echo("")
        typer.echo("\n".join(evidence))
    seconds = round(time.time() - t0, 1)
    typer.echo(f"\nreport: {report}  ({seconds:.0f} s)")

    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["demo"] = {
        "quick": quick, "seeds": n_seeds, "seconds": seconds,
        "budget": {"steps": s2.steps, "batch_size": s2.batch_size, "response_length": cfg.world.response_length,
                   "epochs_by_condition": epochs},
        "conditions": rows, "findings": [f.to_dict() for f in findings],
        "attribution": assessment.to_dict(),
    }
    from kdlab.pipeline.rundir import atomic_write_json

    atomic_write_json(summary_path, summary)


def _epochs(overrides: list[str], steps: int, batch: int) -> float | None:
    kv = dict(o.split("=", 1) for o in overrides)
    if kv.get("stage2.regime") != OFFLINE:
        return None
    size = int(kv["stage2.offline.num_prompts"]) * int(kv["stage2.offline.generations_per_prompt"])
    return round(steps * batch / size, 1)


def _pm(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.2f}" + (f"±{stat['se']:.2f}" if stat["se"] is not None else "")


def _table(rows: list[dict], epochs: dict) -> str:
    head = ("condition", "epochs", "golden start", "golden min", "golden end", "proxy start", "proxy end",
            "golden detector", "proxy-only detector")
    lines = []
    for r in rows:
        g = f"{r['golden_detected']}/{r['seeds']}"
        if r["golden_onsets"]:
            g += f" @ {int(sorted(r['golden_onsets'])[len(r['golden_onsets']) // 2])}"
        if r["golden_overfitting"]:
            g += f" (+{r['golden_overfitting']} over-fit)"
        p = f"{r['proxy_detected']}/{r['seeds']}"
        if r["proxy_onsets"]:
            p += f" @ {int(sorted(r['proxy_onsets'])[len(r['proxy_onsets']) // 2])}"
        ep = epochs.get(r["condition"])
        lines.append((r["condition"], "online" if ep is None else f"{ep:g}", _pm(r["golden_start"]),
                      _pm(r["golden_min"]), _pm(r["golden_end"]), _pm(r["proxy_start"]), _pm(r["proxy_end"]), g, p))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    out = ["Verdicts (golden and proxy in nats per response, mean over seeds ± SE; detector: seeds flagged @ median onset step)",
           fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(row) for row in lines]
    return "\n".join(out)
