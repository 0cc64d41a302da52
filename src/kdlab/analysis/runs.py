"""Verdicts for run directories and sweeps, grouped into conditions with seeds aggregated.

A run directory holds `metrics.jsonl` and (normally) `config.yaml`; a sweep directory holds run
directories. This module reads them and nothing else — it never imports training code.

Conditions. Runs that differ only by their seed form one condition. Two runs are grouped when they
share (a) their explicit condition name — config `condition`, else the `condition` field of the
metrics rows (the pipeline writes its config `name` there), else config `name`; kdlab's default
name "run" and a trailing seed suffix are ignored — and (b) their config without its seeds (any key
whose last part holds "seed") and the top-level bookkeeping keys (`name`, `condition`, `output_dir`,
`cache_dir`, ...: `_ignored`). A nested `name` (`loss.name`, `world.task.name`) is a setting and
splits conditions. Without a config.yaml, the name (else the directory name without its
`seed…` / `_s<N>` suffix) alone decides. Runs of one condition that share a seed are repeats, not
independent seeds: the condition counts each seed once (the first run of it) and says so in its notes.
The label shown is the explicit name, else "<regime> <num_prompts>×<generations_per_prompt>" for
offline runs and "<regime>" otherwise (config `stage2.*` or the metrics' `regime`); when two groups
would share a label, the config values that differ are appended ("offline (lr=0.001)").
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdlab.analysis.alarms import check_alarms
from kdlab.analysis.detectors import (
    GOLDEN,
    PROXY_DEVIATION,
    PROXY_SEQUENTIAL,
    GoldenConfig,
    GoldenVerdict,
    ProxyDeviationConfig,
    ProxyVerdict,
    _jsonable,
    detect_golden,
    detect_proxy_deviation,
)
from kdlab import record
from kdlab.analysis.sequential import SequentialConfig, SequentialVerdict, detect_proxy_sequential, lr_columns
from kdlab.data.regimes import OFFLINE
from kdlab.record import Metrics, MetricsError, find_runs, is_run_dir, read_metrics, read_per_prompt

# Config keys that do not define the condition: seeds vary across the runs of one condition (any
# key whose last part holds "seed"); names, output paths and resource settings of the run itself are
# per run by construction (top-level keys only: `loss.name` or `world.task.path` are settings).
_TOP_LEVEL_IGNORED = {"name", "condition", "run_name", "resume", "output_dir", "cache_dir", "out", "root", "tag",
                      "threads", "device"}
_IGNORED_ANYWHERE = re.compile(r"(seed|_dir$|^output_)", re.I)


def _ignored(dotted: str) -> bool:
    last = dotted.rsplit(".", 1)[-1]
    return ("." not in dotted and dotted.lower() in _TOP_LEVEL_IGNORED) or bool(_IGNORED_ANYWHERE.search(last))


_SEED_SUFFIX = re.compile(r"([-_.]?seed[-_]?\d+|[-_]s\d+)$", re.I)
_PLACEHOLDER_NAMES = {"", "run"}  # kdlab's default `name`: not a condition


def load_config(run_dir: str | Path) -> dict:
    """The run's config.yaml as a dict ({} when absent). A malformed file raises MetricsError."""
    import yaml

    path = Path(run_dir) / record.CONFIG
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise MetricsError(f"{path}{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise MetricsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt_step(v) -> str:
    return "–" if v is None else f"{int(v):,}"


def golden_tested(v: GoldenVerdict | None) -> bool:
    """The golden detector ran its test (it had enough evaluations to find a minimum and a tail)."""
    return v is not None and v.rise is not None


def proxy_tested(v: ProxyVerdict | None) -> bool:
    """The proxy-only detector fitted its early law and had points after it to test."""
    return v is not None and v.fit is not None


def golden_status(v: GoldenVerdict | None) -> str:
    """"no oracle", "not tested", "no hacking", or the kind ("hacking", "overfitting", "rise")."""
    if v is None:
        return "no oracle"
    if not golden_tested(v):
        return "not tested"
    if v.kind == "proxy_rise":
        return "no hacking (the held-out proxy rises, golden does not)"
    return "no hacking" if v.kind == "none" else v.kind


def proxy_status(v: ProxyVerdict) -> str:
    """"departs", "on its law" or "not tested" (too few evaluations: no verdict, not a clean bill)."""
    if not proxy_tested(v):
        return "not tested"
    return "departs" if v.detected else "on its law"


@dataclass
class RunAnalysis:
    """Everything known about one run: its data, config, and the detectors' verdicts."""

    path: Path
    name: str
    metrics: Metrics
    config: dict
    condition: str
    group_key: str
    seed: str | None
    regime: str | None
    golden: GoldenVerdict | None
    proxy: ProxyVerdict
    train_proxy: ProxyVerdict | None
    paired: dict = field(default_factory=dict)  # column -> (n_evals × k) per-prompt values, or None
    sequential: SequentialVerdict | None = None  # the experimental sequential proxy-only detector (issue 16)
    alarms: dict = field(default_factory=dict)  # name -> AlarmVerdict, when the log has the drift panel (issue 21)
    notes: list[str] = field(default_factory=list)
    actions: list[dict] | None = None  # the stage-2 controller's actions (controller.jsonl); None: no controller log

    @property
    def storage(self) -> dict[str, str]:
        """How each metric's reference was held (`record.metric_storage`; issue 18)."""
        return record.metric_storage(self.metrics.rows)

    def verdict_text(self) -> str:
        """One line for both detectors, worded by `golden_status` / `proxy_status` (the words that
        `kdlab detect` prints too)."""
        g = golden_status(self.golden)
        if self.golden is not None and self.golden.onset_step is not None:
            g += f" from step {_fmt_step(self.golden.onset_step)}"
        p = proxy_status(self.proxy)
        if self.proxy.detected:
            p = f"departure from step {_fmt_step(self.proxy.onset_step)}"
        return f"golden: {g}; proxy-only: {p}"

    def summary(self) -> dict:
        """The JSON verdict of one run (what `analyse_run` returns and summary.json holds)."""
        m = self.metrics
        steps = m.steps

        def last(col):
            if not m.has(col):
                return None
            values = m.column(col)
            ok = np.isfinite(values)
            return float(values[ok][-1]) if ok.any() else None

        return _jsonable(
            {
                "run": self.name,
                "path": str(self.path),
                "condition": self.condition,
                "seed": self.seed,
                "regime": self.regime,
                "n_evals": len(steps),
                "last_step": int(steps[-1]),
                "proxy_col": m.proxy_col,
                "golden_col": m.golden_col if self.golden is not None else None,
                "final": {"proxy": last(m.proxy_col), "golden": last(m.golden_col), "train_loss": last(record.TRAIN_LOSS)},
                "verdict": self.verdict_text(),
                GOLDEN: self.golden.to_dict() if self.golden is not None else None,
                PROXY_DEVIATION: self.proxy.to_dict(),
                f"train_{PROXY_DEVIATION}": self.train_proxy.to_dict() if self.train_proxy is not None else None,
                PROXY_SEQUENTIAL: self.sequential.to_dict() if self.sequential is not None else None,
                "metric_storage": self.storage,
                "alarms": {name: v.to_dict() for name, v in self.alarms.items()},
                "notes": self.notes,
                **({"controller_actions": self.actions} if self.actions is not None else {}),
            }
        )


def _condition(run_dir: Path, config: dict, metrics: Metrics) -> tuple[str, str, str | None]:
    """(label, grouping key, regime) of a run; see the module docstring."""
    regime = _get(config, "stage2.regime") or config.get("regime") or metrics.first("regime")
    explicit = config.get("condition") or metrics.first("condition") or config.get("name")
    if explicit is not None and str(explicit).strip() in _PLACEHOLDER_NAMES:
        explicit = None  # the pipeline's default name says nothing about the condition
    if explicit is not None:
        explicit = _SEED_SUFFIX.sub("", str(explicit)) or str(explicit)
    if not config:
        label = explicit or _SEED_SUFFIX.sub("", run_dir.name) or run_dir.name
        return label, f"label={label}", regime
    # The explicit name and the config minus seeds/paths both define the group: a name reused
    # across different settings (`kdlab sweep` keeps one name for the whole grid) is split, and
    # `_disambiguate` then names the settings that differ.
    kept = _condition_settings(config)
    key = json.dumps({"condition": explicit, "config": kept}, sort_keys=True, default=str)
    if explicit is not None:
        label = explicit
    elif regime is not None:
        label = str(regime)
        prompts = _get(config, "stage2.offline.num_prompts")
        gens = _get(config, "stage2.offline.generations_per_prompt")
        if str(regime).startswith(OFFLINE) and prompts is not None and gens is not None:
            label = f"{regime} {prompts}×{gens}"
    else:
        label = _SEED_SUFFIX.sub("", run_dir.name) or run_dir.name
    return label, key, regime


def _seed(run_dir: Path, config: dict) -> str | None:
    seeds = {k: v for k, v in _flatten(config).items() if "seed" in k.rsplit(".", 1)[-1].lower()}
    if "seed" in seeds:
        return str(seeds["seed"])
    if seeds:
        return ",".join(f"{v}" for _, v in sorted(seeds.items()))
    match = re.search(r"seed[-_]?(\d+)$|[-_]s(\d+)$", run_dir.name, re.I)
    return next(g for g in match.groups() if g is not None) if match else None


def analyse(
    source: str | Path,
    *,
    proxy_col: str = record.PROXY,
    golden_col: str = record.GOLDEN,
    step_col: str | None = None,
    golden_config: GoldenConfig | None = None,
    proxy_config: ProxyDeviationConfig | None = None,
    sequential_config: SequentialConfig | None = None,
) -> RunAnalysis:
    """Load one run and run both detectors (and the proxy detector on the training-prompt proxy
    `train_<proxy_col>` when it is logged). The one analysis behind `kdlab report` and `kdlab detect`.

    `source` is a run directory (kdlab's, a monitor output directory, anything `record.find_log`
    knows) or a metrics file (`record.read_metrics`). When the log is a kdlab run's metrics.jsonl,
    its config.yaml names the condition and its per-prompt values give the golden rise a paired SE.
    Raises MetricsError / FileNotFoundError.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: cannot read (no such file or directory)")
    metrics = read_metrics(source, proxy_col=proxy_col, golden_col=golden_col, step_col=step_col)
    run_dir = source if source.is_dir() else (metrics.run_dir or source.parent)
    config = load_config(run_dir) if metrics.run_dir is not None or source.is_dir() else {}
    actions = record.read_actions(run_dir) if metrics.run_dir is not None or source.is_dir() else None
    label, key, regime = _condition(run_dir, config, metrics)
    steps = metrics.steps
    notes = []
    if metrics.duplicates_dropped:
        notes.append(f"{metrics.duplicates_dropped} duplicated step(s) in {metrics.path.name}: the last row of each was kept")
    for col, bad in metrics.nonfinite.items():
        notes.append(f"{len(bad)} evaluation(s) with NaN or Infinity in {col} were left out (step(s) "
                     f"{', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})")
    for col, label in record.lower_bounds(metrics.rows).items():
        notes.append(f"{col} is a {label} of the full-vocabulary KL (its reference kept only the top-k "
                     "log-probs); run the evaluation with eval.storage=auto for exact values")
    golden = None
    paired = {col: (read_per_prompt(metrics.run_dir, steps, col) if metrics.run_dir is not None else None)
              for col in (golden_col, proxy_col)}
    if metrics.golden is not None:
        golden = detect_golden(
            steps, metrics.golden, metrics.golden_se, metrics.proxy, metrics.proxy_se, config=golden_config,
            golden_paired=paired[golden_col], proxy_paired=paired[proxy_col],
        )
    proxy = detect_proxy_deviation(steps, metrics.proxy, metrics.proxy_se, config=proxy_config)
    sequential = detect_proxy_sequential(steps, metrics.proxy, metrics.proxy_se, config=sequential_config,
                                         **lr_columns(metrics))
    train_proxy = None
    train_col = record.TRAIN_PREFIX + proxy_col
    if metrics.has(train_col):
        train_proxy = detect_proxy_deviation(
            steps, metrics.column(train_col), metrics.optional(record.se_column(train_col)), config=proxy_config
        )
        if proxy.detected and train_proxy.detected:
            notes.append(
                "the proxy on training prompts departs from its law too: a plateau of both (capacity floor) "
                "is as likely as hacking; the golden metric, if any, decides"
            )
        elif proxy.detected:
            notes.append("held-out proxy departs while the training-prompt proxy stays on its law (a generalisation gap)")
    return RunAnalysis(
        path=run_dir,
        name=run_dir.name,
        metrics=metrics,
        config=config,
        condition=label,
        group_key=key,
        seed=_seed(run_dir, config),
        regime=str(regime) if regime is not None else None,
        golden=golden,
        proxy=proxy,
        paired=paired,
        train_proxy=train_proxy,
        notes=notes,
        sequential=sequential,
        alarms=check_alarms(metrics.rows, steps=steps),
        actions=actions,
    )


def analyse_run(run_dir: str | Path, **kwargs) -> dict:
    """Verdicts of one run directory as a JSON-ready dict (see `RunAnalysis.summary`)."""
    return analyse(run_dir, **kwargs).summary()


def _condition_settings(config: dict) -> dict:
    """The flattened config that defines a run's condition (see `_ignored`)."""
    return {k: v for k, v in _flatten(config).items() if not _ignored(k)}


def _short(dotted: str) -> str:
    """A config key as a label shows it: its last part, or its last two when the last is generic."""
    parts = dotted.split(".")
    return ".".join(parts[-2:]) if parts[-1] in ("name", "path", "type", "kind") and len(parts) > 1 else parts[-1]


def _disambiguate(runs: list[RunAnalysis]) -> None:
    """Give groups that share a label but not a key a label naming the config values that differ."""
    by_label: dict[str, dict[str, RunAnalysis]] = {}
    for r in runs:
        by_label.setdefault(r.condition, {}).setdefault(r.group_key, r)
    for label, groups in by_label.items():
        if len(groups) < 2:
            continue
        flats = {k: _condition_settings(r.config) for k, r in groups.items()}
        keys = sorted(set().union(*flats.values()))
        differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats.values()}) > 1]
        for group_key in groups:
            extra = ", ".join(f"{_short(k)}={flats[group_key].get(k)}" for k in differing[:3])
            new_label = f"{label} ({extra})" if extra else f"{label} [{list(groups).index(group_key) + 1}]"
            for r in runs:
                if r.group_key == group_key:
                    r.condition = new_label


