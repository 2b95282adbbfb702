"""Stage 3 (`code/save_model.py`, `code/save_model_iterative.py`) on the tiny Llama.

The pruned folders are loaded with plain `AutoModelForCausalLM.from_pretrained` and compared with a
mask computed here independently: scores are small integers, so `score * numel + flat index` is an
exact, tie-free integer key and the k smallest keys are the expected pruned set. Unpruned weights
must equal the ORIGINAL model's bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import error_line, make_tiny_llama, run_cli
from dpruner.errors import DPrunerError
from dpruner.io import UPSTREAM_GENERAL_DIRS, ScoreSet, export_upstream_dual, save_score_folder
from dpruner.models import PROJECTIONS, decoder_layers, projection_modules
from dpruner.stage3 import apply_scores

pytestmark = pytest.mark.slow

LAYERS = 3  # the tiny Llama's decoder layers


def projection_shapes() -> dict[str, torch.Size]:
    layer = decoder_layers(make_tiny_llama())[0]
    return {name: linear.weight.shape for name, linear in projection_modules(layer).items()}


def integer_scores(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Scores 0..5 (many ties at every threshold), one dict per layer."""
    generator = torch.Generator().manual_seed(seed)
    return [{name: torch.randint(0, 6, shape, generator=generator).float() for name, shape in projection_shapes().items()}
            for _ in range(LAYERS)]


def write_scores(folder: Path, layers: list[dict[str, torch.Tensor]], model: str = "tiny") -> Path:
    return save_score_folder(folder, layers, kind="dual_importance", model=model, settings={"test": True})


