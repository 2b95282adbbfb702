"""Domains as data: a YAML file declares where a domain's text comes from and how it is rendered.

`load_domain(name_or_path)` reads `config/domains/<name>.yaml` (legal, medical) or any YAML path and
checks it key by key, so a typo is one line naming the file and the key before any data or model is
read. The data rows are checked when they are read (`rows`, `Template.render`): a row without a
field the spec uses is reported as `file:line`, a placeholder that the rows do not have at all names
the spec and the fields the rows do have. See docs/DOMAINS.md for the schema.
"""

from __future__ import annotations

import difflib
import os
import re
import string
import sysconfig
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpruner.data.files import as_list, data_file, manifest_entries, read_json, read_jsonl_numbered
from dpruner.errors import DPrunerError
from dpruner.paths import REPO_ROOT

DOMAINS_DIR = REPO_ROOT / "config" / "domains"
FORMATS = ("jsonl", "json", "text")
ORDERS = ("file", "spread")  # first N rows in file order | N rows evenly spaced (label-sorted test files)
TASK_TYPES = ("choice", "generation")
# `{stdlib}` in a file path: this interpreter's standard-library folder (examples/domains/python-code.yaml).
PATH_VARIABLES = {"stdlib": sysconfig.get_paths()["stdlib"]}
# The task name of a domain's perplexity text (its other tasks are named in the spec).
PERPLEXITY = "perplexity"
# The task name of its validation perplexity text: held out of training, calibration and test, for
# choosing hyperparameters (issue 10: never on test text).
VALIDATION = "validation"


def shipped_domains() -> tuple[str, ...]:
    """Names of the domains shipped in config/domains/."""
    return tuple(sorted(path.stem for path in DOMAINS_DIR.glob("*.yaml")))


