"""Leak guard: a domain's perplexity text must share no document with its training, calibration or
test text, or the perplexity measures memorisation (issue 10: the medical text used to be the very
PubMedQA abstracts stage 2 trains on).

A perplexity document is shared when it occurs inside any of the other strings (the training strings
are templates around row fields, so equality alone would miss an abstract inside a PubMedQA prompt),
compared exactly and again after whitespace normalisation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dpruner.data.domain import calibration_texts, training_texts
from dpruner.data.eval_sets import ChoiceExample, perplexity_documents, task_set
from dpruner.data.spec import PERPLEXITY, VALIDATION, DomainSpec

# Separates the strings of a stream so that a match cannot span two of them.
SEPARATOR = "\x00"


def normalise(text: str) -> str:
    """Whitespace runs become one space, ends are stripped."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Leak:
    index: int  # position of the perplexity document
    against: str  # which text set holds it
    how: str  # exact | whitespace-normalised

    def __str__(self) -> str:
        return f"perplexity document {self.index} occurs in the {self.against} text ({self.how})"


def shared_documents(documents: Sequence[str], others: Iterable[str], against: str) -> list[Leak]:
    """Every document of `documents` that occurs inside one of `others`, exactly or normalised."""
    others = list(others)
    exact = SEPARATOR.join(others)
    normalised = SEPARATOR.join(normalise(text) for text in others)
    leaks = []
    for index, document in enumerate(documents):
        if document in exact:
            leaks.append(Leak(index, against, "exact"))
        elif normalise(document) in normalised:
            leaks.append(Leak(index, against, "whitespace-normalised"))
    return leaks


def _test_strings(spec: DomainSpec, data_dir: str | os.PathLike | None) -> Iterable[tuple[str, list[str]]]:
    """Every test set's contexts, candidates, prompts and references (sets that need a user file are skipped)."""
    for name, task in spec.tasks.items():
        if not task.source.files:
            continue
        strings: list[str] = []
        for item in task_set(spec, name, data_dir).items:
            if isinstance(item, ChoiceExample):
                strings += [item.context, *item.candidates]
            else:
                strings += [item.prompt, item.reference]
        yield f"test set {name}", strings


def domain_leaks(spec: DomainSpec, data_dir: str | os.PathLike | None = None,
                 documents: Sequence[str] | None = None, text: str = PERPLEXITY) -> list[Leak]:
    """Shared documents between `spec`'s perplexity text `text` (`perplexity` or `validation`; or
    `documents`) and its training, calibration and test text, all read through the same loaders as the
    pipeline. The validation text is also checked against the test perplexity text."""
    if documents is None:
        declared = spec.perplexity_text(text)
        if declared is None:
            return []
        documents = perplexity_documents(declared, data_dir)
    sets = [("training", training_texts(spec, data_dir, quiet=True)),
            ("calibration", calibration_texts(spec, data_dir)), *_test_strings(spec, data_dir)]
    if text == VALIDATION and spec.perplexity is not None:
        sets.append(("test perplexity", perplexity_documents(spec.perplexity, data_dir)))
    return [leak for against, strings in sets for leak in shared_documents(documents, strings, against)]
