"""Small local copies of the task datasets, with the hub's schema and file layout, and a tiny tokenizer.

No dataset can be downloaded where the tests run, so `write_task_data` writes what
`datasets.load_dataset(<hub name>, <config>)` would read, to a local directory that is passed as
`world.task.path`: the loader code under test is the real one, only the bytes are synthetic.
Layouts, as on the hub (see kdlab/data/tasks.py for how they were checked):

- xsum: `default/<split>/0000.parquet` (the Parquet export of EdinburghNLP/xsum), columns
  document, summary, id.
- wmt14_en_de: `de-en/<split>-00000-of-00001.parquet` plus a README.md whose YAML `configs:`
  declares the configurations (like wmt/wmt14); column translation = {'de', 'en'}. A second, tiny
  'fr-en' configuration makes the config name matter, as it does on the hub.
- natural_instructions: `<split>/<task>_<split>.jsonl`, one file per task (like
  Muennighoff/natural-instructions), columns task_name, id, definition, inputs, targets.
- file: one JSONL (or Parquet) file with columns prompt, reference, id.

Text is deterministic: a few dozen words; the first three words of a row spell its index, so rows
are distinct unless a test asks for duplicates.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

EN = ("the a river city old new council school report storm market team player police fire night "
      "morning house road north south village music film small large water").split()
DE = ("der die das fluss stadt alt neu rat schule bericht sturm markt team spieler polizei feuer "
      "nacht morgen haus strasse nord sued dorf musik film klein gross wasser").split()
DEFINITIONS = (
    "Given a sentence, repeat its first word.",
    "Given a sentence, write a short title for it.",
    "Given a sentence, answer with the last word.",
)
SPLIT_OFFSET = {"train": 0, "validation": 100_000, "test": 200_000}
LONG_WORDS = 400  # words in a long document (long_every > 0)


def _sentence(words, rng: random.Random, index: int, n_words: int) -> str:
    base = len(words)
    head = [words[(index // base ** k) % base] for k in (2, 1, 0)]  # the index, spelled in words
    return " ".join(head + [rng.choice(words) for _ in range(n_words)])


def _rows(task_name: str, split: str, n: int, long_every: int, overlap: int, empty_every: int) -> list[dict]:
    rows = []
    for i in range(n):
        # Rows [0, overlap) of a non-train split repeat train's rows: a prompt in two splits.
        src_split, src_i = ("train", i) if (split != "train" and i < overlap) else (split, i)
        index = SPLIT_OFFSET.get(src_split, 300_000) + src_i
        rng = random.Random(f"{task_name}/{src_split}/{src_i}")
        n_words = LONG_WORDS if long_every and (i + 1) % long_every == 0 else rng.randint(4, 12)
        en = _sentence(EN, rng, index, n_words)
        de = _sentence(DE, rng, index, max(3, min(n_words, 12)))
        if empty_every and (i + 1) % empty_every == 0:
            en = ""
        rid = f"{index:07d}"
        if task_name == "xsum":
            rows.append({"document": en, "summary": _sentence(EN, rng, index, 5), "id": rid})
        elif task_name == "wmt14_en_de":
            rows.append({"translation": {"de": de, "en": en}})
        elif task_name == "natural_instructions":
            t = index % len(DEFINITIONS)
            rows.append({"task_name": f"task{t + 1:03d}_synthetic", "id": f"task{t + 1:03d}-{rid}",
                         "definition": DEFINITIONS[t], "inputs": en, "targets": en.split()[-1] if en else ""})
        elif task_name == "file":
            rows.append({"prompt": en, "reference": de, "id": rid})
        else:
            raise ValueError(f"unknown task {task_name!r}")
    return rows


_WMT_README = """---
dataset_info:
- config_name: de-en
  features:
  - name: translation
    dtype:
      translation:
        languages:
        - de
        - en
- config_name: fr-en
  features:
  - name: translation
    dtype:
      translation:
        languages:
        - fr
        - en
configs:
- config_name: de-en
  data_files:
{de_en}
- config_name: fr-en
  data_files:
  - split: train
    path: fr-en/train-*
---
# wmt14 (synthetic local copy written by tests/task_data.py)
"""


def write_task_data(task_name: str, root: Path, n: dict[str, int], long_every: int = 0, *,
                    overlap: int = 0, empty_every: int = 0, file_format: str = "jsonl") -> str:
    """Write a local copy of `task_name` under root with n[split] rows per split; return world.task.path.

    long_every=k: every k-th row's source text is LONG_WORDS words long (to exercise truncation).
    overlap=m: the first m rows of every split but train copy train's first m rows.
    empty_every=k: every k-th row has an empty source text (document / en / inputs / prompt).
    file_format ('file' only): 'jsonl' or 'parquet'; n must then have a single split.
    """
    import datasets

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = {split: _rows(task_name, split, k, long_every, overlap, empty_every) for split, k in n.items()}

    if task_name == "file":
        (split, rows), = data.items()
        if file_format == "jsonl":
            path = root / f"{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            path = root / f"{split}.parquet"
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        return str(path)

    if task_name == "xsum":
        features = datasets.Features({c: datasets.Value("string") for c in ("document", "summary", "id")})
        for split, rows in data.items():
            (root / "default" / split).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / "default" / split / "0000.parquet"))
    elif task_name == "wmt14_en_de":
        for pair, langs in (("de-en", ("de", "en")), ("fr-en", ("fr", "en"))):
            features = datasets.Features({"translation": datasets.Translation(languages=langs)})
            (root / pair).mkdir(exist_ok=True)
            if pair == "fr-en":
                rows = [{"translation": {"fr": "le chat", "en": "the cat"}}, {"translation": {"fr": "un", "en": "one"}}]
                datasets.Dataset.from_list(rows, features=features).to_parquet(str(root / pair / "train-00000-of-00001.parquet"))
                continue
            for split, rows in data.items():
                datasets.Dataset.from_list(rows, features=features).to_parquet(
                    str(root / pair / f"{split}-00000-of-00001.parquet"))
        de_en = "\n".join(f"  - split: {s}\n    path: de-en/{s}-*" for s in data)
        (root / "README.md").write_text(_WMT_README.format(de_en=de_en))
    elif task_name == "natural_instructions":
        for split, rows in data.items():
            (root / split).mkdir(exist_ok=True)
            by_task: dict[str, list[dict]] = {}
            for r in rows:
                by_task.setdefault(r["task_name"], []).append(r)
            for name, task_rows in by_task.items():
                (root / split / f"{name}_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows))
        (root / "README.md").write_text("---\nlanguage:\n- en\n---\n# natural-instructions (synthetic local copy)\n")
    else:
        raise ValueError(f"unknown task {task_name!r}")
    return str(root)


def make_tokenizer(texts, directory: str | Path | None = None, *, append_eos: bool = True):
    """A tiny word-level tokenizer trained on `texts`: pad 0, eos 1 ('</s>'), unk 2.

    append_eos=True makes it T5-like: add_special_tokens=True closes every text with </s>. Words and
    punctuation are split as by BERT's pre-tokenizer. If directory is given, it is saved there
    (save_pretrained) so AutoTokenizer.from_pretrained(directory) loads it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert (fast.pad_token_id, fast.eos_token_id, fast.unk_token_id) == (0, 1, 2)
    if directory is not None:
        fast.save_pretrained(str(directory))
    return fast
