"""Domains as data: the shipped specs reproduce the original strings byte for byte, a bad spec is one
line before any model loads, and no perplexity text shares a document with training, calibration or
test text (the leak guard, with a deliberately leaked set it must catch)."""

from __future__ import annotations

import ast
import json
import random
import re
from pathlib import Path

import pytest

from conftest import REPO, error_line, run_cli
from dpruner.config import TrainConfig
from dpruner.data import eval_sets
from dpruner.data.domain import calibration_texts, domain_texts
from dpruner.data.files import data_file, read_json, read_jsonl
from dpruner.data.leaks import domain_leaks, shared_documents
from dpruner.data.spec import load_domain, shipped_domains
from dpruner.errors import DPrunerError

PYTHON_CODE = REPO / "examples" / "domains" / "python-code.yaml"

# --- an independent reference: the original train_lomo.py's templates, written out by hand ----------
ORDINALS = ("first", "second", "third", "fourth", "fifth")
PUBMEDQA_TRAILING = {
    "yes": "the phenomenon mentioned by the question is confirmed by the abstract.",
    "no": "we do not support the phenomenon mentioned by the question based on the abstract.",
    "maybe": "we are uncertain whether the phenomenon mentioned by the question is supported by the abstract.",
}
MEDNLI_TRAILING = {"entailment": "the hypothesis is true given the premise.",
                   "contradiction": "the hypothesis is false given the premise.",
                   "neutral": "the hypothesis is undetermined given the premise."}


def _contexts(value) -> str:
    return " ".join(value if isinstance(value, list) else ast.literal_eval(value))


def reference_casehold(row: dict) -> str:
    return (f"A citing text consisting of the context and legal citation text is '{row['citing_prompt']}'. "
            f"Hold statement 0 is '{row['holding_0']}', holding statement 1 is '{row['holding_1']}', holding "
            f"statement 2 is '{row['holding_2']}', holding statement 3 is '{row['holding_3']}, and holding statement "
            f"4 is '{row['holding_4']}'. Choose the correct corresponding holding statement. The correct answer is "
            f"holding statement {row['label']}, which is the {ORDINALS[int(row['label'])]} statement.")


def reference_pubmedqa(row: dict, that: str = "that ") -> str:
    answer = row["final_decision"]
    return (f"The abstract of a biomedical research article is '{_contexts(row['CONTEXTS'])}'. Here comes a question "
            f"'{row['QUESTION']}', and please answer the question with 'yes', 'no', or 'maybe'. The answer is "
            f"'{answer}', which indicates {that}{PUBMEDQA_TRAILING[answer]}")


def reference_texts(domain: str, pqaa: dict | None = None, mednli: list | None = None) -> list[str]:
    if domain == "legal":
        texts = [reference_casehold(r) for r in read_jsonl(data_file("casehold_train"), limit=500)]
        texts += [f"A bill text is '{r['source']}'. The summary of the bill is '{r['summary']}'."
                  for r in read_jsonl(data_file("billsum_train_standin"))[:500]]
    else:
        texts = [reference_pubmedqa(r) for r in read_jsonl(data_file("pubmedqa_train"))]
        texts += [reference_pubmedqa(r, that="") for r in list((pqaa or {}).values())[:150]]
        texts += [f"Premise is '{r['sentence1']}', and hypothesis is '{r['sentence2']}'. Their relationship is "
                  f"'{r['gold_label']}', and this means {MEDNLI_TRAILING[r['gold_label']]}" for r in (mednli or [])[:200]]
        texts += [f"A question posted by a patient is '{r['CHQ']}'. The summary of the question is '{r['Summary']}'."
                  for r in read_jsonl(data_file("hqs_train"), limit=200)]
    random.Random(42).shuffle(texts)
    return texts


def test_shipped_specs_reproduce_the_original_training_strings_byte_for_byte():
    for domain in ("legal", "medical"):
        expected = reference_texts(domain)
        assert domain_texts(TrainConfig(domain=domain)) == expected
        assert calibration_texts(load_domain(domain)) == expected  # calibration = the training strings


