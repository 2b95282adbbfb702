"""Layer streaming (`--offload disk`): identical outputs to the in-memory path, sharded checkpoints
in and out, and the choice between the two."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import error_line, make_tiny_llama, run_cli
from dpruner import streaming
from dpruner.errors import DPrunerError
from dpruner.export import REPORT_NAME
from dpruner.io import load_tensors
from dpruner.methods.sparsegpt import SparseGPT
from dpruner.methods.wanda import Wanda
from dpruner.model_handle import ModelHandle
from dpruner.pipeline import CalibrationSpec, prune_with_method
from dpruner.stage3 import prune_from_scores

CALIBRATION = dict(nsamples=4, seqlen=32)


def state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_streamed_stages_1_and_3_are_byte_identical_on_the_embedded_model(embedded_model, tmp_path):
    runs = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        result = prune_with_method(str(embedded_model), SparseGPT(0.5), CalibrationSpec(**CALIBRATION),
                                   scores_out=out / "scores", save_pruned=out / "sparsegpt", offload=offload,
                                   kind="general_importance")
        assert result["offload"] == offload
        prune_from_scores(str(embedded_model), out / "scores", out / "stage3", sparsity=0.5, offload=offload)
        runs[offload] = out
    memory, streamed = runs["none"], runs["disk"]
    score_files = sorted(p.name for p in (memory / "scores").glob("layer_*.safetensors"))
    assert len(score_files) == 30 and score_files == sorted(p.name for p in (streamed / "scores").glob("layer_*"))
    for name in score_files:
        assert sha256(memory / "scores" / name) == sha256(streamed / "scores" / name), name
    for folder in ("sparsegpt", "stage3"):
        assert_bitwise_equal(load_tensors(memory / folder / streaming.SINGLE_FILE),
                             load_tensors(streamed / folder / streaming.SINGLE_FILE))
        reports = [json.loads((run / folder / REPORT_NAME).read_text()) for run in (memory, streamed)]
        assert reports[0]["sparsity"] == reports[1]["sparsity"], folder


def save_sharded_bf16(path: Path) -> Path:
    from transformers import AutoTokenizer

    from dpruner.models import embedded_model_dir

    make_tiny_llama(tie_word_embeddings=False).to(torch.bfloat16).save_pretrained(path, max_shard_size="2MB")
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(path)
    return path


def test_sharded_bf16_checkpoint_in_and_sharded_output_out(embedded_model, tmp_path, monkeypatch):
    model = save_sharded_bf16(tmp_path / "model")
    assert len(json.loads((model / streaming.INDEX_FILE).read_text())["weight_map"]) > 0
    monkeypatch.setattr(streaming, "DEFAULT_SHARD_BYTES", 3_000_000)
    for offload in ("none", "disk"):
        prune_with_method(str(model), Wanda(0.5), CalibrationSpec(**CALIBRATION), scores_out=None,
                          save_pruned=tmp_path / offload, offload=offload, dtype="bfloat16")
    index = json.loads((tmp_path / "disk" / streaming.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "disk" / shard).exists() for shard in shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state(tmp_path / "disk").values())
    assert_bitwise_equal(state(tmp_path / "none"), state(tmp_path / "disk"))


def test_auto_streams_only_when_the_weights_do_not_fit(tiny_llama_dir, monkeypatch):
    handle = ModelHandle.resolve(str(tiny_llama_dir))
    need = handle.checkpoint.numel() * 4
    monkeypatch.setattr(streaming, "available_memory", lambda: int(need / streaming.FIT_FRACTION) + 1)
    assert not streaming.should_stream("auto", handle, torch.float32)
    monkeypatch.setattr(streaming, "available_memory", lambda: int(need / streaming.FIT_FRACTION) - 1)
    assert streaming.should_stream("auto", handle, torch.float32)
    assert not streaming.should_stream("none", handle, torch.float32)


def test_disk_offload_needs_a_safetensors_checkpoint(tiny_llama_dir, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(DPrunerError, match="has no model.safetensors or model.safetensors.index.json"):
        streaming.should_stream("disk", ModelHandle.resolve(str(tmp_path / "bare")), torch.float32)
    result = run_cli("save_model.py", tmp_path / "bare", tmp_path / "nothing", tmp_path / "out", "--offload", "disk")
    assert "importance folder" in error_line(result)  # inputs are checked in order, before any weight
    assert not (tmp_path / "out").exists()


def test_streamed_owl_profile_matches_in_memory(tiny_llama_dir, tmp_path):
    from dpruner.owl import OwlProfile

    results = {offload: prune_with_method(str(tiny_llama_dir), Wanda(0.5), CalibrationSpec(**CALIBRATION),
                                          scores_out=None, save_pruned=tmp_path / offload, offload=offload,
                                          profile=OwlProfile(m=2.0))
               for offload in ("none", "disk")}
    assert results["none"]["owl"] == results["disk"]["owl"]
    assert_bitwise_equal(load_tensors(tmp_path / "none" / streaming.SINGLE_FILE),
                         load_tensors(tmp_path / "disk" / streaming.SINGLE_FILE))
