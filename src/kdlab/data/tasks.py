"""Prompt sources from real task datasets: XSum, WMT-14 en->de, Natural Instructions, a local file.

The teacher-hacking study (../shared/PAPER.md) ran its oracle -> teacher -> student chain on these
tasks with T5-family models. This module turns a dataset into the three disjoint prompt pools of
the pipeline (stage 1, stage 2, eval) and tokenizes a pool with the model's own tokenizer, reporting
truncation instead of hiding it.

`TASKS` is the one place where each task's Hugging Face dataset, configuration, prompt template and
reference field live. Loading always goes through the real `datasets.load_dataset`; `world.task.path`
may point at a local directory with the same layout (tests/task_data.py writes such copies), since
nothing can be downloaded on the machines this project is tested on.

What was checked about the hub datasets, and how (Hugging Face dataset pages, file trees and commit
histories, and public code that loads them, found with the project's search tools; datasets 4.x
source read in the installed package):

- XSum, `EdinburghNLP/xsum`: columns `document`, `summary`, `id`; splits train (204k rows),
  validation (11.3k), test (11.3k). The main branch is script-only (`xsum.py`, which downloads a tar
  from bollin.inf.ed.ac.uk), and datasets >= 4 refuses it ("Dataset scripts are no longer supported,
  but found xsum.py"). The hub's automatic Parquet export of the same data lives on the revision
  `refs/convert/parquet` (`default/{train,validation,test}/0000.parquet`, config 'default'), which
  `load_dataset(..., revision="refs/convert/parquet")` reads with the Parquet builder; that is what
  the spec uses. A local copy: `<dir>/default/<split>/0000.parquet`.
- WMT-14, `wmt/wmt14`: converted to Parquet on main ("Convert dataset to Parquet (#8)"), configs
  cs-en, de-en, fr-en, hi-en, ru-en declared in the README's `configs:` metadata; config 'de-en' has
  `de-en/{train-0000x-of-00003,validation-00000-of-00001,test-00000-of-00001}.parquet` and a single
  column `translation` = {'de': ..., 'en': ...}. The task is English -> German: the prompt reads
  `translation.en`, the reference is `translation.de`.
- Natural Instructions, `Muennighoff/natural-instructions` (Super-NaturalInstructions, one JSONL
  file per task): `train/<task>_train.jsonl` and `test/<task>_test.jsonl`, columns `task_name`, `id`,
  `definition`, `inputs`, `targets`; no loading script named after the repo (its `get_ni.py` only
  built the files), so datasets >= 4 loads it with the JSON builder, splits inferred from the folder
  names. There is NO validation split: set `world.task.splits.eval: test` (the loader says so if
  you forget). One third-party README claims train/validation/test; the repo's file tree shows only
  train/ and test/.

Templates are T5-style task prefixes, since the paper used T5 models (Raffel et al. 2020, App. D):
'summarize: ...' and 'translate English to German: ...'. For Natural Instructions the prompt is the
task definition followed by the instance input, as in Wang et al. (2022), without demonstrations.
"""

from __future__ import annotations

import logging
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from kdlab.config import TaskConfig
from kdlab.seeding import generator_for

log = logging.getLogger(__name__)

POOLS = ("stage1", "stage2", "eval")


