"""Stage 4 evaluators against hand computations: windows, perplexity, choice scoring, metrics, data sets."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from dpruner.data import eval_sets
from dpruner.data.files import manifest_entries
from dpruner.errors import DPrunerError
from dpruner.evaluation.choice import first_argmax, score_choices
from dpruner.evaluation.generation import DecodingSettings, _stop_at_newline, first_line, newline_token_ids
from dpruner.evaluation.metrics import accuracy, macro_f1, rouge
from dpruner.evaluation.perplexity import sliding_windows, window_perplexity


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_llama(seed=1)


@pytest.fixture(scope="module")
def tokenizer(embedded_model):
    from dpruner.models import load_tokenizer

    return load_tokenizer(str(embedded_model))


def make_data_dir(root: Path, files: dict[str, list[str]]) -> Path:
    """A data root holding the given manifest files (as raw lines), at their manifest paths."""
    for name, lines in files.items():
        path = root / manifest_entries()[name]["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
    return root


def casehold_row(label="2", **overrides) -> str:
    row = {"example_id": 7, "citing_prompt": "the court held", "label": label,
           **{f"holding_{i}": f"holding number {i}" for i in range(5)}}
    row.update(overrides)
    return json.dumps(row)


# --- windows and perplexity -------------------------------------------------------------------------

@pytest.mark.parametrize("n,length,stride", [(100, 32, 16), (100, 32, 31), (33, 32, 8), (5, 32, 16), (97, 20, 7)])
def test_sliding_windows_score_every_predictable_token_once(n, length, stride):
    windows = sliding_windows(n, length, stride)
    scored = [t for w in windows for t in range(w.end - w.scored, w.end)]
    assert scored == list(range(1, n))  # token 0 has no context; the rest once each, in order
    assert all(w.length <= length and w.scored < w.length for w in windows)
    assert windows[-1].end == n


def test_full_windows_are_sparsegpt_samples():
    windows = sliding_windows(100, 32, 32, full_only=True)
    assert [(w.begin, w.end, w.scored) for w in windows] == [(0, 32, 31), (32, 64, 31), (64, 96, 31)]
    with pytest.raises(DPrunerError, match="fewer than one window"):
        sliding_windows(20, 32, 32, full_only=True)


def test_bad_window_settings_are_errors():
    with pytest.raises(DPrunerError, match="stride"):
        sliding_windows(100, 32, 64)
    with pytest.raises(DPrunerError, match="at least 2"):
        sliding_windows(1, 32, 16)


def hand_window_losses(model, ids, max_length, stride):
    """The original's loop, literally: HF recipe labels, model-computed loss, and our explicit NLLs."""
    losses, nll_sums, counts, hf_losses = [], [], [], []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(window, labels=labels)
        log_probs = torch.log_softmax(out.logits[0].double(), dim=-1)
        nll = [-float(log_probs[t - 1, labels[0, t]]) for t in range(1, window.shape[1]) if labels[0, t] != -100]
        losses.append(sum(nll) / len(nll))
        nll_sums.append(sum(nll))
        counts.append(len(nll))
        hf_losses.append(float(out.loss))
        prev_end = end
        if end == len(ids):
            break
    return losses, nll_sums, counts, hf_losses


def test_perplexity_matches_hand_computation_and_batching(tiny):
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.config.vocab_size, (100,))
    losses, nll_sums, counts, hf_losses = hand_window_losses(tiny, ids, 32, 16)
    assert losses == pytest.approx(hf_losses, rel=1e-5)  # our explicit NLL is the recipe's outputs.loss
    windows = sliding_windows(len(ids), 32, 16)
    one = window_perplexity(tiny, ids, windows, batch_size=1, progress=False)
    four = window_perplexity(tiny, ids, windows, batch_size=4, progress=False)
    for result in (one, four):
        assert result.window_losses == pytest.approx(losses, rel=1e-5)
        assert result.window_tokens == counts
        assert result.ppl_window_mean == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
        assert result.ppl_token_weighted == pytest.approx(math.exp(sum(nll_sums) / sum(counts)), rel=1e-5)
    assert four.window_losses == pytest.approx(one.window_losses, rel=1e-6)
    # the short last window makes the two averages differ
    assert one.ppl_window_mean != pytest.approx(one.ppl_token_weighted, rel=1e-9)


