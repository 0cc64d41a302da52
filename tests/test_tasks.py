"""Task-dataset prompt sources (kdlab.data.tasks) on local copies with the hub's schema and layout.

Every test loads through the real `datasets.load_dataset`, offline: the copies are written by
tests/task_data.py, and the Hub is unreachable by construction (HF_HUB_OFFLINE), so a test that
tried to download would fail rather than pass slowly.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow.parquet as pq
import pytest
import torch

from kdlab.config import TaskConfig
from kdlab.data.tasks import TASKS, TaskDataError, TaskExample, load_pools, tokenize_prompts
from task_data import LONG_WORDS, make_tokenizer, write_task_data

datasets.disable_progress_bars()

SIZES = {"stage1": 12, "stage2": 10, "eval": 6}
N = {"xsum": {"train": 30, "validation": 10, "test": 4},
     "wmt14_en_de": {"train": 30, "validation": 10, "test": 4},
     "natural_instructions": {"train": 30, "test": 10}}
EVAL_SPLIT = {"xsum": "validation", "wmt14_en_de": "validation", "natural_instructions": "test"}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No network, and a private datasets cache (the copies' Arrow files do not pile up in ~/.cache)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets-cache")


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tasks")
    return {name: write_task_data(name, root / name, n, long_every=5) for name, n in N.items()}


def cfg(name: str, path: str, **kw) -> TaskConfig:
    if name == "natural_instructions":
        kw.setdefault("splits", {"eval": "test"})
    return TaskConfig(name=name, path=path, **kw)


def expected_by_split(name: str, path: str) -> dict[str, dict[str, str]]:
    """prompt -> reference for every row of each split, read from the files without `datasets`,
    with the templates written out here (not taken from TASKS), so a wrong template fails."""
    out: dict[str, dict[str, str]] = {}
    root = Path(path)
    for split in N[name]:
        if name == "xsum":
            rows = pq.read_table(root / "default" / split / "0000.parquet").to_pylist()
            out[split] = {f"summarize: {r['document']}": r["summary"] for r in rows}
        elif name == "wmt14_en_de":
            rows = pq.read_table(root / "de-en" / f"{split}-00000-of-00001.parquet").to_pylist()
            out[split] = {f"translate English to German: {r['translation']['en']}": r["translation"]["de"] for r in rows}
        else:
            rows = [json.loads(line) for f in sorted((root / split).glob("*.jsonl")) for line in f.read_text().splitlines()]
            out[split] = {f"Definition: {r['definition']}\n\nInput: {r['inputs']}\n\nOutput:": r["targets"] for r in rows}
    return out


@pytest.mark.parametrize("name", list(N))
def test_pools_come_from_their_splits_with_the_template(name, copies):
    pools = load_pools(cfg(name, copies[name]), SIZES, seed=0)
    assert {p: len(v) for p, v in pools.items()} == SIZES
    prompts = [ex.prompt for pool in pools.values() for ex in pool]
    assert len(set(prompts)) == len(prompts), "a prompt is in two pools"
    expected = expected_by_split(name, copies[name])
    for pool, split in (("stage1", "train"), ("stage2", "train"), ("eval", EVAL_SPLIT[name])):
        for ex in pools[pool]:
            assert ex.prompt in expected[split], (pool, ex.prompt)
            assert ex.reference == expected[split][ex.prompt]


def test_template_written_out_for_one_row(copies):
    """One exact string per task, so the expected templates above are not the only witness."""
    row = pq.read_table(Path(copies["wmt14_en_de"]) / "de-en" / "train-00000-of-00001.parquet").to_pylist()
    pools = load_pools(cfg("wmt14_en_de", copies["wmt14_en_de"]), {"stage1": 30, "stage2": 0, "eval": 1}, seed=0)
    by_ref = {ex.reference: ex.prompt for ex in pools["stage1"]}
    r = row[3]["translation"]
    assert by_ref[r["de"]] == "translate English to German: " + r["en"]
    assert TASKS["xsum"].template == "summarize: {document}"
    assert (TASKS["natural_instructions"].template.format(definition="D", inputs="I")
            == "Definition: D\n\nInput: I\n\nOutput:")


def test_template_override(copies):
    pools = load_pools(cfg("xsum", copies["xsum"], template="Article: {document} (id {id})\nSummary:"),
                       SIZES, seed=0)
    rows = {r["summary"]: r for r in pq.read_table(Path(copies["xsum"]) / "default/train/0000.parquet").to_pylist()}
    ex = pools["stage1"][0]
    r = rows[ex.reference]
    assert ex.prompt == f"Article: {r['document']} (id {r['id']})\nSummary:"


def test_seed_fixes_the_pools(copies):
    c = cfg("xsum", copies["xsum"])
    a, b, other = (load_pools(c, SIZES, seed=s) for s in (0, 0, 1))
    assert a == b
    assert [ex.prompt for ex in a["stage1"]] != [ex.prompt for ex in other["stage1"]]
    # Pools taking the whole train split: another seed reorders the same rows between them.
    full = {"stage1": 12, "stage2": 18, "eval": 6}
    a, other = load_pools(c, full, 0), load_pools(c, full, 1)
    train = lambda p: {ex.prompt for ex in p["stage1"] + p["stage2"]}  # noqa: E731
    assert train(a) == train(other) and a["stage1"] != other["stage1"]


def test_duplicates_and_empty_prompts_are_dropped(tmp_path):
    # train: 30 rows, 3 empty (rows 10, 20, 30). validation: 12 rows, the first 4 copies of train rows,
    # 1 empty (row 10): 7 usable.
    path = write_task_data("xsum", tmp_path, {"train": 30, "validation": 12}, overlap=4, empty_every=10)
    pools = load_pools(cfg("xsum", path), {"stage1": 20, "stage2": 7, "eval": 7}, seed=0)
    train = {ex.prompt for ex in pools["stage1"] + pools["stage2"]}
    assert len(train) == 27 and "summarize: " not in train
    assert not train & {ex.prompt for ex in pools["eval"]}
    with pytest.raises(TaskDataError, match=r"'validation'.* 12 rows but only 7 usable prompts \(1 empty, 4 dup"
                                            r".*need 8\. Lower world\.pools\.eval"):
        load_pools(cfg("xsum", path), {"stage1": 20, "stage2": 7, "eval": 8}, seed=0)


def test_wmt_config_name_selects_the_language_pair(copies):
    with pytest.raises(TaskDataError, match=r"xx-en.*world\.task\.config_name.*'de-en'"):
        load_pools(cfg("wmt14_en_de", copies["wmt14_en_de"], config_name="xx-en"), SIZES, seed=0)
    with pytest.raises(TaskDataError, match=r"column 'de' not found.*\['translation', 'fr', 'en'\]"):
        load_pools(cfg("wmt14_en_de", copies["wmt14_en_de"], config_name="fr-en"), {"stage1": 1, "stage2": 1, "eval": 0}, 0)


def test_hub_name_is_used_without_path_and_nothing_is_downloaded(monkeypatch):
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    with pytest.raises(TaskDataError, match=r"EdinburghNLP/xsum.*--revision refs/convert/parquet.*world\.task\.path"):
        load_pools(TaskConfig(name="xsum"), SIZES, seed=0)
    assert calls == [(("EdinburghNLP/xsum", None), {"revision": "refs/convert/parquet"})]
    with pytest.raises(TaskDataError, match=r"world\.task\.path='/no/such/dir': no such directory"):
        load_pools(TaskConfig(name="xsum", path="/no/such/dir"), SIZES, seed=0)
    assert len(calls) == 1


# ----------------------------------------------------------------------------------------------
# 'file'


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_file_input(tmp_path, fmt):
    path = write_task_data("file", tmp_path, {"train": 20}, file_format=fmt)
    assert path.endswith("." + fmt)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()] if fmt == "jsonl" \
        else pq.read_table(path).to_pylist()
    ref = {r["prompt"]: r["reference"] for r in rows}
    sizes = {"stage1": 10, "stage2": 6, "eval": 4}
    pools = load_pools(TaskConfig(name="file", path=path), sizes, seed=0)
    got = [ex for p in pools.values() for ex in p]
    assert [len(p) for p in pools.values()] == [10, 6, 4] and len({ex.prompt for ex in got}) == 20
    assert all(ref[ex.prompt] == ex.reference for ex in got)
    pools = load_pools(TaskConfig(name="file", path=path, template="Q: {prompt}", reference_field=None), sizes, 0)
    assert all(ex.prompt[3:] in ref and ex.prompt.startswith("Q: ") and ex.reference is None
               for p in pools.values() for ex in p)


def test_file_duplicate_prompts_appear_once(tmp_path):
    path = tmp_path / "dup.jsonl"
    rows = [{"prompt": f"p{i % 5}", "reference": str(i)} for i in range(10)] + [{"prompt": "  ", "reference": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pools = load_pools(TaskConfig(name="file", path=str(path)), {"stage1": 3, "stage2": 1, "eval": 1}, seed=0)
    assert sorted(ex.prompt for p in pools.values() for ex in p) == ["p0", "p1", "p2", "p3", "p4"]


# ----------------------------------------------------------------------------------------------
# Errors name the field to change


def test_split_too_small(copies):
    with pytest.raises(TaskDataError, match=r"split 'train' .* has 30 rows; pools stage1\+stage2 need 31\. "
                                            r"Lower world\.pools\.stage1 \+ world\.pools\.stage2"):
        load_pools(cfg("xsum", copies["xsum"]), {"stage1": 21, "stage2": 10, "eval": 2}, seed=0)


def test_missing_split(copies):
    with pytest.raises(TaskDataError, match=r"no split 'validation' \(pool 'eval'\); splits available: "
                                            r"\['test', 'train'\]\. Set world\.task\.splits\.eval"):
        load_pools(TaskConfig(name="natural_instructions", path=copies["natural_instructions"],
                              splits={"eval": "validation"}), SIZES, seed=0)


def test_default_eval_split_is_validation_else_test(copies):
    """splits.eval unset: XSum evaluates on validation, Natural Instructions (no validation) on test."""
    small = {"stage1": 12, "stage2": 10, "eval": 3}  # the test splits hold 4 rows
    ni = load_pools(TaskConfig(name="natural_instructions", path=copies["natural_instructions"]), small, seed=0)
    ni_test = load_pools(TaskConfig(name="natural_instructions", path=copies["natural_instructions"],
                                    splits={"eval": "test"}), small, seed=0)
    assert ni["eval"] == ni_test["eval"]
    xs = load_pools(TaskConfig(name="xsum", path=copies["xsum"]), small, seed=0)
    xs_val = load_pools(TaskConfig(name="xsum", path=copies["xsum"], splits={"eval": "validation"}), small, seed=0)
    xs_test = load_pools(TaskConfig(name="xsum", path=copies["xsum"], splits={"eval": "test"}), small, seed=0)
    assert xs["eval"] == xs_val["eval"] != xs_test["eval"]


def test_missing_columns(tmp_path, copies):
    path = write_task_data("file", tmp_path, {"train": 20})
    present = r"columns present: \['prompt', 'reference', 'id'\]"
    with pytest.raises(TaskDataError, match=r"column 'text' not found.*" + present + r".*world\.task\.prompt_field"):
        load_pools(TaskConfig(name="file", path=path, prompt_field="text"), SIZES, seed=0)
    with pytest.raises(TaskDataError, match=r"reference column 'gold' not found.*" + present
                                            + r".*world\.task\.reference_field.*null"):
        load_pools(TaskConfig(name="file", path=path, reference_field="gold"), SIZES, seed=0)
    with pytest.raises(TaskDataError, match=r"column 'article' not found.*\['document', 'summary', 'id'\].*"
                                            r"world\.task\.template"):
        load_pools(cfg("xsum", copies["xsum"], template="summarize: {article}"), SIZES, seed=0)
    with pytest.raises(TaskDataError, match=r"world\.task\.template .* placeholder \{0\}"):
        load_pools(cfg("xsum", copies["xsum"], template="summarize: {0}"), SIZES, seed=0)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_truncated_file_is_named(tmp_path, fmt):
    path = Path(write_task_data("file", tmp_path, {"train": 20}, file_format=fmt))
    data = path.read_bytes()
    cut = data.index(b"reference", len(data) // 2) if fmt == "jsonl" else len(data) // 2  # mid-row / no footer
    path.write_bytes(data[:cut])
    with pytest.raises(TaskDataError, match=r"cannot read world\.task\.path='" + str(path) + r"'.*truncated"):
        load_pools(TaskConfig(name="file", path=str(path)), SIZES, seed=0)
    with pytest.raises(TaskDataError, match=r"world\.task\.path=.*no such file"):
        load_pools(TaskConfig(name="file", path=str(tmp_path / "absent.jsonl")), SIZES, seed=0)


# ----------------------------------------------------------------------------------------------
# Tokenization


def test_truncation_is_exact_and_left_padding(tmp_path):
    words = "the river city old new council school report storm market".split()
    long_text = " ".join(words[i % 10] for i in range(50))
    examples = [TaskExample("the river", "city old"), TaskExample(long_text, " ".join(words * 3)),
                TaskExample("storm market school", None)]
    tok = make_tokenizer(words, tmp_path / "tok")
    ids, mask, report = tokenize_prompts(examples, tok, 10, max_output_tokens=5, pool="eval")
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 10)

    word_ids = tok(long_text, add_special_tokens=False)["input_ids"]
    assert ids[1].tolist() == word_ids[:9] + [tok.eos_token_id]  # cut to exactly 10, its </s> kept
    short = tok("the river")["input_ids"]
    assert len(short) == 3 and short[-1] == tok.eos_token_id  # the tokenizer's own special token
    assert ids[0].tolist() == [0] * 7 + short and mask[0].tolist() == [False] * 7 + [True] * 3
    assert ids[2, -4:].tolist() == tok("storm market school")["input_ids"] and mask[2].sum() == 4

    assert (report.n, report.n_truncated, report.max_tokens_before_truncation) == (3, 1, 51)
    assert report.mean_tokens == pytest.approx((3 + 10 + 4) / 3)
    assert (report.n_references, report.n_references_over, report.max_reference_tokens) == (2, 1, 30)
    assert report.summary() == ("eval: 1 of 3 prompts truncated to 10 tokens (longest 51, mean 5.7 after "
                                "truncation); 1 of 2 references longer than 5 tokens (longest 30)")
    assert report.as_dict()["n_truncated"] == 1


def test_truncation_counted_on_a_pool(copies):
    """long_every=5: rows 5, 10, ... have LONG_WORDS-word documents; exactly those get cut."""
    pools = load_pools(cfg("xsum", copies["xsum"]), SIZES, seed=0)
    tok = make_tokenizer([ex.prompt for p in pools.values() for ex in p])
    for name, pool in pools.items():
        n_long = sum(len(ex.prompt.split()) > 100 for ex in pool)
        ids, mask, report = tokenize_prompts(pool, tok, 64, pool=name)
        assert report.n_truncated == n_long
        assert mask.sum(1).max() == (64 if n_long else ids.shape[1])
        if n_long:  # "summarize", ":", the words, </s>
            assert report.max_tokens_before_truncation == 2 + 3 + LONG_WORDS + 1
    assert sum(len(ex.prompt.split()) > 100 for p in pools.values() for ex in p) > 0


@pytest.mark.parametrize("append_eos", [True, False])
def test_long_prompts_are_cut_inside_the_body_keeping_the_template(copies, append_eos):
    """A long NI input is cut inside {inputs}: the prompt still starts with its definition and ends
    with the 'Output:' cue (and T5's </s>), at exactly max_input_tokens; a plain end cut would lose the cue."""
    pools = load_pools(cfg("natural_instructions", copies["natural_instructions"]), SIZES, seed=0)
    texts = [ex.prompt for p in pools.values() for ex in p]
    tok = make_tokenizer(texts + ["Definition Input Output :"], append_eos=append_eos)
    long = [ex for p in pools.values() for ex in p if len(ex.prompt.split()) > 100]
    assert long and all(ex.frame is not None and "".join(ex.frame) == ex.prompt for ex in long)
    ids, mask, report = tokenize_prompts(long, tok, 40)
    assert report.n_truncated == len(long)
    cue = tok("Output:", add_special_tokens=append_eos)["input_ids"]  # "Output", ":" (+ </s>)
    for ex, row in zip(long, ids):
        assert row.tolist()[-len(cue):] == cue
        assert len(row) == 40
        head = tok(ex.frame[0], add_special_tokens=False)["input_ids"]  # "Definition: ... Input:"
        assert row.tolist()[:len(head)] == head
        body = tok(ex.frame[1], add_special_tokens=False)["input_ids"]
        kept = len(row) - len(head) - len(cue)
        assert row.tolist()[len(head):len(head) + kept] == body[:kept]  # the body's start, in order
    # without a frame the end is cut (and the cue is lost)
    from dataclasses import replace

    plain, _, _ = tokenize_prompts([replace(ex, frame=None) for ex in long], tok, 40)
    assert all(row.tolist()[-len(cue):] != cue for row in plain)
