"""ROUGE and BLEU (kdlab.metrics.task) checked against values computed here from their definitions."""

import math
from collections import Counter

import pytest

from kdlab.config import ConfigError, build_config
from kdlab.metrics.task import bleu, metric_for, rouge, score


def _lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _f(overlap, n_pred, n_ref):
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 200 * p * r / (p + r)


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def test_rouge_matches_its_definition():
    """ROUGE-1/2 = F of clipped n-gram overlap, ROUGE-L = F of the longest common subsequence (words
    chosen so that Porter stemming and rouge-score's tokenizer leave them unchanged)."""
    preds = ["the cat sat on the mat", "a dog ran far away today"]
    refs = ["the cat is on the mat", "the dog ran away"]
    got = rouge(preds, refs)
    r1, r2, rl = [], [], []
    for p, r in zip(preds, refs):
        pw, rw = p.split(), r.split()
        r1.append(_f(sum((_ngrams(pw, 1) & _ngrams(rw, 1)).values()), len(pw), len(rw)))
        r2.append(_f(sum((_ngrams(pw, 2) & _ngrams(rw, 2)).values()), len(pw) - 1, len(rw) - 1))
        rl.append(_f(_lcs(pw, rw), len(pw), len(rw)))
    assert got["rouge1"] == pytest.approx(sum(r1) / 2, abs=1e-9)
    assert got["rouge2"] == pytest.approx(sum(r2) / 2, abs=1e-9)
    assert got["rougeL"] == pytest.approx(sum(rl) / 2, abs=1e-9)
    mean = sum(rl) / 2
    se = math.sqrt(sum((x - mean) ** 2 for x in rl) / 1 / 2)
    assert got["rougeL_se"] == pytest.approx(se, abs=1e-9)


def test_rouge_endpoints():
    assert rouge(["a b c"], ["a b c"])["rougeL"] == pytest.approx(100.0)
    assert rouge(["a b c"], ["x y z"])["rouge1"] == 0.0


def test_bleu_matches_its_definition():
    """Corpus BLEU = BP x exp(mean log p_n), p_n = clipped n-gram matches / n-grams over the corpus,
    BP = exp(1 - r/c) when the candidates are shorter than the references."""
    preds = ["the quick brown fox jumps over the lazy dog", "a cat sat on a warm mat today"]
    refs = ["the quick brown fox jumped over the lazy dog", "the cat sat on the warm mat today"]
    match, total = [0] * 4, [0] * 4
    c = r = 0
    for p, ref in zip(preds, refs):
        pw, rw = p.split(), ref.split()
        c, r = c + len(pw), r + len(rw)
        for n in range(1, 5):
            match[n - 1] += sum((_ngrams(pw, n) & _ngrams(rw, n)).values())
            total[n - 1] += max(len(pw) - n + 1, 0)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    expected = 100 * bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total)) / 4)
    assert bleu(preds, refs)["bleu"] == pytest.approx(expected, abs=1e-6)
    assert bleu(["a b c d e"], ["a b c d e"])["bleu"] == pytest.approx(100.0)


def test_score_and_resolution():
    assert metric_for("off", "xsum") is None
    assert metric_for("auto", "xsum") == "rouge"
    assert metric_for("auto", "wmt14_en_de") == "bleu"
    assert metric_for("auto", "natural_instructions") == "rouge"
    assert metric_for("bleu", "xsum") == "bleu"
    assert set(score("bleu", ["a b"], ["a b"])) == {"bleu"}
    with pytest.raises(ValueError, match="rouge' or 'bleu"):
        score("meteor", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge(["a", "b"], ["a"])


def test_config_checks_task_metrics():
    with pytest.raises(ConfigError, match="eval.task_metrics='auto' needs world.task"):
        build_config({"eval": {"task_metrics": "auto"}})
    with pytest.raises(ConfigError, match="task_metric_prompts=600 exceeds eval.num_prompts=512"):
        build_config({"world": {"oracle": "hf:x", "task": {"name": "xsum"}},
                      "eval": {"task_metrics": "auto", "task_metric_prompts": 600}})
    with pytest.raises(ConfigError, match="must be one of 'off', 'auto', 'rouge' or 'bleu'"):
        build_config({"eval": {"task_metrics": "chrf"}})