def test_nonoverlapping_perplexity_is_sparsegpt_loop(tiny):
    torch.manual_seed(1)
    ids = torch.randint(0, tiny.config.vocab_size, (100,))
    seqlen = 32
    nlls = []
    for i in range(len(ids) // seqlen):  # SparseGPT's llama_eval: shifted CE per window, exp(mean)
        window = ids[i * seqlen:(i + 1) * seqlen][None]
        with torch.no_grad():
            logits = tiny(window).logits.float()
        nlls.append(float(nn.functional.cross_entropy(logits[0, :-1], window[0, 1:])))
    result = window_perplexity(tiny, ids, sliding_windows(len(ids), seqlen, seqlen, full_only=True), 2, progress=False)
    assert result.ppl_window_mean == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)
    assert result.ppl_token_weighted == pytest.approx(result.ppl_window_mean, rel=1e-9)


# --- multiple choice --------------------------------------------------------------------------------

CHOICE_EXAMPLES = [
    eval_sets.ChoiceExample("a", "A citing text is 'the court held'. The correct holding statement is",
                            (" holding that the statute applies", " no", " holding that a contract is void here"), 1),
    eval_sets.ChoiceExample("b", "The answer is '", ("yes", "no", "maybe"), 2),
]


def hand_choice_scores(model, tokenizer, example):
    context = tokenizer(example.context, add_special_tokens=False).input_ids
    scores = []
    for candidate in example.candidates:
        joint = tokenizer(example.context + candidate, add_special_tokens=False).input_ids
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([joint])).logits[0].double(), dim=-1)
        picked = [float(log_probs[t - 1, joint[t]]) for t in range(len(context), len(joint))]
        scores.append(sum(picked) / len(picked))
    return scores


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_choice_scores_match_explicit_log_softmax(tiny, tokenizer, batch_size):
    result = score_choices(tiny, tokenizer, CHOICE_EXAMPLES, batch_size=batch_size, progress=False)
    for example, row in zip(CHOICE_EXAMPLES, result.scores):
        assert row == pytest.approx(hand_choice_scores(tiny, tokenizer, example), abs=1e-4)
    assert result.prefix_mismatches == 0 and result.truncated == 0


def test_choice_truncation_keeps_candidates(tiny, tokenizer):
    result = score_choices(tiny, tokenizer, CHOICE_EXAMPLES[:1], max_length=12, progress=False)
    assert result.truncated == 1 and len(result.scores[0]) == 3
    with pytest.raises(DPrunerError, match="longer than --max-length"):
        score_choices(tiny, tokenizer, CHOICE_EXAMPLES[:1], max_length=3, progress=False)


