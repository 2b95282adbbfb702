"""Mask analysis (`code/analyze_masks.py`): Jaccard and sparsity against brute-force set counts on small
known masks, a pruned model against the scores it was made from, the CLI's files, and one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from analyze_masks import main as analyze_main
from conftest import error_line, make_tiny_llama, run_cli
from dpruner import cli
from dpruner.analysis import ALL, MaskOptions, count_masks, jaccard, jaccard_rows, open_sources, sparsity_rows
from dpruner.io import ScoreSet, export_upstream_dual, save_score_folder
from dpruner.models import PROJECTIONS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_scores(folder: Path, layers: list[dict[str, torch.Tensor]]) -> Path:
    return save_score_folder(folder, layers, kind="dual_importance", model="test", settings={"test": True})


def random_scores(shapes: dict[str, tuple[int, ...]], layers: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{m: torch.rand(shapes[m], generator=generator) for m in PROJECTIONS} for _ in range(layers)]


SMALL = {m: (4, 6) for m in PROJECTIONS}  # masks small enough to enumerate as Python sets


def analyse(*specs: str, **options) -> tuple[list[dict], list[dict]]:
    counts = count_masks(open_sources(list(specs), MaskOptions(**options)))
    return sparsity_rows(counts), jaccard_rows(counts)


def tiny_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        return {m: tuple(handle.get_slice(f"model.layers.0.{m}.weight").get_shape()) for m in PROJECTIONS}


def run_main(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI in-process (fast) with its exit code and output, shaped like `run_cli`'s result."""
    with pytest.raises(SystemExit) as exited:
        cli.run(analyze_main, [str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exited.value.code, captured.out, captured.err)


def test_jaccard_of_a_mask_with_itself_is_one(tmp_path):
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    assert jaccard(mask, mask) == 1.0
    assert jaccard(torch.zeros(3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool)) == 1.0
    scores = write_scores(tmp_path / "s", random_scores(SMALL, 2, seed=0))
    _, rows = analyse(f"a={scores}", f"b={scores}", sparsity=0.4)
    assert {(r["layer"], r["module"]) for r in rows} >= {(0, ALL), (1, ALL), (ALL, ALL), (0, PROJECTIONS[0])}
    assert all(r["jaccard"] == 1.0 and r["intersection"] == r["union"] > 0 for r in rows)


def brute_force_mask(scores: list[dict[str, torch.Tensor]], sparsity: float) -> set[tuple[int, str, int]]:
    """(layer, module, flat index) of the int(n * sparsity) lowest scores of each matrix."""
    pruned = set()
    for layer, tensors in enumerate(scores):
        for module in PROJECTIONS:
            values = tensors[module].flatten().tolist()
            lowest = sorted(range(len(values)), key=lambda i: (values[i], i))[:int(len(values) * sparsity)]
            pruned |= {(layer, module, i) for i in lowest}
    return pruned


def in_cell(positions: set[tuple[int, str, int]], layer, module) -> set[tuple[int, str, int]]:
    return {p for p in positions if layer in (ALL, p[0]) and module in (ALL, p[1])}


def test_jaccard_and_sparsity_match_brute_force_sets(tmp_path):
    generator = torch.Generator().manual_seed(1)
    # Distinct integer scores, so the expected mask needs no tie-breaking rule.
    layers_a, layers_b = ([{m: torch.randperm(24, generator=generator).reshape(4, 6).float() for m in PROJECTIONS}
                           for _ in range(2)] for _ in range(2))
    a, b = write_scores(tmp_path / "a", layers_a), write_scores(tmp_path / "b", layers_b)
    set_a, set_b = brute_force_mask(layers_a, 0.3), brute_force_mask(layers_b, 0.3)
    sparsity, rows = analyse(f"a={a}", f"b={b}", sparsity=0.3)
    assert len(rows) == 2 * 8 + 8  # 2 layers x (7 projections + all), then per projection over layers + overall
    for row in rows:
        cell_a, cell_b = in_cell(set_a, row["layer"], row["module"]), in_cell(set_b, row["layer"], row["module"])
        assert row["intersection"] == len(cell_a & cell_b) and row["union"] == len(cell_a | cell_b)
        assert row["jaccard"] == pytest.approx(len(cell_a & cell_b) / len(cell_a | cell_b))
    cell = next(r for r in rows if r["layer"] == 0 and r["module"] == PROJECTIONS[0])
    s = 7 / 24  # int(24 * 0.3) of 24 pruned in both: s^2 / (2s - s^2)
    assert cell["random_jaccard"] == pytest.approx(s * s / (2 * s - s * s)) == pytest.approx(7 / 41)
    for row in sparsity:
        positions = in_cell(set_a if row["source"] == "a" else set_b, row["layer"], row["module"])
        assert row["pruned"] == len(positions) and row["sparsity"] == pytest.approx(len(positions) / row["total"])


def test_disjoint_masks_give_zero(tmp_path):
    layers = random_scores(SMALL, 2, seed=2)
    a = write_scores(tmp_path / "a", layers)
    b = write_scores(tmp_path / "b", [{m: -t for m, t in tensors.items()} for tensors in layers])
    _, rows = analyse(f"a={a}", f"b={b}", sparsity=0.5)
    assert all(r["jaccard"] == 0.0 and r["intersection"] == 0 for r in rows)
    overall = next(r for r in rows if r["layer"] == ALL and r["module"] == ALL)
    assert overall["union"] == 2 * 7 * 24 and overall["random_jaccard"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("shard_size", ["5GB", "400KB"])
def test_sparsity_equals_a_direct_count_of_zero_weights(shard_size, embedded_model, tmp_path):
    model = make_tiny_llama(seed=3)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith("proj.weight"):
                fraction = torch.rand(1, generator=generator)  # a different sparsity in every matrix
                weight.masked_fill_(torch.rand(weight.shape, generator=generator) < fraction, 0)
    model.save_pretrained(tmp_path / "model", max_shard_size=shard_size)
    assert (tmp_path / "model" / "model.safetensors.index.json").exists() == (shard_size == "400KB")
    state = model.state_dict()
    rows, _ = analyse(f"m={tmp_path / 'model'}")
    direct = {(layer, m): state[f"model.layers.{layer}.{m}.weight"] == 0 for layer in range(3) for m in PROJECTIONS}
    for row in rows:
        cells = [v for (layer, m), v in direct.items()
                 if row["layer"] in (ALL, layer) and row["module"] in (ALL, m)]
        assert row["pruned"] == sum(int(v.sum()) for v in cells)
        assert row["total"] == sum(v.numel() for v in cells)
    assert len({r["sparsity"] for r in rows if r["layer"] != ALL and r["module"] != ALL}) > 5  # non-trivial


@pytest.fixture(scope="module")
def pruned_pair(tiny_llama_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Random scores, the tiny model pruned with them by save_model.py, and unrelated scores."""
    root = tmp_path_factory.mktemp("analysis")
    shapes = tiny_shapes(tiny_llama_dir)
    scores = write_scores(root / "scores", random_scores(shapes, 3, seed=4))
    other = write_scores(root / "other", random_scores(shapes, 3, seed=5))
    result = run_cli("save_model.py", tiny_llama_dir, scores, root / "pruned", "--sparsity", "0.5")
    assert result.returncode == 0, result.stderr
    return scores, root / "pruned", other


def test_model_and_the_scores_it_was_pruned_with_agree(pruned_pair):
    scores, pruned, _ = pruned_pair
    sparsity, rows = analyse(f"model={pruned}", f"scores={scores}", sparsity=0.5, scope="matrix")
    assert all(r["jaccard"] == 1.0 for r in rows)
    assert all(r["sparsity"] == 0.5 for r in sparsity)


def test_cli_writes_csvs_pngs_and_summary(pruned_pair, tmp_path):
    scores, pruned, other = pruned_pair
    out = tmp_path / "analysis"
    result = run_cli("analyze_masks.py", f"model={pruned}", f"scores={scores}", f"other={other}", "--out", out)
    assert result.returncode == 0, result.stderr
    pngs = ["sparsity_heatmap_model.png", "sparsity_heatmap_scores.png", "sparsity_heatmap_other.png",
            "jaccard_heatmap.png", "jaccard_by_layer.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    with (out / "jaccard.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    pairs = {(r["source_a"], r["source_b"]) for r in rows}
    assert pairs == {("model", "scores"), ("model", "other"), ("scores", "other")}
    assert all(float(r["jaccard"]) == 1.0 for r in rows if r["source_b"] == "scores")
    assert {r["layer"] for r in rows} == {"0", "1", "2", "all"}
    with (out / "sparsity.csv").open() as handle:
        assert list(next(csv.reader(handle))) == ["source", "layer", "module", "pruned", "total", "sparsity"]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["files"]) == sorted(["sparsity.csv", "jaccard.csv", "summary.json", *pngs])
    assert [s["kind"] for s in summary["sources"]] == ["model", "scores", "scores"]
    assert summary["sources"][0]["sparsity"]["all"] == 0.5 and len(summary["sources"][0]["sparsity"]) == 8
    assert "| model | 1 | 1.000 (0.333) |" in result.stdout
    again = run_cli("analyze_masks.py", f"model={pruned}", "--out", out, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["jaccard.csv", "sparsity.csv", "sparsity_heatmap_model.png",
                                                     "summary.json"]  # nothing left of the previous run


def test_help_documents_every_option_with_default():
    result = run_cli("analyze_masks.py", "--help")
    assert result.returncode == 0
    text_of_help = " ".join(result.stdout.split())  # argparse wraps lines at the terminal width
    for text in ("LABEL=PATH", "--out", "--overwrite", "--sparsity", "--scope", "--blocks", "--pattern",
                 "(default: 0.5)", "(default: matrix)", "(default: 32)", "(default: unstructured)"):
        assert text in text_of_help, text


@pytest.fixture(scope="module")
def bad_folders(pruned_pair, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    (root / "neither").mkdir()
    (root / "neither" / "notes.txt").write_text("not a model")
    upstream_layers = random_scores(SMALL, 3, seed=6)
    upstream_layers[2] = random_scores({m: (2, 6) for m in PROJECTIONS}, 1, seed=7)[0]
    # The original .pt layout: shapes are known only once a layer is loaded, so the mismatch shows up late.
    export_upstream_dual(ScoreSet.open(write_scores(root / "late_src", upstream_layers)), root / "late")
    return {"neither": root / "neither", "small": write_scores(root / "small", random_scores(SMALL, 3, seed=8)),
            "two_layers": write_scores(root / "two_layers", random_scores(SMALL, 2, seed=9)),
            "late": root / "late", "full": root / "full_out"}


BAD_CASES = {
    "no_source": ([], "required: LABEL=PATH"),
    "no_equals": (["{scores}"], "is not LABEL=PATH"),
    "bad_label": (["a/b={scores}"], "label 'a/b' must start with a letter or digit"),
    "duplicate": (["a={scores}", "a={other}"], "label 'a' is given twice"),
    "missing": (["a={neither}/nothing"], "folder does not exist"),
    "neither": (["a={neither}"], "neither a model folder"),
    "architecture": (["m={pruned}", "s={small}"], "sources 'm' and 's' differ at layer 0 self_attn.q_proj"),
    "layer_count": (["s={small}", "t={two_layers}"], "different numbers of decoder layers: s=3, t=2"),
    "late_mismatch": (["s={small}", "u={late}"], "sources 's' and 'u' differ at layer 2 self_attn.q_proj"),
    "sparsity": (["a={scores}", "--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    "pattern": (["a={scores}", "--pattern", "4:2"], "need 0 < N < M"),
    "replaces_input": (["a={scores}", "--out", "{scores}", "--overwrite"], "would replace"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_inputs_give_one_line_and_write_nothing(case, pruned_pair, bad_folders, tmp_path, capsys):
    scores, pruned, other = pruned_pair
    args, expected = BAD_CASES[case]
    paths = dict(bad_folders, scores=scores, pruned=pruned, other=other)
    args = [a.format(**paths) for a in args]
    out = tmp_path / "out"
    result = run_main(capsys, *args, *([] if "--out" in args else ["--out", out]))
    assert expected in error_line(result)
    assert not out.exists()
    assert (scores / "manifest.json").exists()


def test_non_empty_out_is_kept_without_overwrite(pruned_pair, tmp_path):
    scores, _, _ = pruned_pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_cli("analyze_masks.py", f"a={scores}", "--out", tmp_path / "out")
    assert "exists and is not empty" in error_line(result)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
