"""Result tables: read evaluation JSONs laid out as RESULTS/<row label>/<task>.json and print the
paper-style table as markdown and CSV. Every cell shows the value, its 95 % bootstrap interval over the
evaluation units (the `.examples.jsonl` beside each result), its % of dense (or of another row), and `*` where a paired
bootstrap against the reference row (SparseGPT by default) excludes a zero difference. Rows named
`<label>~seed<N>` are seeds of one method: they are summarised as mean ± s.d. (`seed_table`)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpruner.data.spec import PERPLEXITY, VALIDATION, load_domain
from dpruner.errors import DPrunerError
from dpruner.io import read_json
from dpruner.stats import (Interval, PairedDifference, Statistic, bootstrap_ci, exp_mean_of, exp_weighted_mean,
                           macro_f1_of, mean_and_sd, mean_of, paired_bootstrap)

DENSE = "dense"
# The row every other one is tested against (issue: significance against SparseGPT).
DEFAULT_REFERENCE = "sparsegpt"
SEED_SEPARATOR = "~seed"


@dataclass(frozen=True)
class Column:
    title: str
    task: str  # result file stem
    get: Callable[[dict[str, Any]], float]
    statistic: Statistic  # the same number recomputed from the per-unit rows (bootstrap)
    lower_is_better: bool = False
    percent: bool = False  # show as a percentage (accuracy, F1, ROUGE)
    corpus: str | None = None  # perplexity: whose windows are the units (None = the only corpus)


def _ppl_column(title: str, task: str, corpus: str | None, token_weighted: bool = False) -> Column:
    """A perplexity column; corpus None = the only corpus (its name follows a user --text-file)."""
    key = "ppl_token_weighted" if token_weighted else "ppl_window_mean"

    def get(result: dict[str, Any]) -> float:
        metrics = result["metrics"]
        return (metrics[corpus] if corpus else next(iter(metrics.values())))[key]
    statistic = exp_weighted_mean("nll", "tokens") if token_weighted else exp_mean_of("nll")
    return Column(title, task, get, statistic, lower_is_better=True, corpus=corpus)


def _metric_column(title: str, task: str, key: str) -> Column:
    """Accuracy / macro-F1 over the per-example (label, prediction) rows, ROUGE over per-example scores."""
    statistic = {"accuracy": mean_of("correct"), "macro_f1": macro_f1_of("label", "prediction")}.get(key, mean_of(key))
    return Column(title, task, lambda result: result["metrics"][key], statistic, percent=True)


def _rouge_columns(prefix: str, task: str) -> list[Column]:
    return [_metric_column(f"{prefix} {name}", task, key) for name, key in
            (("R-1", "rouge1"), ("R-2", "rouge2"), ("R-L", "rougeL"))]


WIKITEXT = _ppl_column("WikiText-2 ppl", "general_perplexity", "wikitext2")
GENERAL_VALIDATION_TASK = "general_validation_perplexity"  # WikiText-2 validation + held-out C4, one result
COLUMNS: dict[str, list[Column]] = {
    "legal": [
        _ppl_column("Legal ppl", "legal_perplexity", "multilegalpile"),
        _ppl_column("Legal ppl (token-weighted)", "legal_perplexity", "multilegalpile", token_weighted=True),
        _metric_column("CaseHOLD acc", "casehold", "accuracy"),
        _metric_column("CaseHOLD F1", "casehold", "macro_f1"),
        *_rouge_columns("BillSum", "billsum"),
        WIKITEXT,
    ],
    "medical": [
        _ppl_column("Medical ppl", "medical_perplexity", None),
        _ppl_column("Medical ppl (token-weighted)", "medical_perplexity", None, token_weighted=True),
        _metric_column("PubMedQA acc", "pubmedqa", "accuracy"),
        _metric_column("PubMedQA F1", "pubmedqa", "macro_f1"),
        *_rouge_columns("HQS", "hqs"),
        _metric_column("MedNLI acc", "mednli", "accuracy"),
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
        columns += [_ppl_column(spec.perplexity.title, task, None),
                    _ppl_column(f"{spec.perplexity.title} (token-weighted)", task, None, token_weighted=True)]
    for name, task in spec.tasks.items():
        metrics = (("acc", "accuracy"), ("F1", "macro_f1")) if task.type == "choice" else \
            (("R-1", "rouge1"), ("R-2", "rouge2"), ("R-L", "rougeL"))
        columns += [_metric_column(f"{task.title} {short}", name, key) for short, key in metrics]
    return [*columns, WIKITEXT]


def validation_columns(domain: str) -> list[Column]:
    """The validation texts hyperparameters are chosen on (never reported as test numbers): the domain's
    validation perplexity text, WikiText-2 validation and the held-out C4 documents."""
    spec = load_domain(domain)
    if spec.validation is None:
        raise DPrunerError(f"domain {spec.name} ({spec.path}) declares no validation text")
    return [_ppl_column(spec.validation.title, spec.result_name(VALIDATION), None),
            _ppl_column("WikiText-2 validation ppl", GENERAL_VALIDATION_TASK, "wikitext2_validation"),
            _ppl_column("C4 held-out ppl", GENERAL_VALIDATION_TASK, "c4")]


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
    "dpruner-upstream": "D-Pruner, the original code's form (upstream)",
    "dpruner-squared-grad": "D-Pruner, squared-gradient form (formerly 'paper')",
    "dpruner-obs": "D-Pruner-OBS (its selection: settings.txt, obs=)",
    "dpruner-obs-mask": "D-Pruner-OBS (dual mask + OBS compensation)",
    "dpruner-obs-saliency": "D-Pruner-OBS (dual importance ranks inside the OBS sweep)",
    "general-only": "General importance only (stage 1 scores)",
    "domain-only": "Domain importance only (no regularizer, no general scores)",
}


EXAMPLES_KEY = "_examples_path"  # set by load_results when a result's per-unit rows lie beside it
EXAMPLES_ROWS_KEY = "_examples_rows"  # those rows, once the first column has read them


def load_results(folder: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{row label: {task: result}} from RESULTS/<label>/<task>.json (+ <task>.examples.jsonl)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DPrunerError(f"results folder {folder} does not exist")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(folder.glob("*/*.json")):
        if path.parent.name.startswith("."):  # a row still being copied in (io.atomic_dir's hidden folder)
            continue
        result = read_json(path)
        examples = path.with_name(f"{path.stem}.examples.jsonl")
        if examples.is_file() and isinstance(result, dict):  # other shapes are refused by validate.check_results
            result[EXAMPLES_KEY] = examples
        results.setdefault(path.parent.name, {})[path.stem] = result
    if not results:
        raise DPrunerError(f"results folder {folder} holds no <label>/<task>.json files")
    return results


def _read_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DPrunerError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return rows


def _units(result: dict[str, Any], column: Column) -> dict[str, list] | None:
    """The column's evaluation units as columns of equal length (ids first), or None without rows."""
    path = result.get(EXAMPLES_KEY)
    if path is None:
        return None
    if EXAMPLES_ROWS_KEY not in result:  # read once per loaded result, whatever the number of its columns
        result[EXAMPLES_ROWS_KEY] = _read_rows(path)
    rows = result[EXAMPLES_ROWS_KEY]
    if rows and "corpus" in rows[0]:
        corpus = column.corpus or rows[0]["corpus"]
        rows = [row for row in rows if row["corpus"] == corpus]
    if len(rows) < 2:
        return None
    units: dict[str, list] = {"id": [row["id"] for row in rows]}
    if "label" in rows[0] and "prediction" in rows[0]:
        units["label"] = [row["label"] for row in rows]
        units["prediction"] = [row["prediction"] for row in rows]
        units["correct"] = [float(row["label"] == row["prediction"]) for row in rows]
    for key, value in rows[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            units[key] = [row[key] for row in rows]
    return units


@dataclass
class Cell:
    value: float | None
    interval: Interval | None = None  # 95 % bootstrap CI over the units
    versus_reference: PairedDifference | None = None  # paired bootstrap: this row minus the reference row


@dataclass
class Table:
    domain: str
    columns: list[Column]
    rows: list[tuple[str, dict[str, Cell], dict[str, Any]]]  # label, cells by column title, sparsity
    reference: str | None = None  # the row the paired tests compare against
    percent_base: str | None = DENSE  # the row each value is shown as a percentage of (None or absent: no percentages)

    def value(self, label: str, column: Column) -> float | None:
        return next(cells for name, cells, _ in self.rows if name == label)[column.title].value


def _cell(result: dict[str, Any] | None, column: Column, reference_units: dict[str, list] | None) -> Cell:
    if result is None:
        return Cell(None)
    cell = Cell(float(column.get(result)))
    units = _units(result, column)
    if units is None:
        return cell
    cell.interval = bootstrap_ci(units, column.statistic)
    if reference_units is not None:
        if reference_units["id"] != units["id"]:
            raise DPrunerError(f"{result[EXAMPLES_KEY]}: its units differ from the reference row's "
                               f"({len(units['id'])} vs {len(reference_units['id'])}); evaluate both on the same data")
        cell.versus_reference = paired_bootstrap(reference_units, units, column.statistic)
    return cell


def _default_order(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    rank = list(ROW_NAMES)
    return sorted(results, key=lambda l: (l != DENSE, rank.index(l) if l in rank else len(rank), l))


def build_table(results: dict[str, dict[str, dict[str, Any]]], domain: str,
                labels: Sequence[str] | None = None, reference: str | None = DEFAULT_REFERENCE,
                columns: Sequence[Column] | None = None, percent_of: str = DENSE) -> Table:
    """The table for `labels` (default: every non-seed row, dense first). `reference` (when it is a
    row) is the method every other row is paired against. `domain`: a shipped name or a spec YAML;
    `columns` replaces its layout (the sweep's validation columns). `percent_of`: the row each value is
    shown as a percentage of; dense by default (no percentages when dense is not a row), any other
    label must be a row (e.g. the reference, so a change against it comes from the table itself)."""
    layout = list(columns) if columns is not None else domain_columns(domain)
    order = list(labels) if labels else [l for l in _default_order(results) if SEED_SEPARATOR not in l]
    missing = [label for label in order if label not in results]
    if missing:
        raise DPrunerError(f"no results for row(s) {', '.join(missing)}; have {', '.join(sorted(results))}")
    reference = reference if reference in order else None
    if percent_of != DENSE and percent_of not in order:
        raise DPrunerError(f"percent_of={percent_of!r} is not a row of the table; expected one of {', '.join(order)}")
    columns = [c for c in layout if any(c.task in results[label] for label in order)]
    reference_units = {c.title: _units(results[reference][c.task], c) if reference and c.task in results[reference]
                       else None for c in columns}
    rows = []
    for label in order:
        cells = {}
        sparsity: dict[str, Any] = {}
        for column in columns:
            result = results[label].get(column.task)
            units = reference_units[column.title] if label != reference else None
            cells[column.title] = _cell(result, column, units)
            if result is not None and not sparsity:
                sparsity = result.get("sparsity", {})
        rows.append((label, cells, sparsity))
    return Table(domain, columns, rows, reference, percent_of if percent_of in order else None)


def _number(value: float, column: Column) -> str:
    return f"{100 * value:.2f}" if column.percent else f"{value:.3f}"


def _format(cell: Cell, column: Column) -> str:
    if cell.value is None or math.isnan(cell.value):
        return "–"
    text = _number(cell.value, column)
    if cell.interval is not None:
        text += f" [{_number(cell.interval.low, column)}, {_number(cell.interval.high, column)}]"
    return text


def _percent_of_base(table: Table, label: str, column: Column) -> float | None:
    """`label`'s value as a percentage of the base row's (None for the base itself or a missing value)."""
    base = table.value(table.percent_base, column) if table.percent_base else None
    value = table.value(label, column)
    if label == table.percent_base or value is None or not base:
        return None
    return 100 * value / base


def _significance(cell: Cell) -> str:
    return "*" if cell.versus_reference is not None and cell.versus_reference.significant else ""


def _sparsity_cell(sparsity: dict[str, Any]) -> str:
    if "parameters_after" in sparsity and "parameters_before" in sparsity:
        return f"{100 * (1 - sparsity['parameters_after'] / sparsity['parameters_before']):.1f}% params removed"
    if "projection_sparsity" in sparsity:
        return f"{100 * sparsity['projection_sparsity']:.1f} / {100 * sparsity['overall_sparsity']:.1f}"
    return "–"


def legend(table: Table) -> str:
    """What the brackets and stars mean, for the line under a table."""
    reference = ROW_NAMES.get(table.reference, table.reference) if table.reference else None
    text = "[low, high]: 95 % bootstrap interval over examples (perplexity: over scored windows)"
    if table.percent_base:
        text += f"; (N%): the value as a percentage of {ROW_NAMES.get(table.percent_base, table.percent_base)}'s"
    if reference:
        text += f"; * the paired-bootstrap 95 % interval of the difference to {reference} excludes 0 " \
                "(no star: no difference within the noise)"
    return text + "."


def to_markdown(table: Table) -> str:
    head = ["Method", "Sparsity % (proj / all)", *(c.title + (" ↓" if c.lower_is_better else " ↑") for c in table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, cells, sparsity in table.rows:
        row = [ROW_NAMES.get(label, label), _sparsity_cell(sparsity)]
        for column in table.columns:
            percent = _percent_of_base(table, label, column)
            row.append(_format(cells[column.title], column) + (f" ({percent:.1f}%)" if percent is not None else "")
                       + _significance(cells[column.title]))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + legend(table) + "\n"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["label", "method", "projection_sparsity", "overall_sparsity", "column", "value", "percent_of_base",
                     "percent_base", "ci95_low", "ci95_high", "reference", "diff_vs_reference", "diff_ci95_low",
                     "diff_ci95_high", "diff_p_value"])
    for label, cells, sparsity in table.rows:
        for column in table.columns:
            cell = cells[column.title]
            percent = _percent_of_base(table, label, column)
            ci = (cell.interval.low, cell.interval.high) if cell.interval else (None, None)
            paired = cell.versus_reference
            diff = (paired.difference, paired.low, paired.high, paired.p_value) if paired else (None,) * 4
            writer.writerow([label, ROW_NAMES.get(label, label), sparsity.get("projection_sparsity"),
                             sparsity.get("overall_sparsity"), column.title, cell.value, percent,
                             table.percent_base if percent is not None else None, *ci,
                             table.reference if paired else None, *diff])
    return buffer.getvalue()


def seed_groups(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list[str]]:
    """{method label: its rows over seeds}: the `<label>~seed<N>` rows plus `<label>` itself (the
    default seed) when present, for methods with at least 2 seeds."""
    groups: dict[str, list[str]] = {}
    for label in sorted(results):
        if SEED_SEPARATOR in label:
            groups.setdefault(label.split(SEED_SEPARATOR)[0], []).append(label)
    for method, labels in groups.items():
        if method in results:
            labels.insert(0, method)
    return {method: labels for method, labels in groups.items() if len(labels) >= 2}


def _seed_suffix(label: str) -> str:
    """'' for a method's default-seed row, else its `~seed<N>` part (what pairs it with another method's row)."""
    return label[label.index(SEED_SEPARATOR):] if SEED_SEPARATOR in label else ""


def _same_seed_verdict(results: dict[str, dict[str, dict[str, Any]]], labels: Sequence[str], reference: str,
                       column: Column) -> str:
    """How the method's seed rows compare with `reference`'s row of the same seed, one paired bootstrap
    per seed both ran: "better* in 3/3", "no difference in 3/3", ... ('' without such a pair)."""
    better = worse = pairs = 0
    for label in labels:
        partner = reference + _seed_suffix(label)
        if column.task not in results[label] or column.task not in results.get(partner, {}):
            continue
        versus = _cell(results[label][column.task], column, _units(results[partner][column.task], column)).versus_reference
        if versus is None:
            continue
        pairs += 1
        if versus.significant:
            better, worse = (better + 1, worse) if (versus.difference < 0) == column.lower_is_better else (better, worse + 1)
    if not pairs:
        return ""
    parts = [f"{word}* in {count}/{pairs}" for word, count in (("better", better), ("worse", worse)) if count]
    return ", ".join(parts) or f"no difference in {pairs}/{pairs}"


def seed_table(results: dict[str, dict[str, dict[str, Any]]], domain: str, reference: str | None = None,
               percent_of: str | None = None) -> str:
    """Markdown: mean ± s.d. over seeds of every column, one row per method with >= 2 seed rows. With
    `percent_of` (a method with seeds) each mean is also shown as a percentage of that method's mean; with
    `reference`, each seed is paired with the reference's row of the same seed, so a claim over seeds
    says in how many of them the difference is beyond the noise."""
    groups = seed_groups(results)
    if not groups:
        return ""
    columns = [c for c in domain_columns(domain) if any(c.task in results[l] for ls in groups.values() for l in ls)]
    head = ["Method", "seeds", *(c.title + (" ↓" if c.lower_is_better else " ↑") for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means = {method: {c.title: _seed_mean_and_sd(results, labels, c) for c in columns} for method, labels in groups.items()}
    for method, labels in groups.items():
        row = [ROW_NAMES.get(method, method), str(len(labels))]
        for column in columns:
            spread = means[method][column.title]
            if spread is None:
                row.append("–")
                continue
            base = means[percent_of][column.title] if percent_of in means and method != percent_of else None
            verdict = _same_seed_verdict(results, labels, reference, column) if reference and method != reference else ""
            row.append(f"{_number(spread[0], column)} ± {_number(spread[1], column)}"
                       + (f" ({100 * spread[0] / base[0]:.1f}%)" if base and base[0] else "")
                       + (f" [{verdict}]" if verdict else ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\n" + _seed_legend(reference if reference in groups else None,
                                                   percent_of if percent_of in groups else None) + "\n"


def _seed_mean_and_sd(results: dict[str, dict[str, dict[str, Any]]], labels: Sequence[str],
                      column: Column) -> tuple[float, float] | None:
    values = [float(column.get(results[l][column.task])) for l in labels if column.task in results[l]]
    return mean_and_sd(values) if len(values) >= 2 else None


def _seed_legend(reference: str | None, percent_of: str | None) -> str:
    text = "mean ± s.d. over the seed rows (the default seed and `~seed<N>`)"
    if percent_of:
        text += f"; (N%): the mean as a percentage of {ROW_NAMES.get(percent_of, percent_of)}'s mean"
    if reference:
        text += f"; [better* in k/n]: of the n seeds both rows ran, the paired bootstrap against " \
                f"{ROW_NAMES.get(reference, reference)}'s row of the same seed excludes 0 in k, in this direction"
    return text + "."
