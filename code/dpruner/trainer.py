"""Stage 2: LOMO full-parameter fine-tuning on domain text that accumulates the dual importance.

Per step (with clipping, the original's two passes): forward, norm-pass backward (global norm, no
update), forward again, update-pass backward (fused SGD with the clip coefficient). The D-Pruner
callback refines the projection gradients with the general-importance regularizer and adds to the
importance scores. After each epoch the cumulative importance, the fine-tuned weights and the trainer
state are saved atomically; a rerun of the same config resumes after the last saved epoch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from dpruner.checkpoint import load_causal_lm, verify_model_folder, write_checksums
from dpruner.config import TrainConfig, dump_config
from dpruner.data.domain import domain_texts
from dpruner.distributed import Runtime, init_runtime, shutdown
from dpruner.errors import DPrunerError
from dpruner.export import versions
from dpruner.guard import Output, model_input, protect
from dpruner.importance import (DOUBLE_BACKWARD_ATTENTION, DualImportance, ImportanceSettings, load_general_importance,
                                pretrained_anchors, resolve_general_norm)
from dpruner.io import ScoreSet, atomic_dir, check_finite_scores, read_json, save_score_folder, write_json
from dpruner.lomo import DynamicLossScaler, Lomo, local_part
from dpruner.loss import causal_lm_loss, check_chunked_loss
from dpruner.mixing import DomainMixture
from dpruner.models import load_tokenizer, meta_skeleton, resolve_dtype, resolve_model
from dpruner.provenance import FINGERPRINT_KEY, check_same_model, fingerprint

STATE_FILE = "trainer_state.json"
# Fault injection for the resume test: SIGKILL this process right after saving the given epoch.
KILL_AFTER_EPOCH_ENV = "DPRUNER_DEBUG_KILL_AFTER_EPOCH"
# Settings that do not change the result; a run may resume with different values.
NON_IDENTITY_KEYS = ("output_dir", "overwrite_output_dir", "logging_steps", "deepspeed", "save_strategy",
                     "loss_chunk_tokens", "importance_offload")


def lr_at(step: int, total_steps: int, peak: float, warmup: float, kind: str) -> float:
    """The original's schedule: progress = step / total (step from 1); linear warmup over `warmup` of
    the steps, then linear decay to 0 at the last step."""
    if kind == "constant":
        return peak
    progress = step / total_steps
    if progress < warmup:
        return peak * progress / warmup
    return peak * max((1.0 - progress) / (1.0 - warmup), 0.0)


class TokenizedTexts(torch.utils.data.Dataset):
    def __init__(self, tokenizer, texts: list[str], max_length: int | None) -> None:
        self.ids = [tokenizer(text, truncation=max_length is not None, max_length=max_length).input_ids
                    for text in texts]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> list[int]:
        return self.ids[index]


def collate(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding; pads are masked in attention and labelled -100 (the loss is over real tokens)."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention[row, :len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def protect_stage2(config: TrainConfig) -> None:
    """output_dir must be writable and apart from every input (overwrite_output_dir deletes it)."""
    from dpruner.paths import data_dir

    protect([Output("output_dir", config.output_dir)],
            {"model": model_input(config.model_name_or_path), "general_importance_dir": config.general_importance_dir,
             "data folder": data_dir(config.data_dir), "deepspeed config": config.deepspeed,
             "mednli_file": config.mednli_file, "pubmedqa_artificial_file": config.pubmedqa_artificial_file})


def identity(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in NON_IDENTITY_KEYS}


class Stage2:
    """One training run; `run()` returns a summary dict (rank 0 also writes it)."""

    def __init__(self, config: TrainConfig, runtime: Runtime, allow_other_model: bool = False) -> None:
        self.config = config
        self.rt = runtime
        self.out = Path(config.output_dir)
        self.dtype = resolve_dtype(config.dtype, runtime.device)
        if self.dtype == torch.float16 and runtime.device.type == "cpu":
            raise DPrunerError("dtype float16 is not supported on CPU (DeepSpeed rejects it); use float32 or bfloat16")
        if config.regularizer == "grad_penalty" and self.dtype == torch.float16:
            raise DPrunerError("regularizer grad_penalty needs dtype float32 or bfloat16 (its double backward "
                               "is not loss-scaled); set dtype")
        if (config.regularizer == "grad_penalty" and config.deepspeed
                and self._ds_config()["zero_optimization"].get("stage", 0) == 3):
            raise DPrunerError("regularizer grad_penalty does not run under ZeRO-3 (its double backward needs the "
                               "whole gradients); use a DeepSpeed config without stage 3, or deepspeed=null")
        if self.dtype == torch.float16 and not config.clip_grad_norm:
            raise DPrunerError("fp16 training needs clip_grad_norm: overflow is detected in the norm pass (as LOMO)")
        meta_skeleton(config.model_name_or_path)  # architecture and weight files, before anything heavy
        protect_stage2(config)
        if config.regularizer != "none":
            check_same_model(ScoreSet.open(config.general_importance_dir).manifest, config.general_importance_dir,
                             config.model_name_or_path, allow_other_model)
        self.fingerprint = fingerprint(config.model_name_or_path)
        self.state = self._initial_state()
        self._loss_checked = False
        self._steps_before = 0  # importance steps accumulated before the epoch this run resumed from

    # ---------- output folder and resume ----------
    def _initial_state(self) -> dict[str, Any]:
        state_path = self.out / STATE_FILE
        fresh = {"epochs_done": 0, "global_step": 0, "loss_scale": self.config.initial_loss_scale,
                 "last_update_lr": self.config.learning_rate, "previous_step_updated": False,
                 "complete": False, "identity": identity(self.config)}
        if not state_path.exists():
            if self.out.exists() and any(self.out.iterdir()):
                raise DPrunerError(f"output_dir {self.out} exists and is not a stage-2 output (no {STATE_FILE}); "
                                   "choose another folder (it is never deleted, even with overwrite_output_dir)")
            return fresh
        old = read_json(state_path)
        if self.config.overwrite_output_dir:
            return fresh
        if old.get("complete"):
            raise DPrunerError(f"output_dir {self.out} already holds a finished run; set overwrite_output_dir=true "
                               "to replace it")
        if old.get("identity") != identity(self.config):
            changed = sorted(k for k in identity(self.config) if old.get("identity", {}).get(k) != identity(self.config)[k])
            raise DPrunerError(f"output_dir {self.out} holds an unfinished run with other settings ({', '.join(changed)}); "
                               "set overwrite_output_dir=true to start over")
        return old

    def _epoch_dir(self, epoch: int) -> Path:
        return self.out / "epochs" / f"epoch_{epoch:03d}"

    # ---------- model ----------
    def _ds_config(self) -> dict[str, Any]:
        ds = json.loads(Path(self.config.deepspeed).read_text())
        ds.setdefault("fp16", {})["enabled"] = self.dtype == torch.float16
        ds.setdefault("bf16", {})["enabled"] = self.dtype == torch.bfloat16
        zero = ds.setdefault("zero_optimization", {})
        if zero.get("stage", 0) == 3:
            # Small parameters (norms) would otherwise stay gathered and go stale across ranks.
            zero["stage3_param_persistence_threshold"] = 0
        ds["train_micro_batch_size_per_gpu"] = self.config.per_device_train_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds.pop("optimizer", None)
        ds.pop("scheduler", None)
        return ds

    def _load_model(self, source: str):
        ds_config = self._ds_config() if self.config.deepspeed else None
        if Path(source).is_dir():
            verify_model_folder(source)  # before zero.Init below: its meta skeleton must not be partitioned
        keep_alive = None
        if ds_config and ds_config["zero_optimization"].get("stage", 0) == 3:
            from transformers.integrations import HfDeepSpeedConfig

            keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained build partitioned (zero.Init)
        model = load_causal_lm(source, source, verify=False, dtype=self.dtype)
        model.config.use_cache = False
        if self.config.regularizer == "grad_penalty":
            model.set_attn_implementation(DOUBLE_BACKWARD_ATTENTION)
        if self.config.gradient_checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        self.engine = None
        if ds_config:
            import deepspeed

            self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.zero3 = ds_config["zero_optimization"].get("stage", 0) == 3
        else:
            model.to(self.rt.device)
            self.zero3 = False
        del keep_alive
        return model

    # ---------- saving ----------
    def _gathered_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (gathered one parameter at a time under ZeRO-3)."""
        state = {}
        for name, param in self.model.named_parameters():
            if self.zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rt.is_main:
                        state[name] = param.data.detach().cpu().clone()
            elif self.rt.is_main:
                state[name] = param.data.detach().cpu().clone()
        return state

    def _save_importance(self, folder: Path, epoch: int) -> None:
        """Every rank takes part (the ZeRO-3 slices are gathered); rank 0 writes."""
        layers = self.importance.layer_scores(self.model.config.num_hidden_layers)
        if not self.rt.is_main:
            return
        check_finite_scores(folder, layers)
        save_score_folder(folder, layers, kind="dual_importance",
                          model=self.config.model_name_or_path, settings=identity(self.config),
                          extra={"epochs": epoch, "global_step": self.state["global_step"],
                                 "steps_accumulated": self._steps_before + len(self.importance.steps_accumulated),
                                 FINGERPRINT_KEY: self.fingerprint})

    def _save_epoch(self, epoch: int) -> None:
        folder = self._epoch_dir(epoch)
        state_dict = self._gathered_state_dict()
        self._save_importance(folder / "importance", epoch)
        if self.rt.is_main:
            with atomic_dir(folder / "checkpoint") as tmp:
                self.model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                write_checksums(tmp)
            self.state.update(epochs_done=epoch, loss_scale=self.lomo.loss_scale if self.scaler else None,
                              last_update_lr=self.lomo.last_update_lr,
                              previous_step_updated=self.lomo.previous_step_updated)
            if self.mixture:
                self.state["mixture"] = self.mixture.state_dict()
            write_json(self.out / STATE_FILE, self.state)
            for older in sorted((self.out / "epochs").glob("epoch_*")):
                if older != folder:
                    shutil.rmtree(older)
        self.rt.barrier()

    # ---------- training ----------
    def _forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(self.rt.device) for k, v in batch.items()}
        if not self._loss_checked:
            check_chunked_loss(self.model, batch, self.config.loss_chunk_tokens)
            self._loss_checked = True
        return causal_lm_loss(self.model, batch, self.config.loss_chunk_tokens)

    def _after_backward(self) -> None:
        if self.engine is not None and self.zero3:
            self.engine.empty_partition_cache()  # else the next gather of tied/persistent params fails

    def run(self) -> dict[str, Any]:
        config, rt = self.config, self.rt
        began = time.time()
        resumed_from = self.state["epochs_done"]
        self.tokenizer = load_tokenizer(config.model_name_or_path)
        pad_id = self.tokenizer.pad_token_id
        self.mixture = (DomainMixture(config, lambda texts: TokenizedTexts(self.tokenizer, texts, config.data_max_length),
                                      lambda b: collate(b, pad_id), rt.rank, rt.world_size) if config.domains else None)
        dataset = None if self.mixture else TokenizedTexts(self.tokenizer, domain_texts(config), config.data_max_length)
        source = (str(self._epoch_dir(resumed_from) / "checkpoint") if resumed_from
                  else resolve_model(config.model_name_or_path))
        self.model = self._load_model(source)
        named = self.named = dict(self.model.named_parameters())
        general = None
        offload = config.importance_offload == "cpu"
        store = torch.device("cpu") if offload else rt.device
        if config.regularizer != "none":
            gdtype = torch.bfloat16 if config.general_importance_dtype == "bfloat16" else torch.float32
            general = load_general_importance(config.general_importance_dir, named, gdtype, store,
                                              resolve_general_norm(config.general_importance_norm, config.regularizer))
        anchors = (pretrained_anchors(resolve_model(config.model_name_or_path), named, store)
                   if config.regularizer == "anchor" else None)
        self.importance = DualImportance(ImportanceSettings.from_config(config), named, general, anchors, store,
                                         pin=offload)
        if resumed_from:
            self._restore_importance(self._epoch_dir(resumed_from) / "importance")
        # Everything is validated; only now is the output folder touched.
        if rt.is_main:
            if config.overwrite_output_dir and not resumed_from and self.out.exists():
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            if not resumed_from:  # from now on a rerun of this config resumes here, even if killed at once
                write_json(self.out / STATE_FILE, self.state)
            (self.out / "config.yaml").write_text(dump_config(config))
        rt.barrier()
        self.scaler = DynamicLossScaler(self.state["loss_scale"] or config.initial_loss_scale) \
            if self.dtype == torch.float16 else None
        self.lomo = Lomo(named.items(), lr=self.state["last_update_lr"], clip_grad_norm=config.clip_grad_norm,
                         clip_grad_value=config.clip_grad_value, weight_decay=config.weight_decay,
                         loss_scaler=self.scaler, emulated_loss_scale=config.loss_scale,
                         grad_callback=self.importance)
        self.lomo.step = self.state["global_step"]
        self.lomo.previous_step_updated = self.state["previous_step_updated"]

        if self.mixture:
            self.mixture.start(self._forward, self.state.get("mixture"), self.out if rt.is_main else None)
            steps_per_epoch = self.mixture.batches.steps_per_epoch
        else:
            sampler = DistributedSampler(dataset, num_replicas=rt.world_size, rank=rt.rank, shuffle=True,
                                         seed=config.seed, drop_last=False)
            loader = DataLoader(dataset, batch_size=config.per_device_train_batch_size, sampler=sampler,
                                collate_fn=lambda b: collate(b, pad_id))
            steps_per_epoch = len(loader)
        total_steps = steps_per_epoch * config.num_train_epochs
        if config.max_steps:
            total_steps = min(total_steps, config.max_steps)
        log_path = self.out / "train_log.jsonl"
        bar = tqdm(total=total_steps, initial=self.state["global_step"], desc="LOMO steps", disable=not rt.is_main)
        last_epoch = resumed_from
        for epoch in range(resumed_from, config.num_train_epochs):
            if self.state["global_step"] >= total_steps:
                break
            if not self.mixture:
                sampler.set_epoch(epoch)
            for batch in self.mixture.epoch() if self.mixture else loader:
                if self.state["global_step"] >= total_steps:
                    break
                step = self.state["global_step"] + 1
                lr = lr_at(step, total_steps, config.learning_rate, config.warmup, config.lr_scheduler_type)
                record = self._train_step(batch, lr)
                if self.mixture:
                    self.mixture.after_step(record["loss"])
                    record["domain"] = self.mixture.names[self.mixture.current]
                self.state["global_step"] = step
                bar.update(1)
                if rt.is_main and step % config.logging_steps == 0:
                    record.update(step=step, epoch=epoch, lr=lr)
                    with open(log_path, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
            last_epoch = epoch + 1
            if config.save_strategy == "epoch":
                self._save_epoch(last_epoch)
                if os.environ.get(KILL_AFTER_EPOCH_ENV) == str(last_epoch):
                    os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        final = self.out / "importance"
        self._save_importance(final, last_epoch)
        summary = {"importance": str(final), "epochs": last_epoch, "global_step": self.state["global_step"],
                   "examples": self.mixture.examples if self.mixture else len(dataset),
                   "world_size": rt.world_size, "deepspeed": bool(config.deepspeed),
                   "zero3": self.zero3, "importance_bytes_per_rank": self.importance.bytes_held(),
                   "dtype": str(self.dtype).replace("torch.", ""),
                   "device": str(rt.device), "seconds": round(time.time() - began, 2),
                   "resumed_from_epoch": resumed_from, "versions": versions()}
        if self.mixture:
            summary.update(self.mixture.summary())
            if rt.is_main:
                csv_path, plot_path = self.mixture.write_log()
                summary.update(proportions_csv=str(csv_path), proportions_plot=str(plot_path))
        if rt.is_main:
            write_json(self.out / "summary.json", summary)  # before `complete`: a kill in between reruns the end
            self.state["complete"] = True
            write_json(self.out / STATE_FILE, self.state)
        rt.barrier()
        return summary

    def _objective(self, batch: dict[str, torch.Tensor], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(what backward runs on, the next-token loss): they differ only for grad_penalty, whose penalty
        joins the loss so that the hooks receive its exact gradient."""
        loss = self._forward(batch)
        if self.config.regularizer != "grad_penalty":
            return loss, loss
        return loss + self.importance.gradient_penalty(loss, lr, self.named), loss

    def _train_step(self, batch: dict[str, torch.Tensor], lr: float) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.config.clip_grad_norm:
            objective, loss = self._objective(batch, lr)
            ok = self.lomo.norm_pass(objective, lr)
            self._after_backward()
            record["grad_norm"] = self.lomo.last_norm
            if not ok:
                record.update(loss=float(loss.detach()), skipped="fp16 overflow", loss_scale=self.lomo.loss_scale)
                return record
        objective, loss = self._objective(batch, lr)
        self.lomo.update_pass(objective, lr)
        self._after_backward()
        record["loss"] = float(loss.detach())
        return record

    def _restore_importance(self, folder: Path) -> None:
        """The saved scores back into this rank's slices, one layer in memory at a time."""
        scores = ScoreSet.open(folder)
        self._steps_before = int(scores.manifest.get("steps_accumulated", 0))
        for index in range(scores.num_layers):
            layer = scores.layer(index)
            for name, (target_layer, module) in self.importance.targets.items():
                if target_layer == index:
                    self.importance.scores[name].copy_(local_part(self.named[name], layer[module]))


def train(config: TrainConfig, allow_other_model: bool = False) -> dict[str, Any] | None:
    """Run stage 2; the summary is returned on rank 0 only (None elsewhere)."""
    runtime = init_runtime(bool(config.deepspeed))
    try:
        summary = Stage2(config, runtime, allow_other_model).run()
        return summary if runtime.is_main else None
    finally:
        shutdown()


def main_summary(summary: dict[str, Any]) -> str:
    return (f"dual importance: {summary['importance']} ({summary['global_step']} steps, {summary['epochs']} epoch(s), "
            f"{summary['examples']} examples, world size {summary['world_size']}, "
            f"{'DeepSpeed ZeRO-3' if summary['zero3'] else 'DeepSpeed' if summary['deepspeed'] else 'plain PyTorch'}, "
            f"{summary['dtype']} on {summary['device']}, {summary['seconds']:.0f} s)")