def lowest_keys(keys: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask of the int(n * sparsity) smallest of distinct integer keys."""
    k = int(keys.numel() * sparsity)
    if k == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    return keys <= keys.flatten().sort().values[k - 1]


def expected_mask(scores: torch.Tensor, sparsity: float, blocks: int | None) -> torch.Tensor:
    keys = scores.long() * scores.numel() + torch.arange(scores.numel()).reshape(scores.shape)
    if blocks is None:
        return lowest_keys(keys, sparsity)
    width = scores.shape[1] // blocks
    return torch.cat([lowest_keys(keys[:, b * width:(b + 1) * width], sparsity) for b in range(blocks)], dim=1)


def load_plain(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_plain(folder).state_dict()


def check_pruned(out: Path, original: dict[str, torch.Tensor], scores: list[dict[str, torch.Tensor]],
                 sparsity: float, blocks: int | None) -> dict:
    """Zeros = the independent mask; everything else = the original; report = counted zeros."""
    model = load_plain(out)
    pruned = model.state_dict()
    assert pruned.keys() == original.keys()
    zero_proj = 0
    per_layer = []
    for key, weight in pruned.items():
        parts = key.split(".")
        module = ".".join(parts[3:5])
        if module in PROJECTIONS and parts[-1] == "weight":
            mask = expected_mask(scores[int(parts[2])][module], sparsity, blocks)
            assert torch.equal(weight == 0, mask), key
            assert torch.equal(weight[~mask], original[key][~mask]), key
            zero_proj += int(mask.sum())
            if module == PROJECTIONS[0]:
                per_layer.append({"layer": int(parts[2])})
            per_layer[-1][module] = round(int(mask.sum()) / mask.numel(), 6)
        else:
            assert torch.equal(weight, original[key]), f"{key} changed"
    report = json.loads((out / "pruning_report.json").read_text())
    unique = {id(p): p for p in model.parameters()}.values()
    assert report["sparsity"]["zero_projection_weights"] == zero_proj
    assert report["sparsity"]["zero_parameters"] == sum(int((p == 0).sum()) for p in unique)
    assert report["sparsity"]["per_layer"] == per_layer
    assert report["mask"]["masked_weights"] == zero_proj
    assert report["dtype"] == "float32"
    return report


@pytest.fixture(scope="module")
def original(tiny_llama_dir) -> dict[str, torch.Tensor]:
    return load_state(tiny_llama_dir)


@pytest.fixture(scope="module")
def scores() -> list[dict[str, torch.Tensor]]:
    return integer_scores()


@pytest.fixture(scope="module")
def score_dir(tmp_path_factory, scores) -> Path:
    return write_scores(tmp_path_factory.mktemp("scores") / "importance", scores)


@pytest.fixture(scope="module")
def pruned_matrix(tiny_llama_dir, score_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("matrix") / "pruned"
    result = run_cli("save_model.py", tiny_llama_dir, score_dir, out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "pruning_report.json").read_text())["sparsity"]
    assert f"pruned model: {out}" in result.stdout
    assert f"report: {out / 'pruning_report.json'}" in result.stdout
    assert (f"sparsity: {report['projection_sparsity']:.2%} of the 7 projections" in result.stdout
            and f"{report['overall_sparsity']:.2%} of all parameters" in result.stdout), result.stdout
    return out


@pytest.fixture(scope="module")
def pruned_blocks(tiny_llama_dir, score_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("blocks") / "pruned"
    result = run_cli("save_model_iterative.py", tiny_llama_dir, score_dir, out)  # default --blocks 32
    assert result.returncode == 0, result.stderr
    return out


def test_per_matrix_mask_on_the_original_weights(pruned_matrix, original, scores, score_dir):
    report = check_pruned(pruned_matrix, original, scores, 0.52, blocks=None)
    assert {key: report["mask"][key] for key in ("scope", "blocks", "pattern", "sparsity")} == {
        "scope": "matrix", "blocks": None, "pattern": "unstructured", "sparsity": 0.52}
    assert report["importance"]["layout"] == "dpruner"
    assert report["importance"]["manifest"] == ScoreSet.open(score_dir).manifest
    assert "save_model.py" in report["command"]


def test_per_column_block_mask_on_the_original_weights(pruned_blocks, original, scores):
    report = check_pruned(pruned_blocks, original, scores, 0.52, blocks=32)
    assert report["mask"]["scope"] == "block" and report["mask"]["blocks"] == 32


def test_n_m_pattern(tiny_llama_dir, score_dir, scores, original, tmp_path):
    out = tmp_path / "pruned_2_4"
    result = run_cli("save_model_iterative.py", tiny_llama_dir, score_dir, out, "--pattern", "2:4")
    assert result.returncode == 0, result.stderr
    pruned = load_state(out)
    for index in range(LAYERS):
        for module in PROJECTIONS:
            weight = pruned[f"model.layers.{index}.{module}.weight"]
            rows, cols = weight.shape
            assert ((weight == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all()
            groups = scores[index][module].reshape(rows, cols // 4, 4)
            keys = groups.long() * 4 + torch.arange(4)
            assert torch.equal((weight == 0).reshape(rows, cols // 4, 4),
                               keys <= keys.sort(dim=-1).values[..., 1:2])
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["mask"]["scope"] == "n:m" and report["mask"]["sparsity"] == 0.5
    assert report["sparsity"]["projection_sparsity"] == 0.5


def test_original_pt_layouts_give_the_identical_model(tiny_llama_dir, score_dir, scores, pruned_matrix,
                                                      pruned_blocks, tmp_path):
    dual = tmp_path / "importance_dual"
    export_upstream_dual(ScoreSet.open(score_dir), dual)
    assert sorted(p.name for p in dual.iterdir()) == sorted(["Q", "K", "V", "O", "Gate", "Up", "Down"])
    general = tmp_path / "general_importance"
    for short, module in UPSTREAM_GENERAL_DIRS.items():
        (general / short).mkdir(parents=True)
        for index in range(LAYERS):
            torch.save(scores[index][module].clone(), general / short / f"{index}.pt")
    runs = {"upstream-dual": ("save_model.py", dual, pruned_matrix),
            "upstream-general": ("save_model_iterative.py", general, pruned_blocks)}
    for layout, (script, folder, ours) in runs.items():
        out = tmp_path / f"pruned_{layout}"
        result = run_cli(script, tiny_llama_dir, folder, out)
        assert result.returncode == 0, result.stderr
        theirs_state, ours_state = load_state(out), load_state(ours)
        assert all(torch.equal(theirs_state[key], ours_state[key]) for key in ours_state), layout
        assert json.loads((out / "pruning_report.json").read_text())["importance"]["layout"] == layout


def test_masks_are_all_computed_before_any_weight_changes(scores, tmp_path):
    bad = [dict(layer) for layer in scores]
    bad[-1]["mlp.down_proj"] = bad[-1]["mlp.down_proj"].clone()
    bad[-1]["mlp.down_proj"][0, 0] = float("nan")
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DPrunerError, match="layer 2 mlp.down_proj holds 1 NaN/inf values"):
        apply_scores(model, ScoreSet.open(write_scores(tmp_path / "nan", bad)), 0.52)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def bad_score_dirs(scores: list[dict[str, torch.Tensor]], score_dir: Path, root: Path) -> dict[str, Path]:
    """One broken importance folder per failure mode."""
    missing_layer = root / "missing_layer"
    shutil.copytree(score_dir, missing_layer)
    (missing_layer / "layer_001.safetensors").unlink()
    missing_pt = root / "missing_pt"
    export_upstream_dual(ScoreSet.open(score_dir), missing_pt)
    (missing_pt / "K" / "1.pt").unlink()
    wrong_shape = [dict(layer) for layer in scores]
    wrong_shape[2]["mlp.down_proj"] = wrong_shape[2]["mlp.down_proj"].T.contiguous()
    with_nan = [dict(layer) for layer in scores]
    with_nan[1]["self_attn.q_proj"] = with_nan[1]["self_attn.q_proj"].clone()
    with_nan[1]["self_attn.q_proj"][3, 5] = float("nan")
    no_module = [dict(layer) for layer in scores]
    del no_module[0]["mlp.up_proj"]
    return {"missing_layer": missing_layer, "missing_pt": missing_pt,
            "wrong_shape": write_scores(root / "wrong_shape", wrong_shape),
            "nan": write_scores(root / "nan", with_nan),
            "no_module": write_scores(root / "no_module", no_module),
            "two_layers": write_scores(root / "two_layers", scores[:2])}


BAD_INPUTS = [
    ("missing_layer", "save_model.py", (), "scores for layer 1 are missing (layer_001.safetensors)"),
    ("missing_pt", "save_model.py", (), "scores for layer 1 are missing (K/1.pt)"),
    ("wrong_shape", "save_model_iterative.py", (),
     "layer 2 mlp.down_proj has shape [128, 64], the model's weight is [64, 128]"),
    ("nan", "save_model.py", (), "layer 1 self_attn.q_proj holds 1 NaN/inf values"),
    ("no_module", "save_model.py", (), "layer 0 has no scores for mlp.up_proj"),
    ("two_layers", "save_model.py", (), "has scores for 2 layers, the model has 3 decoder layers"),
    ("good", "save_model.py", ("--sparsity", "1.0"), "--sparsity must be in [0, 1), got 1.0"),
    ("good", "save_model_iterative.py", ("--blocks", "3"), "layer 0 self_attn.q_proj: --blocks 3 does not divide the 64 input columns"),
    ("good", "save_model.py", ("--pattern", "3:2"), "pattern '3:2': need 0 < N < M"),
]


def test_bad_inputs_give_one_error_line_and_write_nothing(tiny_llama_dir, scores, score_dir, tmp_path):
    folders = bad_score_dirs(scores, score_dir, tmp_path) | {"good": score_dir}
    for case, (name, script, options, message) in enumerate(BAD_INPUTS):
        out = tmp_path / f"out_{case}"
        result = run_cli(script, tiny_llama_dir, folders[name], out, *options)
        line = error_line(result)
        assert message in line, (name, options, line)
        assert not out.exists(), (name, options)
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left"


def test_existing_output_needs_overwrite(tiny_llama_dir, score_dir, tmp_path):
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "already exists; pass --overwrite" in error_line(run_cli("save_model.py", tiny_llama_dir, score_dir, out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    line = error_line(run_cli("save_model.py", tiny_llama_dir, score_dir, score_dir, "--overwrite"))
    assert "is the importance folder" in line and (score_dir / "manifest.json").exists()
    result = run_cli("save_model.py", tiny_llama_dir, score_dir, out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "pruning_report.json").exists()
