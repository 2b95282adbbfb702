"""Result tables: read evaluation JSONs laid out as RESULTS/<row label>/<task>.json and print the
paper-style table (absolute value and % of dense for every cell) as markdown and CSV."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpruner.data.spec import PERPLEXITY, load_domain
from dpruner.errors import DPrunerError
from dpruner.io import read_json

DENSE = "dense"


@dataclass(frozen=True)
class Column:
    title: str
    task: str  # result file stem
    get: Callable[[dict[str, Any]], float]
    lower_is_better: bool = False
    percent: bool = False  # show as a percentage (accuracy, F1, ROUGE)


def _ppl(corpus: str | None, key: str = "ppl_window_mean") -> Callable[[dict[str, Any]], float]:
    """A perplexity from a result; corpus None = the only corpus (its name follows a user --text-file)."""
    def get(result: dict[str, Any]) -> float:
        metrics = result["metrics"]
        return (metrics[corpus] if corpus else next(iter(metrics.values())))[key]
    return get


def _metric(key: str) -> Callable[[dict[str, Any]], float]:
    return lambda result: result["metrics"][key]


WIKITEXT = Column("WikiText-2 ppl", "general_perplexity", _ppl("wikitext2"), lower_is_better=True)
COLUMNS: dict[str, list[Column]] = {
    "legal": [
        Column("Legal ppl", "legal_perplexity", _ppl("multilegalpile"), lower_is_better=True),
        Column("Legal ppl (token-weighted)", "legal_perplexity", _ppl("multilegalpile", "ppl_token_weighted"),
               lower_is_better=True),
        Column("CaseHOLD acc", "casehold", _metric("accuracy"), percent=True),
        Column("CaseHOLD F1", "casehold", _metric("macro_f1"), percent=True),
        Column("BillSum R-1", "billsum", _metric("rouge1"), percent=True),
        Column("BillSum R-2", "billsum", _metric("rouge2"), percent=True),
        Column("BillSum R-L", "billsum", _metric("rougeL"), percent=True),
        WIKITEXT,
    ],
    "medical": [
        Column("Medical ppl", "medical_perplexity", _ppl(None), lower_is_better=True),
        Column("Medical ppl (token-weighted)", "medical_perplexity", _ppl(None, "ppl_token_weighted"),
               lower_is_better=True),
        Column("PubMedQA acc", "pubmedqa", _metric("accuracy"), percent=True),
        Column("PubMedQA F1", "pubmedqa", _metric("macro_f1"), percent=True),
        Column("HQS R-1", "hqs", _metric("rouge1"), percent=True),
        Column("HQS R-2", "hqs", _metric("rouge2"), percent=True),
        Column("HQS R-L", "hqs", _metric("rougeL"), percent=True),
        Column("MedNLI acc", "mednli", _metric("accuracy"), percent=True),
        WIKITEXT,
    ],
}



def domain_columns(domain: str) -> list[Column]:
    """The paper's layout of a shipped domain (COLUMNS), else one set of columns per task of the
    domain's spec (a YAML path): perplexity, accuracy + macro-F1, ROUGE-1/2/L; then WikiText-2."""
    if domain in COLUMNS:
        return COLUMNS[domain]
    spec = load_domain(domain)
    columns = []
    if spec.perplexity is not None:
        task = spec.result_name(PERPLEXITY)
        columns += [Column(spec.perplexity.title, task, _ppl(None), lower_is_better=True),
                    Column(f"{spec.perplexity.title} (token-weighted)", task, _ppl(None, "ppl_token_weighted"),
                           lower_is_better=True)]
    for name, task in spec.tasks.items():
        metrics = (("acc", "accuracy"), ("F1", "macro_f1")) if task.type == "choice" else \
            (("R-1", "rouge1"), ("R-2", "rouge2"), ("R-L", "rougeL"))
        columns += [Column(f"{task.title} {short}", name, _metric(key), percent=True) for short, key in metrics]
    return [*columns, WIKITEXT]