class TaskDataError(ValueError):
    """A task dataset cannot serve the requested pools; the message names the config field to change."""


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how a row becomes (prompt, reference)."""

    hub_name: str  # the Hugging Face dataset repository
    config_name: str | None  # default configuration (None: the dataset's only / default one)
    revision: str | None  # hub revision to read (None: main); not used for a local `world.task.path`
    template: str  # prompt template, `{field}` placeholders (str.format syntax)
    reference: str  # field holding the reference output
    splits: tuple[str, ...]  # the splits the hub dataset has (for docs and error hints)
    body: str  # the long source field: a too-long prompt is cut there, keeping the template around it
    unpack: str | None = None  # a struct column whose keys become fields too (WMT: translation -> en, de)


TASKS: dict[str, TaskSpec] = {
    "xsum": TaskSpec(
        hub_name="EdinburghNLP/xsum", config_name=None, revision="refs/convert/parquet",
        template="summarize: {document}", reference="summary", splits=("train", "validation", "test"),
        body="document"),
    "wmt14_en_de": TaskSpec(
        hub_name="wmt/wmt14", config_name="de-en", revision=None,
        template="translate English to German: {en}", reference="de",
        splits=("train", "validation", "test"), body="en", unpack="translation"),
    "natural_instructions": TaskSpec(
        hub_name="Muennighoff/natural-instructions", config_name=None, revision=None,
        template="Definition: {definition}\n\nInput: {inputs}\n\nOutput:", reference="targets",
        splits=("train", "test"), body="inputs"),
}


@dataclass(frozen=True)
class TaskExample:
    prompt: str  # the templated prompt text, before tokenization
    reference: str | None  # the dataset's reference output (None: the file has none)
    # prompt == prefix + body + suffix, where body is the task's long source field; None when the
    # template does not hold that field exactly once (then a long prompt is cut at its end).
    frame: tuple[str, str, str] | None = None


# ----------------------------------------------------------------------------------------------
# Loading


def _template_fields(template: str) -> list[str]:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    for f in fields:
        if f == "" or f.isdigit() or "." in f or "[" in f:
            raise TaskDataError(f"world.task.template {template!r} has a placeholder {{{f}}}; "
                                "use plain column names like {document}")
    return list(dict.fromkeys(fields))


def _load_file(path: str) -> tuple[Any, str]:
    """A local JSONL/JSON/Parquet file as one 'train' split (a truncated file fails here, named)."""
    import datasets

    p = Path(path)
    if not p.is_file():
        raise TaskDataError(f"world.task.path={path!r}: no such file (name='file' needs a .jsonl/.json/.parquet file)")
    suffix = p.suffix.lower()
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if builder is None:
        raise TaskDataError(f"world.task.path={path!r}: unknown file type {suffix!r}; use .jsonl, .json or .parquet")
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow/json raise many types; all mean the same here
        raise TaskDataError(f"cannot read world.task.path={path!r} as {builder}: {type(e).__name__}: {e}. "
                            "Is the file complete (not truncated) and in that format?") from e
    return ds, f"file {path}"


def _load_hub(task: TaskConfig, spec: TaskSpec) -> tuple[Any, str]:
    """The DatasetDict of a named task, from the hub or from a local copy at world.task.path."""
    import datasets

    where = task.path or spec.hub_name
    config_name = task.config_name or spec.config_name
    # The revision belongs to the hub repository (XSum: its Parquet export); a local copy has none.
    revision = spec.revision if task.path is None else None
    if task.path is not None and not Path(task.path).expanduser().exists() and (
            task.path.startswith(("/", ".", "~")) or task.path.count("/") != 1):
        raise TaskDataError(f"world.task.path={task.path!r}: no such directory (nor a hub name 'org/name')")
    try:
        dd = datasets.load_dataset(where, config_name, revision=revision)
    except ConnectionError as e:
        raise TaskDataError(
            f"cannot reach {where!r} on the Hugging Face Hub ({e}). On a machine with network access, "
            f"download the repository (`hf download --repo-type dataset {spec.hub_name}"
            + (f" --revision {revision}" if revision else "") + " --local-dir DIR`) and set "
            "world.task.path to DIR"
            + (f" (world.task.path={task.path!r} is not a local directory either)" if task.path else "")) from e
    except ValueError as e:
        if "config" in str(e).lower():
            raise TaskDataError(f"{where!r}: {e} -- set world.task.config_name "
                                f"(default for {task.name}: {spec.config_name!r})") from e
        raise TaskDataError(f"cannot load {where!r} (config {config_name!r}): {e}") from e
    except Exception as e:  # noqa: BLE001 - corrupt parquet, bad JSON, missing directory ...
        raise TaskDataError(f"cannot load {where!r} (config {config_name!r}) for world.task.name={task.name!r}: "
                            f"{type(e).__name__}: {e}. Check world.task.path / world.task.config_name") from e
    return dd, repr(where) + (f" config {config_name!r}" if config_name else "")


def _columns(ds, unpack: str | None) -> list[str]:
    cols = list(ds.column_names)
    if unpack is not None and unpack in ds.features:
        feat = ds.features[unpack]
        keys = getattr(feat, "languages", None) or (list(feat.keys()) if isinstance(feat, dict) else [])
        cols += [k for k in keys if k not in cols]
    return cols


def load_pools(task: TaskConfig, sizes: dict[str, int], seed: int) -> dict[str, list[TaskExample]]:
    """The disjoint prompt pools 'stage1', 'stage2', 'eval' of a task dataset.

    Each pool reads the split named in world.task.splits (a 'file' is one split: every pool reads it).
    Pools that share a split take consecutive, disjoint slices of one permutation of that split,
    seeded by (seed, split): the same seed gives the same pools. Rows with an empty prompt source
    (every field the template reads is blank) are dropped, and so is any prompt text already taken,
    in this pool or another one, so no prompt is in two pools and eval never repeats a training
    prompt. Pools are filled in the order stage1, stage2, eval.
    """
    if task.name == "file":
        ds, where = _load_file(task.path or "")
        splits = {pool: "train" for pool in POOLS}
        tables = {"train": ds}
        unpack = None
        template = task.template or "{" + task.prompt_field + "}"
        reference = task.reference_field
        body = task.prompt_field
    else:
        spec = TASKS[task.name]
        dd, where = _load_hub(task, spec)
        # eval None: the task's validation split, or its test split where it has none (Natural Instructions).
        eval_split = task.splits.eval or ("validation" if "validation" in spec.splits else "test")
        splits = {"stage1": task.splits.stage1, "stage2": task.splits.stage2, "eval": eval_split}
        tables = {}
        for pool in POOLS:
            split = splits[pool]
            if sizes.get(pool, 0) > 0 and split not in dd:
                raise TaskDataError(
                    f"{where} has no split {split!r} (pool {pool!r}); splits available: {sorted(dd.keys())}. "
                    f"Set world.task.splits.{pool} to one of them")
            tables[split] = dd.get(split)
        unpack = spec.unpack
        template = task.template or spec.template
        reference = spec.reference
        body = spec.body

    fields = _template_fields(template)
    marker = "{" + body + "}"
    framed = template.count(marker) == 1
    pools: dict[str, list[TaskExample]] = {pool: [] for pool in POOLS}
    seen: set[str] = set()
    for split in dict.fromkeys(splits[p] for p in POOLS):  # each split once, in pool order
        members = [p for p in POOLS if splits[p] == split and sizes.get(p, 0) > 0]
        if not members:
            continue
        ds = tables[split]
        columns = _columns(ds, unpack)
        _check_columns(task, template, fields, reference, columns, split, where)
        needed = sum(sizes[p] for p in members)
        fields_hint = " + ".join(f"world.pools.{p}" for p in members)
        if len(ds) < needed:
            raise TaskDataError(
                f"split {split!r} of {where} has {len(ds)} rows; pools {'+'.join(members)} need {needed}. "
                f"Lower {fields_hint}" + ("" if task.name == "file" else " or use a larger world.task.splits.*"))
        perm = torch.randperm(len(ds), generator=generator_for(seed, "task-pools", split)).tolist()
        pos, n_empty, n_dup = 0, 0, 0
        queue = list(members)
        while queue:
            if pos >= len(perm):
                raise TaskDataError(
                    f"split {split!r} of {where} has {len(ds)} rows but only {len(ds) - n_empty - n_dup} usable "
                    f"prompts ({n_empty} empty, {n_dup} duplicates of a prompt already taken); pools "
                    f"{'+'.join(members)} need {needed}. Lower {fields_hint}")
            remaining = sum(sizes[p] - len(pools[p]) for p in queue)
            chunk = perm[pos:pos + max(256, 2 * remaining)]
            pos += len(chunk)
            batch = ds[chunk]  # column -> list, rows in permutation order
            for i in range(len(chunk)):
                row = {c: batch[c][i] for c in batch}
                if unpack is not None and isinstance(row.get(unpack), dict):
                    row = {**row[unpack], **row}
                if all(not str(row[f] or "").strip() for f in fields):
                    n_empty += 1
                    continue
                values = {f: "" if row[f] is None else str(row[f]) for f in fields}
                prompt = template.format_map(values)
                if prompt in seen:
                    n_dup += 1
                    continue
                seen.add(prompt)
                ref = None if reference is None or row[reference] is None else str(row[reference])
                pool = queue[0]
                frame = None
                if framed:
                    before, after = template.split(marker)
                    frame = (before.format_map(values), values[body], after.format_map(values))
                pools[pool].append(TaskExample(prompt=prompt, reference=ref, frame=frame))
                if len(pools[pool]) == sizes[pool]:
                    queue.pop(0)
                    if not queue:
                        break
        if n_empty or n_dup:
            log.info("task %s split %s: skipped %d empty and %d duplicate prompts", task.name, split, n_empty, n_dup)
    return pools


def _check_columns(task: TaskConfig, template: str, fields: list[str], reference: str | None,
                   columns: list[str], split: str, where: str) -> None:
    """A missing column fails before any row is read, naming the config field that chose it."""
    for f in fields:
        if f in columns:
            continue
        if task.name == "file" and task.template is None:
            fix = "set world.task.prompt_field to the column holding the prompt"
        elif task.template is not None:
            fix = f"fix world.task.template ({template!r}): its placeholders must be column names"
        else:
            fix = (f"is world.task.path a copy of {TASKS[task.name].hub_name}? "
                   "Otherwise set world.task.template to use its columns")
        raise TaskDataError(f"column {f!r} not found in split {split!r} of {where}; columns present: {columns}. {fix}")
    if reference is not None and reference not in columns:
        fix = ("set world.task.reference_field to the column holding the reference, or to null if the file has none"
               if task.name == "file" else f"is world.task.path a copy of {TASKS[task.name].hub_name}?")
        raise TaskDataError(f"reference column {reference!r} not found in split {split!r} of {where}; "
                            f"columns present: {columns}. {fix}")


# ----------------------------------------------------------------------------------------------
# Tokenization


@dataclass
class TokenizationReport:
    """Lengths of one tokenized pool; `summary()` is the line the pipeline logs."""

    pool: str
    n: int
    max_input_tokens: int
    n_truncated: int  # prompts cut to max_input_tokens
    max_tokens_before_truncation: int  # the longest prompt, untruncated
    mean_tokens: float  # mean prompt length after truncation (what the models see)
    max_output_tokens: int | None = None
    n_references: int = 0
    n_references_over: int = 0  # references longer than max_output_tokens (kept as text; informational)
    max_reference_tokens: int = 0

    def summary(self) -> str:
        line = (f"{self.pool}: {self.n_truncated} of {self.n} prompts truncated to {self.max_input_tokens} tokens "
                f"(longest {self.max_tokens_before_truncation}, mean {self.mean_tokens:.1f} after truncation)")
        if self.max_output_tokens is not None and self.n_references:
            line += (f"; {self.n_references_over} of {self.n_references} references longer than "
                     f"{self.max_output_tokens} tokens (longest {self.max_reference_tokens})")
        return line

    def as_dict(self) -> dict:
        return asdict(self)


def tokenize_prompts(
    examples: Sequence[TaskExample], tokenizer, max_input_tokens: int, *,
    max_output_tokens: int | None = None, pool: str = "prompts",
) -> tuple[Tensor, Tensor, TokenizationReport]:
    """Token ids of a pool's prompts, left-padded to the longest one, and a length report.

    Prompts get the tokenizer's own special tokens (T5: a closing </s>; Llama: a leading <s>), as the
    model saw them in training. A prompt longer than max_input_tokens is cut inside its long source
    field (the example's `frame`: the document, the English sentence, the task input), keeping the
    template's text on both sides: a decoder-only template ends in a cue ('Summary:', 'Output:') that
    a plain cut would remove. Without a frame the tokenizer cuts the end (special tokens kept).
    Every cut prompt is counted in the report. Left padding puts every prompt's last token
    in the last column, where a decoder-only model continues it. Pad id: tokenizer.pad_token_id, or 0.
    References are kept as text; the report counts those longer than max_output_tokens, tokenized
    without special tokens.
    """
    if not examples:
        raise ValueError(f"{pool}: no prompts to tokenize")
    texts = [ex.prompt for ex in examples]
    ids = tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
    lengths = [len(x) for x in ids]
    long = [i for i, n in enumerate(lengths) if n > max_input_tokens]
    for i in long:
        fitted = _cut_body(examples[i].frame, tokenizer, max_input_tokens)
        if fitted is None:  # no frame, or the template alone is too long: cut the end
            fitted = tokenizer(texts[i], add_special_tokens=True, truncation=True,
                               max_length=max_input_tokens)["input_ids"]
        ids[i] = list(fitted)[:max_input_tokens]  # a tokenizer whose special tokens alone exceed the limit
    P = max(len(x) for x in ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_BxP = torch.full((len(ids), P), pad_id, dtype=torch.long)
    mask_BxP = torch.zeros((len(ids), P), dtype=torch.bool)
    for b, row in enumerate(ids):
        if row:
            ids_BxP[b, P - len(row):] = torch.tensor(row, dtype=torch.long)
            mask_BxP[b, P - len(row):] = True

    report = TokenizationReport(
        pool=pool, n=len(ids), max_input_tokens=max_input_tokens, n_truncated=len(long),
        max_tokens_before_truncation=max(lengths), mean_tokens=float(mask_BxP.sum()) / len(ids),
        max_output_tokens=max_output_tokens)
    refs = [ex.reference for ex in examples if ex.reference is not None]
    if max_output_tokens is not None and refs:
        ref_lengths = [len(x) for x in tokenizer(refs, add_special_tokens=False, verbose=False)["input_ids"]]
        report.n_references = len(refs)
        report.n_references_over = sum(n > max_output_tokens for n in ref_lengths)
        report.max_reference_tokens = max(ref_lengths)
    return ids_BxP, mask_BxP, report


def _cut_body(frame: tuple[str, str, str] | None, tokenizer, max_tokens: int) -> list[int] | None:
    """Token ids of ``prefix + body[:k tokens] + suffix`` with the largest k that fits ``max_tokens``.

    The body is cut in token space and decoded back to text, so the prompt is re-tokenized as a
    whole (token boundaries at the joins can shift by a token or two: a few passes shrink k until
    the result fits). None when there is no frame or the template's own text leaves no room."""
    if frame is None:
        return None
    prefix, body, suffix = frame
    budget = max_tokens - len(tokenizer(prefix + suffix, add_special_tokens=True)["input_ids"])
    body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
    for _ in range(4):
        if budget <= 0:
            return None
        text = prefix + tokenizer.decode(body_ids[:budget], skip_special_tokens=True) + suffix
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) <= max_tokens:
            return ids
        budget -= len(ids) - max_tokens
    return None