def test_user_supplied_medical_sources_render_as_the_original(tmp_path):
    pqal = read_json(data_file("pubmedqa_pqal"))
    pqaa = dict(list(pqal.items())[:3])  # PQA-A has the ori_pqal.json layout
    (tmp_path / "ori_pqaa.json").write_text(json.dumps(pqaa))
    mednli = [{"sentence1": f"P{i}.", "sentence2": f"H{i}.", "gold_label": label}
              for i, label in enumerate(MEDNLI_TRAILING)]
    (tmp_path / "mli.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mednli))
    config = TrainConfig(domain="medical", pubmedqa_artificial_file=str(tmp_path / "ori_pqaa.json"),
                         mednli_file=str(tmp_path / "mli.jsonl"))
    assert domain_texts(config) == reference_texts("medical", pqaa, mednli)


def test_shipped_test_prompts_are_the_original_templates():
    casehold = eval_sets.casehold().items[0]
    row = read_jsonl(data_file("casehold_test"), limit=1)[0]
    assert casehold.context == f"A citing text is '{row['citing_prompt']}'. The correct holding statement is"
    assert casehold.candidates == tuple(" " + row[f"holding_{i}"] for i in range(5))
    bill = read_jsonl(data_file("billsum_test"), limit=1)[0]
    assert eval_sets.billsum(limit=1).items[0].prompt == f"A bill text is '{bill['source']}'. The summary of the bill is '"
    legal = eval_sets.multilegalpile().items[0]
    assert legal.text == "\n\n".join(r["text"] for r in read_jsonl(data_file("multilegalpile")))


# --- the leak guard ------------------------------------------------------------------------------------

@pytest.mark.parametrize("domain", [*shipped_domains(), str(PYTHON_CODE)])
def test_perplexity_text_shares_no_document_with_training_calibration_or_test(domain):
    spec = load_domain(domain)
    assert spec.perplexity is not None
    assert domain_leaks(spec) == []


@pytest.mark.parametrize("domain", shipped_domains())
def test_validation_text_shares_no_document_with_any_other_text(domain):
    spec = load_domain(domain)
    assert spec.validation is not None
    assert len(eval_sets.task_set(spec, "validation").items[0].text.split("\n\n")) == spec.validation.source.count
    assert domain_leaks(spec, text="validation") == []


def test_leak_guard_catches_a_validation_text_that_overlaps_the_test_text():
    spec = load_domain("medical")
    test_documents = eval_sets.medical_text().items[0].text.split("\n\n")
    leaks = domain_leaks(spec, documents=test_documents[:3], text="validation")
    assert {(leak.index, leak.against) for leak in leaks} == {(i, "test perplexity") for i in range(3)}


def test_leak_guard_catches_a_leaked_set_exactly_and_after_whitespace_changes():
    spec = load_domain("medical")
    # The old default medical text: the abstracts of the PubMedQA rows stage 2 trains on.
    leaked = [_contexts(r["CONTEXTS"]) for r in read_jsonl(data_file("pubmedqa_train"), limit=5)]
    leaks = domain_leaks(spec, documents=leaked)
    assert {(leak.index, leak.against, leak.how) for leak in leaks} >= {(i, "training", "exact") for i in range(5)}
    assert {leak.against for leak in leaks} == {"training", "calibration"}
    respaced = [text.replace(" ", "\n  ", 3) for text in leaked]
    assert {leak.how for leak in domain_leaks(spec, documents=respaced)} == {"whitespace-normalised"}
    clean = eval_sets.medical_text().items[0].text.split("\n\n")[:5]
    assert shared_documents(clean, [*leaked, "unrelated"], "x") == []


# --- validation: one line naming the file, the key or the row ------------------------------------------

def write_spec(folder: Path, training: str, rows: list[dict] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [{"q": "a?", "a": "b"}, {"q": "c?", "a": "d"}]
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "toy.yaml"
    path.write_text(f"name: toy\ntraining:\n  - name: qa\n    file: rows.jsonl\n{training}")
    return path


TEMPLATE = "    template: 'Q: {q} A: {a}'\n"
BAD_SPECS = {
    "typo_key": (TEMPLATE + "    cuont: 3\n", None, "unknown key 'cuont' (did you mean 'count'?)"),
    "missing_field": (TEMPLATE, [{"q": "a?", "a": "b"}, {"q": "c?"}], "rows.jsonl:2: missing field(s) a"),
    "unknown_placeholder": ("    template: 'Q: {question} A: {a}'\n", None,
                            "field(s) question are not in the rows of"),
    "reserved_task_name": (TEMPLATE + "tasks:\n  validation: {type: choice}\n", None,
                           "task name 'validation' is reserved"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_line(case, tmp_path):
    training, rows, message = BAD_SPECS[case]
    path = write_spec(tmp_path, training, rows)
    with pytest.raises(DPrunerError) as info:
        calibration_texts(load_domain(path))
    assert message in str(info.value) and "\n" not in str(info.value) and str(path.parent) in str(info.value)


def test_good_user_spec_renders_its_rows(tmp_path):
    spec = load_domain(write_spec(tmp_path, TEMPLATE + "    count: 1\nshuffle: false\n"))
    assert calibration_texts(spec) == ["Q: a? A: b"]


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_fails_the_cli_before_the_model_loads(case, tmp_path):
    training, rows, message = BAD_SPECS[case]
    path = write_spec(tmp_path, training, rows)
    out = tmp_path / "out"
    # A model path that does not exist: the spec must fail first.
    result = run_cli("prune_baseline.py", "wanda", str(tmp_path / "no-model"), str(out), "--calibration", str(path))
    assert result.returncode == 2 and message in error_line(result)
    assert not out.exists()


def test_generated_choice_puts_each_answer_among_other_rows_answers(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i % 5}"} for i in range(8)]  # a0 repeats: not a distractor of itself
    path = write_spec(tmp_path, TEMPLATE.replace("{q}", "{question}").replace("{a}", "{answer}"), rows)
    path.write_text(path.read_text() + "tasks:\n  pick:\n    type: choice\n    file: rows.jsonl\n"
                    "    context: '{question}:'\n    answer_field: answer\n    distractors: 2\n")
    items = eval_sets.task_set(load_domain(path), "pick").items
    for index, item in enumerate(items):
        assert item.label == index % 3 and item.candidates[item.label] == rows[index]["answer"]
        assert len(set(item.candidates)) == 3 and item.context == f"q{index}:"
    assert eval_sets.task_set(load_domain(path), "pick", limit=2).items == items[:2]  # --limit keeps the questions


def test_custom_domain_table_has_a_column_set_per_task():
    from dpruner.tables import build_table

    results = {"dense": {"python-code_perplexity": {"metrics": {"stdlib_holdout": {"ppl_window_mean": 4.0,
                                                                                     "ppl_token_weighted": 3.0}}},
                         "function_body": {"metrics": {"accuracy": 0.5, "macro_f1": 0.25}}}}
    table = build_table(results, str(PYTHON_CODE))
    assert [c.title for c in table.columns] == ["Code ppl", "Code ppl (token-weighted)",
                                             "Function body acc", "Function body F1"]
    assert table.value("dense", table.columns[2]) == 0.5


def load_cli(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", REPO / "code" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("script,argv", [
    ("src/train_lomo.py", [str(REPO / "config/args_lomo.yaml"), "model_name_or_path=/no/model", "domain={spec}"]),
    ("domain_evaluation.py", ["/no/model", "/no/model", "--domain", "{spec}", "--task", "perplexity"]),
    ("general.py", ["/no/model", "{spec}"]),
])
def test_every_domain_cli_stops_on_a_bad_spec_with_exit_2(script, argv, tmp_path, capsys):
    from dpruner import cli

    path = write_spec(tmp_path, BAD_SPECS["typo_key"][0])
    with pytest.raises(SystemExit) as info:
        cli.run(load_cli(script), [a.replace("{spec}", str(path)) for a in argv])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and line.startswith("error: ") and "unknown key 'cuont'" in line


def test_no_library_code_branches_on_a_domain_name():
    """Domains are data: nothing in the library or the CLIs compares against a domain's name."""
    branch = re.compile(r"""(==|!=)\s*["'](legal|medical)["']|["'](legal|medical)["']\s*(==|!=)|\bdomain(?:_name)?\s*(==|!=)\s*["']""")  # not domain_mixing
    hits = [f"{path.relative_to(REPO)}:{n}" for path in sorted((REPO / "code").rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert hits == []