# Display names of the row labels the scripts use; unknown labels are shown as they are.
ROW_NAMES = {
    DENSE: "Dense",
    "magnitude": "Magnitude",
    "sparsegpt": "SparseGPT",
    "wanda": "Wanda",
    "llm-pruner": "LLM-Pruner-style (structured, no LoRA)",
    "mixcal": "MixCal (C4 + domain Hessians)",
    "dpruner-matrix": "D-Pruner (per matrix)",
    "dpruner-iterative": "D-Pruner (iterative blocking)",
    "dpruner-noreg": "D-Pruner w/o regularizer (lambda = 0)",
    "general-only": "General importance only (stage 1 scores)",
    "domain-only": "Domain importance only (no regularizer, no general scores)",
}


def load_results(folder: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{row label: {task: result}} from RESULTS/<label>/<task>.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DPrunerError(f"results folder {folder} does not exist")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*/*.json")):
        results.setdefault(path.parent.name, {})[path.stem] = read_json(path)
    if not results:
        raise DPrunerError(f"results folder {folder} holds no <label>/<task>.json files")
    return results


@dataclass
class Table:
    domain: str
    columns: list[Column]
    rows: list[tuple[str, dict[str, float | None], dict[str, Any]]]  # label, values by column title, sparsity

    def value(self, label: str, column: Column) -> float | None:
        return next(values for name, values, _ in self.rows if name == label).get(column.title)


def build_table(results: dict[str, dict[str, dict[str, Any]]], domain: str,
                labels: Sequence[str] | None = None) -> Table:
    layout = domain_columns(domain)
    order = list(labels) if labels else sorted(results, key=lambda l: (l != DENSE, list(ROW_NAMES).index(l)
                                                                        if l in ROW_NAMES else len(ROW_NAMES), l))
    missing = [label for label in order if label not in results]
    if missing:
        raise DPrunerError(f"no results for row(s) {', '.join(missing)}; have {', '.join(sorted(results))}")
    columns = [c for c in layout if any(c.task in results[label] for label in order)]
    rows = []
    for label in order:
        values = {}
        sparsity: dict[str, Any] = {}
        for column in columns:
            result = results[label].get(column.task)
            values[column.title] = None if result is None else float(column.get(result))
            if result is not None and not sparsity:
                sparsity = result.get("sparsity", {})
        rows.append((label, values, sparsity))
    return Table(domain, columns, rows)


def _format(value: float | None, column: Column) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.2f}" if column.percent else f"{value:.3f}"


def _percent_of_dense(table: Table, label: str, column: Column) -> str:
    has_dense = any(name == DENSE for name, _, _ in table.rows)
    value = table.value(label, column)
    dense = table.value(DENSE, column) if has_dense else None
    if label == DENSE or value is None or not dense:
        return ""
    return f" ({100 * value / dense:.1f}%)"


def _sparsity_cell(sparsity: dict[str, Any]) -> str:
    if "parameters_after" in sparsity and "parameters_before" in sparsity:
        return f"{100 * (1 - sparsity['parameters_after'] / sparsity['parameters_before']):.1f}% params removed"
    if "projection_sparsity" in sparsity:
        return f"{100 * sparsity['projection_sparsity']:.1f} / {100 * sparsity['overall_sparsity']:.1f}"
    return "–"


def to_markdown(table: Table) -> str:
    head = ["Method", "Sparsity % (proj / all)", *(c.title + (" ↓" if c.lower_is_better else " ↑") for c in table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, values, sparsity in table.rows:
        cells = [ROW_NAMES.get(label, label), _sparsity_cell(sparsity)]
        cells += [_format(values[c.title], c) + _percent_of_dense(table, label, c) for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "method", "projection_sparsity", "overall_sparsity", "column", "value", "percent_of_dense"])
    has_dense = any(name == DENSE for name, _, _ in table.rows)
    for label, values, sparsity in table.rows:
        for column in table.columns:
            value = values[column.title]
            dense = table.value(DENSE, column) if has_dense else None
            ratio = 100 * value / dense if value is not None and dense else None
            writer.writerow([label, ROW_NAMES.get(label, label), sparsity.get("projection_sparsity"),
                             sparsity.get("overall_sparsity"), column.title, value, ratio])
    return buffer.getvalue()
