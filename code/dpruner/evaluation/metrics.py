"""Accuracy, macro-F1 and ROUGE, computed locally (no hub-loaded metric scripts)."""

from __future__ import annotations

from collections.abc import Sequence

from dpruner.errors import DPrunerError

# The original pins rouge-score 0.1.2 but computes ROUGE outside the repo; we report the F-measure of
# these four with Porter stemming (the common choice for BillSum/MEDIQA results).
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_USE_STEMMER = True


def _check_pairs(y_true: Sequence, y_pred: Sequence) -> None:
    if len(y_true) != len(y_pred) or not y_true:
        raise DPrunerError(f"need equally many (>= 1) references and predictions, got {len(y_true)} and {len(y_pred)}")


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    _check_pairs(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def macro_f1(y_true: Sequence, y_pred: Sequence) -> float:
    """sklearn's macro F1 as the original calls it: over the labels present in y_true or y_pred.

    A label that is predicted but never correct (or never predicted) counts with F1 = 0.
    """
    from sklearn.metrics import f1_score

    _check_pairs(y_true, y_pred)
    return float(f1_score(list(y_true), list(y_pred), average="macro", zero_division=0))


def rouge(predictions: Sequence[str], references: Sequence[str]) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Per-example ROUGE F-measures and their means over the examples."""
    from rouge_score import rouge_scorer

    _check_pairs(references, predictions)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=ROUGE_USE_STEMMER)
    per_example = [{name: float(score.fmeasure) for name, score in scorer.score(ref, pred).items()}
                   for pred, ref in zip(predictions, references)]
    means = {name: sum(row[name] for row in per_example) / len(per_example) for name in ROUGE_TYPES}
    return per_example, means
