"""Task metrics on decoded text: ROUGE (summarisation, instructions) and BLEU (translation).

The study's proxy and golden metrics are divergences between distributions; task metrics say what a
reader of the outputs would see. Each is computed two ways at an evaluation step:

- against the dataset's references (the usual task score), and
- against the oracle's own outputs on the same prompts: in kdlab's worlds the oracle *is* the ground
  truth, so agreement with it is the text-level counterpart of the golden divergence.

Implementations are the standard ones, not re-implementations: ROUGE from Google's ``rouge-score``
(Lin 2004; F-measure, Porter stemming, ``rougeLsum`` splits sentences on newlines) and BLEU from
``sacrebleu`` (Post 2018; corpus BLEU with its default 13a tokenisation). Both are optional
dependencies (``pip install 'kdlab[tasks]'``). Scores are on a 0-100 scale. ROUGE also gets a standard
error over examples (the mean of per-example F-measures); corpus BLEU is not a mean, so it gets none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["TASK_METRIC", "bleu", "metric_for", "rouge", "score"]

# The metric each task reports (the paper's: ROUGE for XSum and Natural Instructions, BLEU for WMT-14).
TASK_METRIC = {"xsum": "rouge", "wmt14_en_de": "bleu", "natural_instructions": "rouge", "file": "rouge"}

_INSTALL = "task metrics need the optional packages rouge-score and sacrebleu: pip install 'kdlab[tasks]'"


def metric_for(setting: str, task_name: str | None) -> str | None:
    """Resolve `eval.task_metrics` ('off' | 'auto' | 'rouge' | 'bleu') for a task; None = off."""
    if setting == "off":
        return None
    if setting == "auto":
        return TASK_METRIC.get(task_name or "", "rouge")
    return setting


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measure x 100 over examples, and the standard error of ROUGE-L."""
    _check(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    per = {k: [] for k in kinds}
    for pred, ref in zip(predictions, references):
        s = scorer.score(ref, pred)  # score(target, prediction)
        for k in kinds:
            per[k].append(100.0 * s[k].fmeasure)
    n = len(predictions)
    out = {k: sum(v) / n for k, v in per.items()}
    mean_l = out["rougeL"]
    var = sum((x - mean_l) ** 2 for x in per["rougeL"]) / (n - 1) if n > 1 else float("nan")
    out["rougeL_se"] = math.sqrt(var / n) if n > 1 else float("nan")
    return out


def bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing off) with one reference."""
    _check(predictions, references)
    try:
        import sacrebleu
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    result = sacrebleu.corpus_bleu(list(predictions), [list(references)])
    return {"bleu": float(result.score)}


def score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`rouge` or `bleu` by name."""
    if metric == "rouge":
        return rouge(predictions, references)
    if metric == "bleu":
        return bleu(predictions, references)
    raise ValueError(f"unknown task metric {metric!r}: use 'rouge' or 'bleu'")