def _check_keys(raw: Any, where: str, required: Sequence[str], optional: Sequence[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise DPrunerError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = (*required, *optional)
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DPrunerError(f"{where}: unknown key {key!r}{hint}; expected {', '.join(known)}")
    missing = [key for key in required if key not in raw]
    if missing:
        raise DPrunerError(f"{where}: missing key(s) {', '.join(missing)}")
    return raw


def _typed(raw: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DPrunerError(f"{where}: {key}={value!r} must be {names}")
    return value


def _count(raw: dict[str, Any], key: str, where: str, default: int | None = None) -> int | None:
    value = _typed(raw, key, int, where, default)
    if value is not None and value < 0:
        raise DPrunerError(f"{where}: {key}={value} must be >= 0 or null")
    return value


def _choice(raw: dict[str, Any], key: str, allowed: Sequence[str], where: str, default: str) -> str:
    value = raw.get(key, default)
    if value not in allowed:
        raise DPrunerError(f"{where}: {key}={value!r}; expected one of {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class Derived:
    """A placeholder computed from a row field: a value map (label -> wording) or a list joined."""

    source: str
    values: Mapping[str, str] | None = None
    join: str | None = None

    def value(self, row: dict[str, Any], where: str) -> str:
        raw = row[self.source]
        if self.join is not None:
            return self.join.join(as_list(raw, f"{where}: {self.source}"))
        key = str(raw)
        if key not in self.values:
            raise DPrunerError(f"{where}: {self.source} {raw!r} is not one of {', '.join(self.values)}")
        return self.values[key]


@dataclass(frozen=True)
class Template:
    """A `str.format` text with `{field}` placeholders, read from the row or `derived` from it."""

    text: str
    derived: Mapping[str, Derived]
    where: str

    @staticmethod
    def parse(text: Any, derived_raw: Any, where: str) -> Template:
        if not isinstance(text, str):
            raise DPrunerError(f"{where}: the template must be a string, got {type(text).__name__}")
        derived = {}
        for name, spec in (derived_raw or {}).items():
            at = f"{where}: fields.{name}"
            spec = _check_keys(spec, at, ("from",), ("map", "join"))
            if ("map" in spec) == ("join" in spec):
                raise DPrunerError(f"{at}: give exactly one of map (value -> text) or join (list separator)")
            values = spec.get("map")
            if values is not None and not isinstance(values, dict):
                raise DPrunerError(f"{at}: map must be a mapping of value -> text")
            derived[name] = Derived(str(spec["from"]), {str(k): str(v) for k, v in values.items()} if values else None,
                                    _typed(spec, "join", str, at))
        template = Template(text, derived, where)
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as err:
            raise DPrunerError(f"{where}: bad template ({err}); write a literal brace as {{{{ or }}}}") from None
        for name in names:
            if not name.isidentifier():
                raise DPrunerError(f"{where}: placeholder {{{name}}} must be a plain field name")
        return template

    def placeholders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(self.text) if name))

    def row_fields(self) -> tuple[str, ...]:
        """The row fields this template reads."""
        return tuple(dict.fromkeys(self.derived[n].source if n in self.derived else n for n in self.placeholders()))

    def render(self, row: dict[str, Any], where: str, non_empty: bool = False) -> str:
        values = {}
        for name in self.placeholders():
            value = self.derived[name].value(row, where) if name in self.derived else row[name]
            if non_empty and (not isinstance(value, str) or not value.strip()):
                raise DPrunerError(f"{where}: {name} must be a non-empty string, got {value!r:.40}")
            values[name] = value
        return self.text.format(**values)


@dataclass(frozen=True)
class Source:
    """Rows from data files: `file` is a manifest name (`casehold_train`), a path relative to the spec's
    folder (or absolute, `{stdlib}/...`), or a list of paths; `file_key` names the stage-2 config key
    that gives the path instead (files users must supply, such as MedNLI)."""

    files: tuple[str, ...]
    format: str
    separator: str | None
    pattern: re.Pattern | None
    order: str
    start: int
    count: int | None
    base: Path
    where: str
    file_key: str | None = None
    missing: str = ""

    @staticmethod
    def parse(raw: dict[str, Any], where: str, base: Path) -> Source:
        files = raw.get("file")
        if files is None and "file_key" not in raw and "missing" not in raw:
            raise DPrunerError(f"{where}: missing key file (a manifest name or a path); a file the user must "
                               "supply needs file_key (stage-2 config key) or missing (what to tell the user)")
        if isinstance(files, str):
            files = [files]
        if files is not None and (not isinstance(files, list) or not files
                                  or not all(isinstance(f, str) for f in files)):
            raise DPrunerError(f"{where}: file must be a name, a path or a non-empty list of paths")
        fmt = _choice(raw, "format", FORMATS, where, "jsonl")
        separator, pattern = _typed(raw, "separator", str, where), _typed(raw, "pattern", str, where)
        if (separator is not None or pattern is not None) and fmt != "text":
            raise DPrunerError(f"{where}: separator and pattern apply to format text only")
        if separator is not None and pattern is not None:
            raise DPrunerError(f"{where}: give separator (split the file) or pattern (one row per match), not both")
        try:
            compiled = re.compile(pattern) if pattern is not None else None
        except re.error as err:
            raise DPrunerError(f"{where}: pattern {pattern!r} is not a regular expression ({err})") from None
        return Source(tuple(files or ()), fmt, separator, compiled, _choice(raw, "order", ORDERS, where, "file"),
                      _count(raw, "start", where, 0), _count(raw, "count", where), base, where,
                      _typed(raw, "file_key", str, where), _typed(raw, "missing", str, where, ""))

    def paths(self, data_dir: str | os.PathLike | None, override: str | os.PathLike | None = None) -> list[Path]:
        if override is not None:
            return [Path(override).expanduser().resolve()]
        if not self.files:
            raise DPrunerError(f"{self.where}: no file given; {self.missing or 'pass its path'}")
        names = manifest_entries()
        paths = []
        for name in self.files:
            if name in names:
                paths.append(data_file(name, data_dir))
                continue
            try:
                path = Path(name.format(**PATH_VARIABLES)).expanduser()
            except (KeyError, IndexError, ValueError):
                raise DPrunerError(f"{self.where}: file {name!r}: unknown variable; known: "
                                   f"{', '.join('{' + k + '}' for k in PATH_VARIABLES)}") from None
            path = path if path.is_absolute() else self.base / path
            if not path.is_file():
                raise DPrunerError(f"{self.where}: file {path} not found (a manifest name or a path is expected)")
            paths.append(path.resolve())
        return paths

    def _read(self, path: Path, limit: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
        if self.format == "jsonl":
            yield from read_jsonl_numbered(path, limit=limit)
        elif self.format == "json":
            data = read_json(path)
            if isinstance(data, dict):
                yield from ((f"{path}: entry {key}", entry) for key, entry in data.items())
            elif isinstance(data, list):
                yield from ((f"{path}: item {i}", entry) for i, entry in enumerate(data))
            else:
                raise DPrunerError(f"{path}: expected a JSON object (id -> row) or a list of rows")
        elif self.pattern is not None:  # one row per match: its named groups, `text` and `file`
            text = path.read_text(encoding="utf-8")
            for match in self.pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                yield f"{path}:{line}", {**match.groupdict(), "text": match.group(0), "file": path.name}
        else:
            text = path.read_text(encoding="utf-8")
            chunks = text.split(self.separator) if self.separator else [text]
            line = 1
            for chunk in chunks:
                body = chunk.strip("\n")
                if body.strip():
                    offset = len(chunk) - len(chunk.lstrip("\n"))
                    yield f"{path}:{line + offset}", {"text": body, "file": path.name}
                line += chunk.count("\n") + (self.separator.count("\n") if self.separator else 0)

    def select(self, items: Sequence[Any], count: int | None) -> list[Any]:
        """`count` of `items` by `order`: the first ones, or evenly spaced (None = all)."""
        if count is None or count >= len(items):
            return list(items)
        return list(items[:count]) if self.order == "file" else [items[i * len(items) // count] for i in range(count)]

    def rows(self, data_dir: str | os.PathLike | None, fields: Sequence[str], count: int | None = None,
             override: str | os.PathLike | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The selected rows, each with its `file:line`; every row must have every field in `fields`."""
        count = self.count if count is None else count
        limit = None if count is None or self.order == "spread" else self.start + count
        rows: list[tuple[str, dict[str, Any]]] = []
        for path in self.paths(data_dir, override):
            rows.extend(self._read(path, None if limit is None else limit - len(rows)))
            if limit is not None and len(rows) >= limit:
                break
        if not rows:
            raise DPrunerError(f"{self.where}: {', '.join(map(str, self.paths(data_dir, override)))} give no rows")
        rows = self.select(rows[self.start:], count)
        for index, (where, row) in enumerate(rows):
            if not isinstance(row, dict):
                raise DPrunerError(f"{where}: expected an object of fields, got {type(row).__name__}")
            missing = [name for name in fields if name not in row]
            if missing and index == 0:
                raise DPrunerError(f"{self.where}: field(s) {', '.join(missing)} are not in the rows of "
                                   f"{where.split(': entry')[0]} (its first row has: {', '.join(map(str, row))})")
            if missing:
                raise DPrunerError(f"{where}: missing field(s) {', '.join(missing)} (needed by {self.where})")
        return rows


@dataclass(frozen=True)
class TrainingSource:
    """One stage-2 source: rows rendered by `template`; `count_key` is the stage-2 config key that
    overrides `count` (casehold_examples, ...)."""

    name: str
    source: Source
    template: Template
    count_key: str | None = None


@dataclass(frozen=True)
class Perplexity:
    """The domain perplexity text: `field` of each row (a list field is joined by `join`), the rows
    joined by `joiner`, scored in `window`-token windows every `stride` tokens."""

    name: str
    source: Source
    field: str
    join: str | None
    joiner: str
    window: int
    stride: int
    title: str


@dataclass(frozen=True)
class Task:
    """A test set: multiple choice (context + candidates, label field) or generation (prompt + reference)."""

    name: str
    type: str
    source: Source
    prompt: Template  # the choice context or the generation prompt
    title: str
    label: str | None = None
    labels: tuple[str, ...] = ()
    candidates: tuple[str, ...] = ()  # literal candidates (PubMedQA: yes / no / maybe) ...
    candidate_fields: tuple[str, ...] = ()  # ... or one row field per candidate (CaseHOLD holdings)
    candidate_template: str = "{candidate}"
    answer_field: str | None = None  # ... or this row's answer among `distractors` answers of other rows
    distractors: int = 0
    reference: str | None = None
    id: str | None = None

    def row_fields(self) -> tuple[str, ...]:
        extra = (self.label, self.reference, self.answer_field, *self.candidate_fields)
        return tuple(dict.fromkeys((*self.prompt.row_fields(), *(f for f in extra if f))))


@dataclass(frozen=True)
class DomainSpec:
    """A validated domain. `calibration` None means: the training strings (the original's choice)."""

    name: str
    path: Path
    training: tuple[TrainingSource, ...]
    seed: int
    shuffle: bool
    perplexity: Perplexity | None
    tasks: Mapping[str, Task] = field(default_factory=dict)
    calibration: tuple[TrainingSource, ...] | None = None
    validation: Perplexity | None = None

    def perplexity_text(self, task: str) -> Perplexity | None:
        """The test (`perplexity`) or validation (`validation`) perplexity text; None when not declared."""
        return {PERPLEXITY: self.perplexity, VALIDATION: self.validation}.get(task)

    def task_names(self, available_only: bool = False) -> tuple[str, ...]:
        """`perplexity` (when declared) and the tasks; `available_only` leaves out tasks whose file the
        user must supply (MedNLI)."""
        tasks = tuple(n for n, t in self.tasks.items() if t.source.files or not available_only)
        return ((PERPLEXITY,) if self.perplexity else ()) + tasks

    def result_name(self, task: str) -> str:
        """Result file name of a task: `<domain>_perplexity` for the perplexity text (legal_perplexity, as
        the original's script is named), else the task's name (casehold)."""
        if task == VALIDATION:
            return f"{self.name}_{VALIDATION}_{PERPLEXITY}"
        return f"{self.name}_{PERPLEXITY}" if task == PERPLEXITY else task


def _training_sources(raw: Any, where: str, base: Path) -> tuple[TrainingSource, ...]:
    if not isinstance(raw, list) or not raw:
        raise DPrunerError(f"{where}: expected a non-empty list of sources")
    sources = []
    for index, item in enumerate(raw):
        at = f"{where}[{index}]"
        item = _check_keys(item, at, ("name", "template"),
                           ("file", "file_key", "missing", "format", "separator", "pattern", "order", "start",
                            "count", "count_key", "fields"))
        sources.append(TrainingSource(str(item["name"]), Source.parse(item, at, base),
                                      Template.parse(item["template"], item.get("fields"), f"{at}: template"),
                                      _typed(item, "count_key", str, at)))
    return tuple(sources)


def _perplexity(raw: Any, where: str, base: Path) -> Perplexity:
    raw = _check_keys(raw, where, ("name", "file", "field"),
                      ("format", "separator", "pattern", "order", "start", "count", "join", "joiner", "window",
                       "stride", "title"))
    window, stride = _count(raw, "window", where, 2048), _count(raw, "stride", where, 512)
    if not window or not stride or stride > window:
        raise DPrunerError(f"{where}: need 1 <= stride <= window, got window {window}, stride {stride}")
    return Perplexity(str(raw["name"]), Source.parse(raw, where, base), str(raw["field"]),
                      _typed(raw, "join", str, where), _typed(raw, "joiner", str, where, "\n\n"), window, stride,
                      _typed(raw, "title", str, where, "ppl"))


def _task(name: str, raw: Any, where: str, base: Path) -> Task:
    kind = raw.get("type") if isinstance(raw, dict) else None
    common = ("type", "file", "file_key", "missing", "format", "separator", "pattern", "order", "start", "count", "id",
              "title", "fields")
    if kind == "choice" and "answer_field" in raw:
        return _generated_choice(name, raw, where, base, common)
    if kind == "choice":
        raw = _check_keys(raw, where, ("context", "label"),
                          (*common, "candidates", "candidate_fields", "candidate_template", "labels"))
        literal, from_fields = raw.get("candidates"), raw.get("candidate_fields")
        if (literal is None) == (from_fields is None):
            raise DPrunerError(f"{where}: give exactly one of candidates (a list), candidate_fields, or "
                               "answer_field (+ distractors)")
        options = literal if literal is not None else from_fields
        if not isinstance(options, list) or len(options) < 2:
            raise DPrunerError(f"{where}: {'candidates' if literal else 'candidate_fields'} must list >= 2 entries")
        labels = raw.get("labels", literal)
        if not isinstance(labels, list) or len(labels) != len(options):
            raise DPrunerError(f"{where}: labels must list one label value per candidate ({len(options)})")
        candidate_template = _typed(raw, "candidate_template", str, where, "{candidate}")
        if "{candidate}" not in candidate_template:
            raise DPrunerError(f"{where}: candidate_template {candidate_template!r} has no {{candidate}} placeholder")
        return Task(name, kind, Source.parse(raw, where, base),
                    Template.parse(raw["context"], raw.get("fields"), f"{where}: context"),
                    _typed(raw, "title", str, where, name), str(raw["label"]), tuple(map(str, labels)),
                    tuple(map(str, literal or ())), tuple(map(str, from_fields or ())), candidate_template,
                    id=_typed(raw, "id", str, where))
    if kind == "generation":
        raw = _check_keys(raw, where, ("prompt", "reference"), common)
        return Task(name, kind, Source.parse(raw, where, base),
                    Template.parse(raw["prompt"], raw.get("fields"), f"{where}: prompt"),
                    _typed(raw, "title", str, where, name), reference=str(raw["reference"]),
                    id=_typed(raw, "id", str, where))
    raise DPrunerError(f"{where}: type={kind!r}; expected one of {', '.join(TASK_TYPES)}")


def _generated_choice(name: str, raw: dict[str, Any], where: str, base: Path, common: Sequence[str]) -> Task:
    """A multiple-choice task built from (question, answer) rows: each row's answer against the answers of
    the next `distractors` rows, the gold answer at position row index mod (distractors + 1)."""
    raw = _check_keys(raw, where, ("context", "answer_field", "distractors"), (*common, "candidate_template"))
    distractors = _count(raw, "distractors", where)
    if not distractors:
        raise DPrunerError(f"{where}: distractors must be >= 1")
    candidate_template = _typed(raw, "candidate_template", str, where, "{candidate}")
    return Task(name, "choice", Source.parse(raw, where, base),
                Template.parse(raw["context"], raw.get("fields"), f"{where}: context"),
                _typed(raw, "title", str, where, name), labels=tuple(str(i) for i in range(distractors + 1)),
                candidate_template=candidate_template, answer_field=str(raw["answer_field"]),
                distractors=distractors, id=_typed(raw, "id", str, where))


def domain_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped domain name (legal, medical) or a YAML path (relative to the current directory)."""
    text = str(name_or_path)
    if text in shipped_domains():
        return DOMAINS_DIR / f"{text}.yaml"
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path.resolve()
    raise DPrunerError(f"domain {text!r} is neither a shipped domain ({', '.join(shipped_domains())}) "
                       "nor an existing .yaml file")


def load_domain(name_or_path: str | os.PathLike) -> DomainSpec:
    """The validated spec of a shipped domain name or a domain YAML path (the one entry point)."""
    path = domain_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise DPrunerError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    raw = _check_keys(raw, str(path), ("name", "training"),
                      ("description", "seed", "shuffle", "calibration", "perplexity", "validation", "tasks"))
    base, where = path.parent, str(path)
    tasks_raw = raw.get("tasks") or {}
    if not isinstance(tasks_raw, dict):
        raise DPrunerError(f"{where}: tasks must be a mapping of task name -> task")
    for name in tasks_raw:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise DPrunerError(f"{where}: task name {name!r} must be letters, digits, _ . - (it names result files)")
        if name in (PERPLEXITY, VALIDATION):
            raise DPrunerError(f"{where}: task name {name!r} is reserved for the domain's perplexity texts")
    calibration = raw.get("calibration")
    return DomainSpec(
        name=str(raw["name"]), path=path,
        training=_training_sources(raw["training"], f"{where}: training", base),
        seed=_typed(raw, "seed", int, where, 0), shuffle=_typed(raw, "shuffle", bool, where, True),
        perplexity=_perplexity(raw["perplexity"], f"{where}: perplexity", base) if raw.get("perplexity") else None,
        tasks={str(n): _task(str(n), t, f"{where}: tasks.{n}", base) for n, t in tasks_raw.items()},
        calibration=None if calibration is None else _training_sources(calibration, f"{where}: calibration", base),
        validation=_perplexity(raw["validation"], f"{where}: validation", base) if raw.get("validation") else None)
