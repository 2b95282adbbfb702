"""Evaluation sets and their prompt templates (stage 4).

Every loader validates its rows before a model is loaded, so a bad file costs seconds, not a model
load; a bad row is reported as `file:line`. The templates are the original evaluation scripts'
(CaseHOLD, BillSum) or, where the original shipped no script (PubMedQA, MedNLI, HQS), the prefix of
its stage-2 training template up to the answer (upstream notes §3.1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpruner.data.calibration import C4_HELDOUT_FILES
from dpruner.data.files import as_list, data_file, describe, read_jsonl, read_jsonl_numbered
from dpruner.errors import DPrunerError
from dpruner.validate import read_text_utf8

# Row counts the original evaluates on (upstream notes §5, protocol notes).
MULTILEGALPILE_TEXTS = 300  # legal_perplexity_evaluation.py reads all 300 MultiLegalPile rows
CASEHOLD_TEST_ROWS = 200  # test_casehold.py
BILLSUM_TEST_ROWS = 200  # test_billsum.py
PUBMEDQA_TEST_ROWS = 500  # PubMedQA PQA-L test split
HQS_TEST_ROWS = 100  # MEDIQA 2021 question-summarization test set
MEDICAL_PPL_TEXTS = 300  # the paper's 300 Harrison paragraphs; our default substitute takes 300 abstracts
# SparseGPT datautils.get_c4 (validation): the first 1100 documents joined by one space, cut to 256 windows.
C4_EVAL_DOCUMENTS = 1100
C4_EVAL_WINDOWS = 256
C4_JOINER = " "
C4_HUB_VALIDATION_SHARD = "en/c4-validation.00000-of-00008.json.gz"  # SparseGPT / Wanda
# The original joins MultiLegalPile texts with a blank line; SparseGPT/Wanda join WikiText-2 rows the same way.
PPL_JOINER = "\n\n"

# test_casehold.py: context and candidate (with its leading space) are concatenated.
CASEHOLD_CONTEXT = "A citing text is '{citing_prompt}'. The correct holding statement is"
CASEHOLD_CANDIDATE = " {holding}"
CASEHOLD_LABELS = ("0", "1", "2", "3", "4")  # labels are strings; the original exits on anything else
CASEHOLD_HOLDINGS = tuple(f"holding_{label}" for label in CASEHOLD_LABELS)
# Training template prefix for PubMedQA (upstream §3.1), cut after the opening quote of the answer.
PUBMEDQA_CONTEXT = ("The abstract of a biomedical research article is '{contexts}'. Here comes a question "
                    "'{question}', and please answer the question with 'yes', 'no', or 'maybe'. The answer is '")
PUBMEDQA_LABELS = ("yes", "no", "maybe")
# Training template prefix for MedNLI (upstream §3.1).
MEDNLI_CONTEXT = "Premise is '{premise}', and hypothesis is '{hypothesis}'. Their relationship is '"
MEDNLI_LABELS = ("entailment", "contradiction", "neutral")
# test_billsum.py's prompt (the quote is left open) and the HQS training template's prefix (upstream §3.1).
BILLSUM_PROMPT = "A bill text is '{source}'. The summary of the bill is '"
HQS_PROMPT = "A question posted by a patient is '{question}'. The summary of the question is '"

MEDNLI_HELP = ("MedNLI is credentialed (PhysioNet licence) and not shipped: download mli_test_v1.jsonl "
               "from https://physionet.org/content/mednli/ and pass its path")


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


def _numbered_rows(path: Path, required: Sequence[str], limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """Rows of a JSONL file paired with `file:line`, so field errors can name the exact line."""
    return read_jsonl_numbered(path, required=required, limit=limit)


def _spread_rows(path: Path, required: Sequence[str], limit: int | None) -> list[tuple[str, dict[str, Any]]]:
    """`limit` rows evenly spaced over the whole file, for label-sorted files (the PQA-L test file lists
    its 276 'yes', then 169 'no', then 55 'maybe'): the first N rows would all be one label."""
    rows = read_jsonl_numbered(path, required=required)
    if limit is None or limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise DPrunerError(f"{where}: {key} must be a non-empty string, got {value!r:.40}")
    return value


def _label(row: dict[str, Any], key: str, labels: Sequence[str], where: str) -> int:
    value = row[key]
    if value not in labels:
        raise DPrunerError(f"{where}: {key} is {value!r}, expected one of {', '.join(map(repr, labels))}")
    return labels.index(value)


def casehold(data_dir: str | None = None, limit: int | None = CASEHOLD_TEST_ROWS) -> EvalSet:
    path = data_file("casehold_test", data_dir)
    items = []
    for where, row in _numbered_rows(path, ("citing_prompt", *CASEHOLD_HOLDINGS, "label"), limit):
        label = _label(row, "label", CASEHOLD_LABELS, where)
        items.append(ChoiceExample(
            id=str(row.get("example_id", where)),
            context=CASEHOLD_CONTEXT.format(citing_prompt=_text(row, "citing_prompt", where)),
            candidates=tuple(CASEHOLD_CANDIDATE.format(holding=_text(row, key, where)) for key in CASEHOLD_HOLDINGS),
            label=label))
    return EvalSet(items, [describe(path)], CASEHOLD_LABELS)


def pubmedqa(data_dir: str | None = None, limit: int | None = PUBMEDQA_TEST_ROWS) -> EvalSet:
    path = data_file("pubmedqa_test", data_dir)
    items = []
    for where, row in _spread_rows(path, ("QUESTION", "CONTEXTS", "final_decision"), limit):
        context = PUBMEDQA_CONTEXT.format(contexts=" ".join(as_list(row["CONTEXTS"], f"{where}: CONTEXTS")),
                                          question=_text(row, "QUESTION", where))
        items.append(ChoiceExample(str(row.get("id", where)), context, PUBMEDQA_LABELS,
                                   _label(row, "final_decision", PUBMEDQA_LABELS, where)))
    return EvalSet(items, [describe(path)], PUBMEDQA_LABELS)


def mednli(file: str | None, limit: int | None = None) -> EvalSet:
    """A user-supplied MedNLI JSONL file (sentence1, sentence2, gold_label)."""
    if not file:
        raise DPrunerError(f"test_mednli.py needs the MedNLI test file: {MEDNLI_HELP}")
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise DPrunerError(f"MedNLI file {path} not found; {MEDNLI_HELP}")
    items = []
    for where, row in _spread_rows(path, ("sentence1", "sentence2", "gold_label"), limit):
        context = MEDNLI_CONTEXT.format(premise=_text(row, "sentence1", where),
                                        hypothesis=_text(row, "sentence2", where))
        items.append(ChoiceExample(str(row.get("pairID", where)), context, MEDNLI_LABELS,
                                   _label(row, "gold_label", MEDNLI_LABELS, where)))
    return EvalSet(items, [describe(path)], MEDNLI_LABELS)


def billsum(data_dir: str | None = None, limit: int | None = BILLSUM_TEST_ROWS) -> EvalSet:
    path = data_file("billsum_test", data_dir)
    items = [GenerationExample(where, BILLSUM_PROMPT.format(source=_text(row, "source", where)),
                               _text(row, "summary", where))
             for where, row in _numbered_rows(path, ("source", "summary"), limit)]
    return EvalSet(items, [describe(path)])


def hqs(data_dir: str | None = None, limit: int | None = HQS_TEST_ROWS) -> EvalSet:
    path = data_file("hqs_test", data_dir)
    items = [GenerationExample(str(row.get("q_id", where)), HQS_PROMPT.format(question=_text(row, "CHQ", where)),
                               _text(row, "Summary", where))
             for where, row in _numbered_rows(path, ("CHQ", "Summary"), limit)]
    return EvalSet(items, [describe(path)])


def _corpus(name: str, texts: list[str], joiner: str = PPL_JOINER, max_windows: int | None = None) -> TextCorpus:
    return TextCorpus(name, joiner.join(texts), len(texts), max_windows)


def multilegalpile(data_dir: str | None = None, limit: int | None = MULTILEGALPILE_TEXTS) -> EvalSet:
    path = data_file("multilegalpile", data_dir)
    texts = [_text(row, "text", where) for where, row in _numbered_rows(path, ("text",), limit)]
    return EvalSet([_corpus("multilegalpile", texts)], [describe(path)])


def pubmedqa_abstracts(data_dir: str | None = None, limit: int | None = MEDICAL_PPL_TEXTS) -> EvalSet:
    """Our redistributable medical text: the abstracts of the PubMedQA rows outside the test set."""
    path = data_file("pubmedqa_train", data_dir)
    texts = [" ".join(as_list(row["CONTEXTS"], f"{where}: CONTEXTS"))
             for where, row in _numbered_rows(path, ("CONTEXTS",), limit)]
    return EvalSet([_corpus("pubmedqa_abstracts", texts)], [describe(path)])


def text_file(file: str, limit: int | None = MEDICAL_PPL_TEXTS) -> EvalSet:
    """A user text set: JSONL rows with `text`, or a plain text file of paragraphs.

    Paragraphs are separated by blank lines; a file without blank lines has one paragraph per line.
    """
    path = Path(file).expanduser().resolve()
    if not path.is_file():
        raise DPrunerError(f"--text-file {path} not found (expected .jsonl rows with 'text' or a .txt file)")
    if path.suffix in (".jsonl", ".json", ".gz"):
        texts = [_text(row, "text", where) for where, row in _numbered_rows(path, ("text",), limit)]
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
