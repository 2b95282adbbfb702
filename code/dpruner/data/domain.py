"""Domain fine-tuning text for stage 2: the original train_lomo.py's sources, counts and templates.

The templates keep the original's quirks on purpose ("Hold statement 0", the missing closing quote
after holding 3, "which indicates" without "that" for PubMedQA PQA-A), because the importance scores
depend on the exact text the model was trained on.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from dpruner.data.files import as_list, data_file, read_json, read_jsonl, read_jsonl_numbered
from dpruner.errors import DPrunerError

ORDINALS = ("first", "second", "third", "fourth", "fifth")

CASEHOLD_TEMPLATE = (
    "A citing text consisting of the context and legal citation text is '{citing_prompt}'. "
    "Hold statement 0 is '{holding_0}', holding statement 1 is '{holding_1}', holding statement 2 is "
    "'{holding_2}', holding statement 3 is '{holding_3}, and holding statement 4 is '{holding_4}'. "
    "Choose the correct corresponding holding statement. The correct answer is holding statement "
    "{label}, which is the {ordinal} statement."
)
BILLSUM_TEMPLATE = "A bill text is '{source}'. The summary of the bill is '{summary}'."
PUBMEDQA_TEMPLATE = (
    "The abstract of a biomedical research article is '{contexts}'. Here comes a question '{question}', "
    "and please answer the question with 'yes', 'no', or 'maybe'. The answer is '{answer}', which indicates "
    "{that}{trailing}"
)
PUBMEDQA_TRAILING = {
    "yes": "the phenomenon mentioned by the question is confirmed by the abstract.",
    "no": "we do not support the phenomenon mentioned by the question based on the abstract.",
    "maybe": "we are uncertain whether the phenomenon mentioned by the question is supported by the abstract.",
}
MEDNLI_TEMPLATE = "Premise is '{s1}', and hypothesis is '{s2}'. Their relationship is '{label}', and this means {trailing}"
MEDNLI_TRAILING = {
    "entailment": "the hypothesis is true given the premise.",
    "contradiction": "the hypothesis is false given the premise.",
    "neutral": "the hypothesis is undetermined given the premise.",
}
HQS_TEMPLATE = "A question posted by a patient is '{question}'. The summary of the question is '{summary}'."


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _take(rows: list, count: int | None, what: str) -> list:
    if count is not None and count > len(rows):
        _warn(f"{what}: {count} examples requested, only {len(rows)} available; using all")
    return rows if count is None else rows[:count]


def casehold_texts(path: Path, count: int | None) -> list[str]:
    keys = ("citing_prompt", "label", *(f"holding_{i}" for i in range(5)))
    texts = []
    for where, row in read_jsonl_numbered(path, required=keys, limit=count):
        label = str(row["label"])
        if label not in {"0", "1", "2", "3", "4"}:
            raise DPrunerError(f"{where}: label {row['label']!r} is not one of 0..4")
        texts.append(CASEHOLD_TEMPLATE.format(**{k: row[k] for k in keys if k != "label"}, label=label,
                                              ordinal=ORDINALS[int(label)]))
    return _take(texts, count, f"CaseHOLD ({path.name})")  # read with limit=count; warns when short


def billsum_texts(path: Path, count: int | None) -> list[str]:
    rows = _take(read_jsonl(path, required=("source", "summary")), count, f"BillSum ({path.name})")
    return [BILLSUM_TEMPLATE.format(source=r["source"], summary=r["summary"]) for r in rows]


def _pubmedqa_text(entry: dict, where: str, artificial: bool) -> str:
    answer = entry.get("final_decision")
    if answer not in PUBMEDQA_TRAILING:
        raise DPrunerError(f"{where}: final_decision {answer!r} is not yes/no/maybe")
    return PUBMEDQA_TEMPLATE.format(contexts=" ".join(as_list(entry["CONTEXTS"], where)), question=entry["QUESTION"],
                                    answer=answer, that="" if artificial else "that ",
                                    trailing=PUBMEDQA_TRAILING[answer])


def pubmedqa_texts(path: Path, count: int | None) -> list[str]:
    rows = _take(read_jsonl_numbered(path, required=("QUESTION", "CONTEXTS", "final_decision")), count, "PubMedQA PQA-L")
    return [_pubmedqa_text(row, where, artificial=False) for where, row in rows]


def pubmedqa_artificial_texts(path: Path, count: int | None) -> list[str]:
    """PQA-A in its original dict format (`ori_pqaa.json`: id -> entry)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DPrunerError(f"{path}: expected a JSON object of id -> entry (ori_pqaa.json format)")
    entries = _take(list(data.items()), count, "PubMedQA PQA-A")
    return [_pubmedqa_text(entry, f"{path}: entry {key}", artificial=True) for key, entry in entries]


def mednli_texts(path: Path, count: int | None) -> list[str]:
    texts = []
    for where, row in read_jsonl_numbered(path, required=("sentence1", "sentence2", "gold_label"), limit=count):
        if row["gold_label"] not in MEDNLI_TRAILING:
            raise DPrunerError(f"{where}: gold_label {row['gold_label']!r} is not one of {', '.join(MEDNLI_TRAILING)}")
        texts.append(MEDNLI_TEMPLATE.format(s1=row["sentence1"], s2=row["sentence2"], label=row["gold_label"],
                                            trailing=MEDNLI_TRAILING[row["gold_label"]]))
    return texts


def hqs_texts(path: Path, count: int | None) -> list[str]:
    rows = read_jsonl(path, required=("CHQ", "Summary"), limit=count)
    return [HQS_TEMPLATE.format(question=r["CHQ"], summary=r["Summary"]) for r in rows]


def domain_texts(config) -> list[str]:
    """The domain's training strings in the original's order, then shuffled with `config.seed`."""
    root = config.data_dir
    texts: list[str] = []
    if config.domain == "legal":
        if config.casehold_examples != 0:
            texts += casehold_texts(data_file("casehold_train", root), config.casehold_examples)
        if config.billsum_examples != 0:
            texts += billsum_texts(data_file("billsum_train_standin", root), config.billsum_examples)
    elif config.domain == "medical":
        if config.pubmedqa_examples != 0:
            texts += pubmedqa_texts(data_file("pubmedqa_train", root), config.pubmedqa_examples)
        if config.pubmedqa_artificial_examples:
            if config.pubmedqa_artificial_file:
                texts += pubmedqa_artificial_texts(Path(config.pubmedqa_artificial_file),
                                                   config.pubmedqa_artificial_examples)
            else:
                _warn("pubmedqa_artificial_file not set: PubMedQA PQA-A (ori_pqaa.json) is not shipped; skipped")
        if config.mednli_examples:
            if config.mednli_file:
                texts += mednli_texts(Path(config.mednli_file), config.mednli_examples)
            else:
                _warn("mednli_file not set: MedNLI needs a PhysioNet licence and is not shipped; skipped")
        if config.hqs_examples != 0:
            texts += hqs_texts(data_file("hqs_train", root), config.hqs_examples)
    else:
        raise DPrunerError(f"unknown domain {config.domain!r}; expected legal or medical")
    if not texts:
        raise DPrunerError(f"domain {config.domain}: the configured sources give no training examples")
    random.Random(config.seed).shuffle(texts)
    return texts