class FavouriteTokenLM(nn.Module):
    """A stand-in LM that always puts almost all probability on one token."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.vocab, self.favourite = vocab, favourite

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, cache=None, use_cache=False):
        width = logits_to_keep.shape[1] if isinstance(logits_to_keep, torch.Tensor) else input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], width, self.vocab)
        logits[..., self.favourite] = 40.0
        return SimpleNamespace(logits=logits, cache=None)


def test_choice_picks_the_certain_candidate_and_ties_go_first(tokenizer):
    favourite = tokenizer(" yes", add_special_tokens=False).input_ids
    assert len(favourite) == 1
    model = FavouriteTokenLM(len(tokenizer), favourite[0])
    example = eval_sets.ChoiceExample("x", "Is it? The answer is", (" no", " maybe", " yes", " perhaps"), 2)
    result = score_choices(model, tokenizer, [example], progress=False)
    assert result.predictions == [2]
    assert result.scores[0][2] == pytest.approx(0.0, abs=1e-6)
    assert first_argmax([1.0, 3.0, 3.0, 2.0]) == 1
    assert first_argmax([0.5, 0.5]) == 0


# --- metrics ----------------------------------------------------------------------------------------

def test_accuracy_and_macro_f1_against_hand_confusion():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    # class 0: P=1/2 R=1/2 F=1/2; class 1: P=2/3 R=1 F=4/5; class 2: never predicted, F=0
    assert accuracy(y_true, y_pred) == pytest.approx(3 / 5)
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(["a", "b"], ["a", "b"]) == 1.0
    with pytest.raises(DPrunerError):
        accuracy([0], [])


def test_rouge_against_hand_counts():
    per_example, means = rouge(["the cat sat", "completely different"], ["the cat ran", "the cat ran"])
    # unigrams 2/3 both ways; bigrams {the cat} of 2; LCS "the cat" = 2 of 3
    assert per_example[0]["rouge1"] == pytest.approx(2 / 3)
    assert per_example[0]["rouge2"] == pytest.approx(1 / 2)
    assert per_example[0]["rougeL"] == pytest.approx(2 / 3)
    assert per_example[1] == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0, "rougeLsum": 0.0}
    assert means["rouge1"] == pytest.approx(1 / 3)
    assert rouge(["running cats"], ["the cat runs"])[0][0]["rouge1"] == pytest.approx(0.8)  # stemming


# --- generation helpers -----------------------------------------------------------------------------

def test_first_line_and_newline_stop(tokenizer):
    assert first_line("summary text'.\nmore") == "summary text'."
    assert first_line("no newline") == "no newline"
    ids = newline_token_ids(tokenizer)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    assert newline in ids.tolist() and tokenizer("a", add_special_tokens=False).input_ids[0] not in ids.tolist()
    stop = _stop_at_newline(ids)[0]
    assert stop(torch.tensor([[5, newline], [newline, 5]]), None).tolist() == [True, False]


def test_decoding_settings_are_the_originals():
    sampled = DecodingSettings().generate_kwargs()
    assert sampled == {"do_sample": True, "temperature": 0.1, "top_k": 50, "top_p": 1.0,
                       "repetition_penalty": 1.1, "max_new_tokens": 1000, "num_return_sequences": 1,
                       "use_cache": True}
    assert DecodingSettings(greedy=True).generate_kwargs()["do_sample"] is False


def test_generation_stop_at_newline_keeps_first_lines(tokenizer):
    from dpruner.evaluation.generation import generate_first_lines

    model = make_tiny_llama(seed=0, tie_word_embeddings=False)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[-1]
    torch.manual_seed(0)
    with torch.no_grad():  # a newline logit that sometimes wins, so first lines end mid-generation
        model.lm_head.weight[newline] = 2 * torch.randn(model.config.hidden_size)
    prompts = ["A question posted by a patient is 'why'. The summary of the question is '", "Hello there",
               "One two three four"]
    settings = DecodingSettings(greedy=True, max_new_tokens=8)
    raw = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, pad_token_id=tokenizer.pad_token_id, **settings.generate_kwargs())
        raw.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert any("\n" in text and text.split("\n")[0] for text in raw)  # the case the stop must get right
    full = generate_first_lines(model, tokenizer, prompts, DecodingSettings(greedy=True, max_new_tokens=8,
                                                                            stop_at_newline=False), progress=False)
    stopped = generate_first_lines(model, tokenizer, prompts, settings, batch_size=1, progress=False)
    assert stopped.texts == full.texts == [first_line(text) for text in raw]


# --- data sets --------------------------------------------------------------------------------------

def test_casehold_prompts_and_label_errors(tmp_path):
    root = make_data_dir(tmp_path, {"casehold_test": [casehold_row(), "", casehold_row(label="7")]})
    with pytest.raises(DPrunerError, match=r"casehold_test.txt:3: label is '7'"):
        eval_sets.casehold(str(root))
    data = eval_sets.casehold(str(root), limit=1)
    example = data.items[0]
    assert example.context == "A citing text is 'the court held'. The correct holding statement is"
    assert example.candidates[4] == " holding number 4" and example.label == 2
    assert data.sources[0]["path"].endswith("casehold_test.txt") and len(data.sources[0]["sha256"]) == 64
    root = make_data_dir(tmp_path / "int", {"casehold_test": [casehold_row(label=2)]})
    with pytest.raises(DPrunerError, match=r":1: label is 2"):
        eval_sets.casehold(str(root))


def test_pubmedqa_limit_spreads_over_a_label_sorted_file(tmp_path):
    labels = ["yes"] * 6 + ["no"] * 4 + ["maybe"] * 2
    rows = [json.dumps({"QUESTION": f"q{i}", "CONTEXTS": ["c"], "final_decision": label})
            for i, label in enumerate(labels)]
    root = make_data_dir(tmp_path, {"pubmedqa_test": rows})
    picked = eval_sets.pubmedqa(str(root), limit=6)
    assert [picked.labels[item.label] for item in picked.items] == ["yes", "yes", "yes", "no", "no", "maybe"]
    assert len(eval_sets.pubmedqa(str(root), limit=None).items) == len(labels)


def test_pubmedqa_and_mednli_prompts(tmp_path):
    row = {"QUESTION": "Does it work?", "CONTEXTS": "['First part.', 'Second part.']", "final_decision": "maybe"}
    root = make_data_dir(tmp_path, {"pubmedqa_test": [json.dumps(row)]})
    example = eval_sets.pubmedqa(str(root)).items[0]
    assert example.context == ("The abstract of a biomedical research article is 'First part. Second part.'. Here "
                               "comes a question 'Does it work?', and please answer the question with 'yes', "
                               "'no', or 'maybe'. The answer is '")
    assert example.candidates == ("yes", "no", "maybe") and example.label == 2
    mednli = tmp_path / "mli.jsonl"
    mednli.write_text(json.dumps({"sentence1": "P.", "sentence2": "H.", "gold_label": "neutral"}) + "\n")
    example = eval_sets.mednli(str(mednli)).items[0]
    assert example.context == "Premise is 'P.', and hypothesis is 'H.'. Their relationship is '"
    assert example.label == 2
    with pytest.raises(DPrunerError, match="PhysioNet"):
        eval_sets.mednli(None)
    with pytest.raises(DPrunerError, match="not found"):
        eval_sets.mednli(str(tmp_path / "missing.jsonl"))


def test_perplexity_texts(tmp_path):
    rows = [json.dumps({"text": f"text {i}"}) for i in range(4)]
    root = make_data_dir(tmp_path, {"multilegalpile": rows, "wikitext2_test": [json.dumps({"text": ""}), *rows]})
    assert eval_sets.multilegalpile(str(root), limit=3).items[0].text == "text 0\n\ntext 1\n\ntext 2"
    assert eval_sets.wikitext2(str(root)).items[0].text.startswith("\n\ntext 0")
    paragraphs = tmp_path / "book.txt"
    paragraphs.write_text("first\nparagraph\n\nsecond one\n\n\nthird\n")
    assert eval_sets.text_file(str(paragraphs), limit=2).items[0].text == "first\nparagraph\n\nsecond one"
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\n")
    assert eval_sets.text_file(str(lines)).items[0].documents == 2


def test_real_test_sets_load():
    """The prepared files give the original's row counts and templates."""
    assert len(eval_sets.casehold().items) == 200
    assert len(eval_sets.billsum().items) == 200
    assert len(eval_sets.pubmedqa().items) == 500
    assert len(eval_sets.hqs().items) == 100
    assert eval_sets.multilegalpile().items[0].documents == 300
    assert eval_sets.c4_validation().items[0].documents == 30
    hqs = eval_sets.hqs(limit=1).items[0]
    assert hqs.prompt.startswith("A question posted by a patient is '") and hqs.prompt.endswith("question is '")
