"""lm-evaluation-harness on our local task YAMLs: its numbers equal our evaluator's under the same rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import error_line, run_cli
from dpruner.data import eval_sets
from dpruner.errors import DPrunerError
from dpruner.evaluation import lm_eval_bridge
from dpruner.evaluation.choice import first_argmax, score_choices
from dpruner.models import load_model, load_tokenizer

ROWS = 3  # CaseHOLD rows: 15 candidates, enough to compare every log-likelihood


def test_lm_eval_equals_our_evaluator_on_casehold_local(embedded_model):
    tokenizer = load_tokenizer(str(embedded_model))
    model = load_model(str(embedded_model), dtype="float32", device="cpu")
    # Same tokenization on both sides: lm-eval adds special tokens as the tokenizer does; ours adds none.
    assert tokenizer("holding").input_ids == tokenizer("holding", add_special_tokens=False).input_ids
    with lm_eval_bridge.local_task_dir() as include:
        manager = lm_eval_bridge.task_manager(include, ["casehold_local"])
        result = lm_eval_bridge.run_lm_eval(model, tokenizer, ["casehold_local"], manager, limit=ROWS, batch_size=4,
                                            log_samples=True)
    samples = sorted(result["samples"]["casehold_local"], key=lambda s: s["doc_id"])
    theirs = [[ll for ll, _ in sample["filtered_resps"]] for sample in samples]

    examples = eval_sets.casehold(limit=ROWS).items
    ours = score_choices(model, tokenizer, examples, batch_size=5, progress=False)
    np.testing.assert_allclose(np.asarray(ours.summed()), np.asarray(theirs), rtol=1e-4, atol=1e-3)
    labels = [example.label for example in examples]
    assert [sample["target"] for sample in samples] == labels
    # acc: argmax of the summed log-probability; acc_norm: divided by the choice's characters (no delimiter).
    acc = np.mean([first_argmax(row) == label for row, label in zip(ours.summed(), labels)])
    acc_norm = np.mean([first_argmax([ll / len(c.removeprefix(" ")) for ll, c in zip(row, e.candidates)]) == e.label
                        for row, e in zip(ours.summed(), examples)])
    assert result["results"]["casehold_local"]["acc,none"] == pytest.approx(acc)
    assert result["results"]["casehold_local"]["acc_norm,none"] == pytest.approx(acc_norm)


@pytest.mark.parametrize("task,load", [("casehold_local", eval_sets.casehold), ("pubmedqa_local", eval_sets.pubmedqa)])
def test_local_task_prompts_are_our_evaluators_prompts(task, load):
    """Every row: lm-eval's context, delimiter + choices and target are our ChoiceExample's."""
    from lm_eval.tasks import get_task_dict

    with lm_eval_bridge.local_task_dir() as include:
        loaded = get_task_dict([task], lm_eval_bridge.task_manager(include, [task]))[task]
        docs = list(loaded.test_docs())
    examples = load(limit=None).items
    assert len(docs) == len(examples)
    delimiter = loaded.config.target_delimiter
    for doc, example in zip(docs, examples):
        assert loaded.doc_to_text(doc) == example.context
        assert tuple(delimiter + choice for choice in loaded.doc_to_choice(doc)) == example.candidates
        assert loaded.doc_to_target(doc) == example.label


def test_local_tasks_follow_the_data_root(tmp_path):
    root = tmp_path / "data"
    for name in ("legal/casehold_test.txt", "medical/pubMedQA_test.jsonl"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lm_eval_bridge.PREPARED_DATA_DIR / name, root / name)
    with lm_eval_bridge.local_task_dir(str(root)) as include:
        written = {path.name: path.read_text() for path in include.glob("*.yaml")}
    assert set(written) == {path.name for path in lm_eval_bridge.local_tasks().values()}
    assert all(str(root) in text for text in written.values())
    (root / "legal/casehold_test.txt").unlink()
    with pytest.raises(DPrunerError, match="casehold_local: test data .* is missing"):
        with lm_eval_bridge.local_task_dir(str(root)):
            pass


def test_cli_runs_a_local_task_and_rejects_unknown_ones(tiny_llama_dir, tmp_path):
    out = tmp_path / "result.json"
    done = run_cli("evaluate_lm_eval.py", tiny_llama_dir, tiny_llama_dir, "--tasks", "pubmedqa_local",
                   "--limit", "2", "--out", out, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["results"]["pubmedqa_local"]["sample_len"] == 2
    assert 0.0 <= record["results"]["pubmedqa_local"]["acc,none"] <= 1.0
    bad = run_cli("evaluate_lm_eval.py", tiny_llama_dir, tiny_llama_dir, "--tasks", "casehold_local,nosuch_task")
    assert "nosuch_task" in error_line(bad)