def _median(values):
    return statistics.median(values) if values else None


def _distinct_seeds(runs: list[RunAnalysis]) -> tuple[list[RunAnalysis], list[str]]:
    """The runs that count: one per (condition settings, seed). Two runs of the same settings and seed
    are one experiment repeated, not two seeds; the first (by path) stands for it. Returns the runs
    kept and a note per repeated seed."""
    kept: dict[tuple, RunAnalysis] = {}
    repeats: dict[tuple, list[str]] = {}
    for r in sorted(runs, key=lambda r: str(r.path)):
        key = (r.group_key, r.seed) if r.seed is not None else (r.group_key, str(r.path))
        if key in kept:
            repeats.setdefault(key, [kept[key].name]).append(r.name)
        else:
            kept[key] = r
    order = [r for r in runs if r in kept.values()]
    notes = [f"runs {', '.join(names)} share seed {key[1]}: counted once" for key, names in repeats.items()]
    return order, notes


def _aggregate(runs: list[RunAnalysis]) -> dict:
    """Seeds of one condition (or regime) summarised: counts of verdicts and the onsets' spread.
    A seed counts once (see `_distinct_seeds`); runs a detector could not test are counted apart."""
    runs, notes = _distinct_seeds(runs)
    with_golden = [r for r in runs if golden_tested(r.golden)]
    untested_golden = sum(1 for r in runs if r.golden is not None and not golden_tested(r.golden))
    kinds: dict[str, int] = {}
    for r in with_golden:
        kinds[r.golden.kind] = kinds.get(r.golden.kind, 0) + 1
    g_onsets = [r.golden.onset_step for r in with_golden if r.golden.detected]
    g_rises = [r.golden.rise for r in with_golden if r.golden.detected]
    tested = [r for r in runs if proxy_tested(r.proxy)]
    p_hits = [r for r in tested if r.proxy.detected]
    p_onsets = [r.proxy.onset_step for r in p_hits]
    golden = None
    if with_golden or untested_golden:
        golden = {
            "n": len(with_golden),
            "not_tested": untested_golden,
            "detected": len(g_onsets),
            "kinds": kinds,
            "onset_steps": g_onsets,
            "onset_median": _median(g_onsets),
            "rise_median": _median(g_rises),
        }
    proxy = {
        "n": len(tested),
        "not_tested": len(runs) - len(tested),
        "detected": len(p_hits),
        "onset_steps": p_onsets,
        "onset_median": _median(p_onsets),
        "residual_end_median": _median([r.proxy.residual_at_end for r in tested if r.proxy.residual_at_end is not None]),
    }

    def unit(n):
        return "seed" if n == 1 else "seeds"

    text = []
    if golden is None:
        text.append("golden: no oracle")
    else:
        part = f"golden: hacking in {golden['detected']}/{golden['n']} {unit(golden['n'])}"
        if g_onsets:
            part += f", onset median {_fmt_step(golden['onset_median'])}"
            if len(g_onsets) > 1:
                part += f" ({_fmt_step(min(g_onsets))}–{_fmt_step(max(g_onsets))})"
        if kinds.get("overfitting"):
            part += f"; over-fitting in {kinds['overfitting']}"
        if kinds.get("proxy_rise"):
            part += f"; held-out proxy rising (golden not) in {kinds['proxy_rise']}"
        if untested_golden:
            part += f"; not tested in {untested_golden} (too few evaluations)"
        text.append(part)
    part = f"proxy-only: departure in {proxy['detected']}/{proxy['n']} {unit(proxy['n'])}"
    if p_onsets:
        part += f", onset median {_fmt_step(proxy['onset_median'])}"
        if len(p_onsets) > 1:
            part += f" ({_fmt_step(min(p_onsets))}–{_fmt_step(max(p_onsets))})"
    if proxy["not_tested"]:
        part += f"; not tested in {proxy['not_tested']} (too few evaluations)"
    text.append(part)
    seq_hits = [r for r in runs if r.sequential is not None and r.sequential.detected]
    sequential = {"n": len(runs), "detected": len(seq_hits), "onset_steps": [r.sequential.onset_step for r in seq_hits],
                  "onset_median": _median([r.sequential.onset_step for r in seq_hits]), "experimental": True}
    return {GOLDEN: golden, PROXY_DEVIATION: proxy, PROXY_SEQUENTIAL: sequential, "verdict": "; ".join(text),
            "final": _finals(runs), "notes": notes}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error (sample SD / sqrt(n)); NaN where undefined (no value; one seed's SE)."""
    if not values:
        return math.nan, math.nan
    if len(values) == 1:
        return values[0], math.nan
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def seed_stat(values) -> dict:
    """{"mean", "se", "n"} over the seeds' values, skipping None and NaN; mean and se None where undefined (JSON)."""
    v = [float(x) for x in values if x is not None and not math.isnan(x)]
    mean, se = mean_se(v)
    return {"mean": None if math.isnan(mean) else mean, "se": None if math.isnan(se) else se, "n": len(v)}


def final_value(run: RunAnalysis, col: str) -> float | None:
    """`col` at the run's last evaluation (None when the run never logged it)."""
    return float(run.metrics.column(col)[-1]) if run.metrics.has(col) else None


def _finals(runs: list[RunAnalysis]) -> dict:
    """The last evaluation's golden and proxy, and stage 2's wall time (record.DONE), over the condition's seeds:
    the columns of a methods comparison (issue 22)."""
    seconds = []
    for r in runs:
        try:
            seconds.append(float(json.loads((r.path / record.DONE).read_text())["seconds_this_session"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unfinished run, or one written before the field: no wall time
    return {"golden": seed_stat(final_value(r, record.GOLDEN) for r in runs),
            "proxy": seed_stat(final_value(r, record.PROXY) for r in runs), "stage2_seconds": seed_stat(seconds)}


def group_conditions(runs: list[RunAnalysis]) -> dict[str, list[RunAnalysis]]:
    """Runs by condition label, conditions in order of first appearance."""
    _disambiguate(runs)
    groups: dict[str, list[RunAnalysis]] = {}
    for r in runs:
        groups.setdefault(r.condition, []).append(r)
    return groups


def sweep_summary(runs: list[RunAnalysis], golden_config=None, proxy_config=None) -> dict:
    """The sweep's JSON summary from already analysed runs (see `analyse_sweep`)."""
    groups = group_conditions(runs)
    conditions = []
    for label, members in groups.items():
        regimes = sorted({r.regime for r in members if r.regime is not None})
        conditions.append(
            {
                "condition": label,
                "regime": regimes[0] if len(regimes) == 1 else (regimes or None),
                "runs": [r.name for r in members],
                "seeds": list(dict.fromkeys(r.seed for r in members)),
                **_aggregate(members),
            }
        )
    regimes = {}
    for regime in sorted({r.regime for r in runs if r.regime is not None}):
        regimes[regime] = _aggregate([r for r in runs if r.regime == regime])
    return _jsonable(
        {
            "n_runs": len(runs),
            "runs": [r.summary() for r in runs],
            "conditions": conditions,
            "regimes": regimes,
            "thresholds": {
                GOLDEN: vars(golden_config or GoldenConfig()),
                PROXY_DEVIATION: vars(proxy_config or ProxyDeviationConfig()),
                PROXY_SEQUENTIAL: vars(SequentialConfig()),
            },
        }
    )


def analyse_sweep(dirs, **kwargs) -> dict:
    """Verdicts for every run found in `dirs` (run or sweep directories), per run, per condition
    (seeds aggregated: "hacking in 3/3 seeds, onset median …") and per regime. Keyword arguments go
    to `analyse` (columns, detector configs)."""
    runs = [analyse(d, **kwargs) for d in find_runs(dirs)]
    return sweep_summary(runs, kwargs.get("golden_config"), kwargs.get("proxy_config"))
