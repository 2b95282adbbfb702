"""Evaluation sets and their prompt templates (stage 4).

Every loader validates its rows before a model is loaded, so a bad file costs seconds, not a model
load; a bad row is reported as `file:line`. A domain's test sets and perplexity text come from its
spec (config/domains/*.yaml): the templates there are the original evaluation scripts' (CaseHOLD,
BillSum) or, where the original shipped no script (PubMedQA, MedNLI, HQS), the prefix of its stage-2
training template up to the answer (upstream notes §3.1). The general sets (WikiText-2, C4) and a
user's text file are read here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpruner.data.calibration import C4_HELDOUT_FILES
from dpruner.data.files import as_list, data_file, describe, read_jsonl, read_jsonl_numbered
from dpruner.data.spec import PERPLEXITY, VALIDATION, DomainSpec, Perplexity, Source, Task, load_domain
from dpruner.errors import DPrunerError
from dpruner.validate import read_text_utf8

# The paper's medical perplexity text: 300 Harrison paragraphs (a --text-file takes as many).
TEXT_FILE_TEXTS = 300

# SparseGPT datautils.get_c4 (validation): the first 1100 documents joined by one space, cut to 256 windows.
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
C4_JOINER = " "
C4_HUB_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"  # SparseGPT / Wanda
# SparseGPT/Wanda join WikiText-2 rows with a blank line (as the original joins MultiLegalPile texts).
PPL_JOINER = "\n\n"


@dataclass(frozen=True)
class ChoiceExample:
    """One multiple-choice question: the context, its candidate continuations, the gold index."""

    id: str
    context: str
    candidates: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class GenerationExample:
    id: str
    prompt: str
    reference: str


@dataclass(frozen=True)
class TextCorpus:
    """One perplexity text. `max_windows` caps the token stream (SparseGPT's C4 cut), None = all."""

    name: str
    text: str
    documents: int
    max_windows: int | None = None


@dataclass(frozen=True)
class EvalSet:
    """Items to evaluate, what they were read from (path + sha256, or a hub name), and label names."""

    items: list[Any]
    sources: list[dict[str, Any]]
    labels: tuple[str, ...] = ()


def _label(row: dict[str, Any], key: str, labels: Sequence[str], where: str) -> int:
    value = row[key]
    if value not in labels:
        raise DPrunerError(f"{where}: {key} is {value!r}, expected one of {', '.join(map(repr, labels))}")
    return labels.index(value)


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DPrunerError(f"{where}: {key} must be a non-empty string, got {value!r:.40}")
    return value


def _sources(source: Source, data_dir: str | None, file: str | None) -> list[dict[str, Any]]:
    return [describe(path) for path in source.paths(data_dir, file)]


def choice_set(task: Task, data_dir: str | None = None, limit: int | None = None,
               file: str | None = None) -> EvalSet:
    """A multiple-choice test set of a domain spec; `limit` None = the spec's count, `file` replaces its file."""
    # Generated candidates come from all the spec's rows, so a question does not change with `limit`.
    rows = task.source.rows(data_dir, task.row_fields(), None if task.answer_field else limit, override=file)
    answers = [_text(row, task.answer_field, where) for where, row in rows] if task.answer_field else []
    if answers and len(set(answers)) <= task.distractors:
        raise DPrunerError(f"{task.source.where}: {len(set(answers))} distinct {task.answer_field} values cannot give "
                           f"{task.distractors} distractors each")
    items = []
    for index, (where, row) in enumerate(rows):
        if task.answer_field:
            label, options = _with_distractors(answers, index, task.distractors)
        else:
            label = _label(row, task.label, task.labels, where)
            options = task.candidates or tuple(_text(row, key, where) for key in task.candidate_fields)
        context = task.prompt.render(row, where, non_empty=True)
        candidates = tuple(task.candidate_template.replace("{candidate}", option) for option in options)
        items.append(ChoiceExample(str(row.get(task.id, where)) if task.id else where, context, candidates, label))
    if task.answer_field and limit is not None and limit < len(items):
        items = task.source.select(items, limit)
    return EvalSet(items, _sources(task.source, data_dir, file), task.labels)


def _with_distractors(answers: Sequence[str], index: int, count: int) -> tuple[int, tuple[str, ...]]:
    """Row `index`'s answer among the next `count` different answers (cyclically), the gold answer at
    position index mod (count + 1): deterministic, and every position is gold equally often."""
    gold = answers[index]
    others: list[str] = []
    step = 1
    while len(others) < count:
        other = answers[(index + step) % len(answers)]
        if other != gold and other not in others:
            others.append(other)
        step += 1
    position = index % (count + 1)
    return position, (*others[:position], gold, *others[position:])


def generation_set(task: Task, data_dir: str | None = None, limit: int | None = None,
                   file: str | None = None) -> EvalSet:
    """A generation test set of a domain spec (prompt, reference); arguments as `choice_set`."""
    items = [GenerationExample(str(row.get(task.id, where)) if task.id else where,
                               task.prompt.render(row, where, non_empty=True), _text(row, task.reference, where))
             for where, row in task.source.rows(data_dir, task.row_fields(), limit, override=file)]
    return EvalSet(items, _sources(task.source, data_dir, file))


def perplexity_documents(perplexity: Perplexity, data_dir: str | None = None, limit: int | None = None) -> list[str]:
    """The documents of a domain's perplexity text, before they are joined (the leak guard compares them)."""
    documents = []
    for where, row in perplexity.source.rows(data_dir, (perplexity.field,), limit):
        value = row[perplexity.field]
        if perplexity.join is not None:
            value = perplexity.join.join(as_list(value, f"{where}: {perplexity.field}"))
        documents.append(_text({perplexity.field: value}, perplexity.field, where))
    return documents


def perplexity_set(perplexity: Perplexity, data_dir: str | None = None, limit: int | None = None) -> EvalSet:
    texts = perplexity_documents(perplexity, data_dir, limit)
    return EvalSet([_corpus(perplexity.name, texts, perplexity.joiner)], _sources(perplexity.source, data_dir, None))


def task_set(spec: DomainSpec, task: str, data_dir: str | None = None, limit: int | None = None,
             file: str | None = None) -> EvalSet:
    """Evaluation set `task` of a domain: `perplexity`, `validation` or one of its `tasks`."""
    if task in (PERPLEXITY, VALIDATION):
        text = spec.perplexity_text(task)
        if text is None:
            raise DPrunerError(f"domain {spec.name} ({spec.path}) declares no {task} perplexity text")
        return perplexity_set(text, data_dir, limit)
    if task not in spec.tasks:
        raise DPrunerError(f"domain {spec.name} has no task {task!r}; expected one of {', '.join(spec.task_names())}")
    loader = choice_set if spec.tasks[task].type == "choice" else generation_set
    return loader(spec.tasks[task], data_dir, limit, file)


def shipped_task(domain: str, task: str) -> Callable[..., EvalSet]:
    """A loader `(data_dir=None, limit=None, file=None)` of one task of a shipped domain."""
    return lambda data_dir=None, limit=None, file=None: task_set(load_domain(domain), task, data_dir, limit, file)


casehold = shipped_task("legal", "casehold")
billsum = shipped_task("legal", "billsum")
multilegalpile = shipped_task("legal", PERPLEXITY)
pubmedqa = shipped_task("medical", "pubmedqa")
hqs = shipped_task("medical", "hqs")
medical_text = shipped_task("medical", PERPLEXITY)


def mednli(file: str | None, limit: int | None = None) -> EvalSet:
    """A user-supplied MedNLI JSONL file (sentence1, sentence2, gold_label)."""
    return task_set(load_domain("medical"), "mednli", None, limit, file)


def _corpus(name: str, texts: list[str], joiner: str = PPL_JOINER, max_windows: int | None = None) -> TextCorpus:
    return TextCorpus(name, joiner.join(texts), len(texts), max_windows)


def text_file(file: str, limit: int | None = TEXT_FILE_TEXTS) -> EvalSet:
    """A user text set: JSONL rows with `text`, or a plain text file of paragraphs.

    Paragraphs are separated by blank lines; a file without blank lines has one paragraph per line.
    """
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise DPrunerError(f"--text-file {path} not found (expected .jsonl rows with 'text' or a .txt file)")
    if path.suffix in (".jsonl", ".json", ".gz"):
        texts = [_text(row, "text", where) for where, row in read_jsonl_numbered(path, required=("text",), limit=limit)]
    else:
        content = read_text_utf8(path)
        separator = r"\n\s*\n" if re.search(r"\n\s*\n", content.strip()) else r"\n"
        texts = [block.strip() for block in re.split(separator, content) if block.strip()][:limit]
        if not texts:
            raise DPrunerError(f"--text-file {path} holds no text")
    return EvalSet([_corpus(path.stem, texts)], [describe(path)])


def wikitext2(data_dir: str | None = None, limit: int | None = None, split: str = "test") -> EvalSet:
    """WikiText-2 as SparseGPT/Wanda: all rows (empty ones included) joined by a blank line. `test` is
    the reported number; `validation` is what hyperparameters (the lambda sweep) are chosen on."""
    path = data_file(f"wikitext2_{split}", data_dir)
    texts = [str(row["text"]) for row in read_jsonl(path, required=("text",), limit=limit)]
    return EvalSet([_corpus("wikitext2" if split == "test" else f"wikitext2_{split}", texts)], [describe(path)])


def c4_validation(data_dir: str | None = None, limit: int | None = None, source: str = "local") -> EvalSet:
    """C4 perplexity text: SparseGPT's validation shard (hub), or offline the 30 held-out OLMo documents."""
    count = limit or C4_EVAL_DOCUMENTS
    if source == "hub":
        import datasets

        try:
            shard = datasets.load_dataset("allenai/c4", data_files={"validation": C4_HUB_VALIDATION_SHARD},
                                          split="validation")
        except Exception as err:  # offline, or the hub refused
            raise DPrunerError(f"C4 from the hub (allenai/c4 {C4_HUB_VALIDATION_SHARD}) failed: "
                               f"{str(err).splitlines()[0]}") from None
        texts = list(shard[:count]["text"])
        sources = [{"hub": f"allenai/c4 {C4_HUB_VALIDATION_SHARD}", "documents": len(texts)}]
    elif source == "local":
        paths = [data_file(name, data_dir) for name in C4_HELDOUT_FILES]
        texts = [str(row["text"]) for path in paths for row in read_jsonl(path, required=("text",))][:count]
        sources = [describe(path) for path in paths]
    else:
        raise DPrunerError(f"--c4-source {source!r} is not one of local, hub")
    return EvalSet([_corpus("c4", texts, C4_JOINER, C4_EVAL_WINDOWS)], sources)
