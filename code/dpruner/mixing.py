"""Several stage-2 domains at once: batches drawn by the current proportions, constant or DRO-updated.

Each step draws one domain with the step's own seeded generator (so every rank draws the same domain
and a resumed run draws what the uninterrupted one would), then takes that domain's next batch from
its own DistributedSampler pass; a pass ends with a short batch, as a DataLoader with drop_last=False.
An epoch is as many steps as the domains' examples fill. With one domain this is exactly the
single-domain DataLoader, so `constant` over one domain reproduces the single-domain run.

With `domain_mixing: dro` the proportions follow DRPruning (dpruner.dro) every `dro_update_interval`
steps. The proportions are logged to `domain_proportions.csv` (and plotted at the end); held-out
examples of each domain give the dense model's reference loss and the per-domain result.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from dpruner.data.domain import domain_texts
from dpruner.data.spec import load_domain
from dpruner.dro import DroSettings, DroState, LossEma
from dpruner.errors import DPrunerError
from dpruner.io import atomic_path

PROPORTIONS_CSV = "domain_proportions.csv"
PROPORTIONS_PLOT = "domain_proportions.png"
# Ours: step s of seed k draws from generator k * stride + s, so runs with nearby seeds share no generator.
DRAW_SEED_STRIDE = 1_000_003


def domain_training_texts(config, name: str) -> list[str]:
    """Domain name -> its training strings (the single place to re-point at the YAML domain loader)."""
    return domain_texts(dataclasses.replace(config, domain=name))


def domain_labels(entries: Sequence[str]) -> list[str]:
    """`domains` entries as they are shown (CSV columns, plot legend, result keys): each spec's `name`,
    not its YAML path; two entries of one name are refused."""
    labels = [load_domain(entry).name for entry in entries]
    if len(set(labels)) != len(labels):
        raise DPrunerError(f"domains {list(entries)} name the same domain twice ({labels}); each needs its own name")
    return labels


def split_domain(config, name: str) -> tuple[list[str], list[str]]:
    """(training, held-out) texts: the last `domain_eval_examples` of the domain's shuffled texts are held out."""
    texts = domain_training_texts(config, name)
    keep = len(texts) - config.domain_eval_examples
    if keep < 1:
        raise DPrunerError(f"domain_eval_examples={config.domain_eval_examples} leaves no training example "
                           f"of domain {name} ({len(texts)} examples)")
    return texts[:keep], texts[keep:]


@torch.no_grad()
def held_out_loss(loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], data: Dataset, collate: Callable,
                  batch_size: int) -> float:
    """Token-weighted mean loss of a dataset, `batch_size` examples per forward pass."""
    total = tokens = 0.0
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        count = float((batch["labels"][:, 1:] != -100).sum())
        total += float(loss_fn(batch)) * count
        tokens += count
    return total / tokens


class DomainBatches:
    """Per-domain sampler passes; `take(domain)` gives that domain's next batch indices."""

    def __init__(self, sizes: Sequence[int], batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.samplers = [DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True,
                                            seed=seed, drop_last=False) for size in sizes]
        self.batch_size = batch_size
        self.passes = [0] * len(sizes)
        self.positions = [0] * len(sizes)
        self._orders: dict[int, list[int]] = {}

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(sum(len(sampler) for sampler in self.samplers) / self.batch_size)

    def take(self, domain: int) -> list[int]:
        if domain not in self._orders:
            self.samplers[domain].set_epoch(self.passes[domain])
            self._orders[domain] = list(self.samplers[domain])
        order, start = self._orders[domain], self.positions[domain]
        indices = order[start:start + self.batch_size]
        self.positions[domain] = start + len(indices)
        if self.positions[domain] >= len(order):
            self.passes[domain] += 1
            self.positions[domain] = 0
            del self._orders[domain]
        return indices

    def state_dict(self) -> dict[str, Any]:
        return {"passes": list(self.passes), "positions": list(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.passes, self.positions = list(state["passes"]), list(state["positions"])
        self._orders.clear()


def draw_domain(proportions: Sequence[float], seed: int, step: int) -> int:
    """The domain of optimizer step `step` (from 1): one draw from the step's own generator."""
    if len(proportions) == 1:
        return 0
    generator = torch.Generator().manual_seed(seed * DRAW_SEED_STRIDE + step)
    return int(torch.multinomial(torch.tensor(proportions, dtype=torch.float64), 1, generator=generator))


def _mean_over_ranks(value: float) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor) / dist.get_world_size()


class DomainMixture:
    """The domains of one stage-2 run: data, proportions, DRO state, the log and the per-domain result."""

    def __init__(self, config, make_dataset: Callable[[list[str]], Dataset], collate: Callable, rank: int,
                 world_size: int) -> None:
        self.config = config
        self.names = domain_labels(config.domains)
        self.train: list[Dataset] = []
        self.held_out: list[Dataset] = []
        for entry in config.domains:
            train, held_out = split_domain(config, entry)
            self.train.append(make_dataset(train))
            self.held_out.append(make_dataset(held_out))
        self.collate = collate
        self.batches = DomainBatches([len(d) for d in self.train], config.per_device_train_batch_size, rank,
                                     world_size, config.seed)
        initial = config.domain_proportions or [1.0 / len(self.names)] * len(self.names)
        total = sum(initial)
        self.initial = [value / total for value in initial]
        self.dro: DroState | None = None
        self.train_loss = LossEma(len(self.names), config.dro_ema)
        self.steps_drawn = [0] * len(self.names)
        self.step = 0
        self.dense_losses: list[float] | None = None
        self.log_rows: list[dict[str, Any]] = []

    # ---------- set-up and resume ----------
    def start(self, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], state: dict[str, Any] | None,
              log_dir: Path | None) -> None:
        """Dense reference losses (fresh run) or the saved mixture state (resume); `log_dir` (rank 0 only)
        receives the proportions CSV at every update."""
        self.loss_fn = loss_fn
        self.log_dir = log_dir
        if state:
            self.dense_losses = state["dense_losses"]
            self.step, self.steps_drawn, self.log_rows = state["step"], state["steps_drawn"], state["log_rows"]
            self.batches.load_state_dict(state["batches"])
            self.train_loss.values = list(state["train_loss"])
        elif self.config.domain_eval_examples:
            self.dense_losses = self.held_out_losses()
        if self.config.domain_mixing == "dro":
            reference = self.config.dro_reference_losses or self.dense_losses
            settings = DroSettings(rho=self.config.dro_rho, min_prob=self.config.dro_min_prob)
            self.dro = DroState(self.initial, reference, settings, self.config.dro_smoothing)
            if state:
                self.dro.load_state_dict(state["dro"])
        if not self.log_rows:
            self._log(None)

    def state_dict(self) -> dict[str, Any]:
        return {"dense_losses": self.dense_losses, "step": self.step, "steps_drawn": self.steps_drawn,
                "log_rows": self.log_rows, "batches": self.batches.state_dict(),
                "train_loss": self.train_loss.values, "dro": self.dro.state_dict() if self.dro else None}

    @property
    def proportions(self) -> list[float]:
        return self.dro.proportions.tolist() if self.dro else self.initial

    @property
    def examples(self) -> int:
        return sum(len(d) for d in self.train)

    # ---------- training ----------
    def epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch; call `after_step` with each step's loss."""
        for _ in range(self.batches.steps_per_epoch):
            domain = draw_domain(self.proportions, self.config.seed, self.step + 1)
            indices = self.batches.take(domain)
            self.current = domain
            yield self.collate([self.train[domain][i] for i in indices])

    def after_step(self, loss: float) -> None:
        self.step += 1
        self.steps_drawn[self.current] += 1
        loss = _mean_over_ranks(loss)
        self.train_loss.observe(self.current, loss)
        if self.dro is None or self.step % self.config.dro_update_interval:
            return
        losses = self.held_out_losses() if self.config.dro_loss == "validation" else list(self.train_loss.values)
        if self.dro.update(losses) is not None:
            self._log(losses)

    def held_out_losses(self) -> list[float]:
        """Each domain's held-out loss (the same data on every rank)."""
        return [held_out_loss(self.loss_fn, data, self.collate, self.config.per_device_train_batch_size)
                for data in self.held_out]

    # ---------- log and result ----------
    def _log(self, losses: Sequence[float | None] | None) -> None:
        row: dict[str, Any] = {"step": self.step}
        row.update({f"p_{name}": round(p, 6) for name, p in zip(self.names, self.proportions)})
        row.update({f"loss_{name}": None if losses is None else losses[i] for i, name in enumerate(self.names)})
        self.log_rows.append(row)
        if self.log_dir is not None:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=list(self.log_rows[0]))
            writer.writeheader()
            writer.writerows(self.log_rows)
            with atomic_path(self.log_dir / PROPORTIONS_CSV) as tmp:
                tmp.write_text(buffer.getvalue())

    def write_log(self) -> tuple[Path, Path]:
        """The final row of the proportions CSV, and its plot (rank 0, atomic writes)."""
        if self.log_rows[-1]["step"] != self.step:
            self._log(self.train_loss.values)
        plot_path = self.log_dir / PROPORTIONS_PLOT
        plot_proportions(self.log_rows, self.names, plot_path, self.config.domain_mixing)
        return self.log_dir / PROPORTIONS_CSV, plot_path

    def summary(self) -> dict[str, Any]:
        """Every domain's numbers; relative perplexity = exp(final - dense held-out loss)."""
        final = self.held_out_losses() if self.config.domain_eval_examples else None
        domains = {}
        for index, name in enumerate(self.names):
            entry = {"train_examples": len(self.train[index]), "held_out_examples": len(self.held_out[index]),
                     "steps": self.steps_drawn[index], "initial_proportion": self.initial[index],
                     "final_proportion": self.proportions[index], "train_loss_ema": self.train_loss.values[index]}
            if final is not None:
                entry.update(dense_loss=self.dense_losses[index], final_loss=final[index],
                             dense_perplexity=math.exp(self.dense_losses[index]), perplexity=math.exp(final[index]),
                             relative_perplexity=math.exp(final[index] - self.dense_losses[index]))
            domains[name] = entry
        result: dict[str, Any] = {"domain_mixing": self.config.domain_mixing, "domains": domains}
        if final is not None:
            result.update(worst_and_mean(domains))
        return result


def worst_and_mean(domains: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The domain of largest relative perplexity, and the mean over domains (for "at equal average")."""
    relative = {name: entry["relative_perplexity"] for name, entry in domains.items()}
    worst = max(relative, key=relative.get)
    return {"worst_domain": {"name": worst, "relative_perplexity": relative[worst]},
            "mean_relative_perplexity": sum(relative.values()) / len(relative)}


def plot_proportions(rows: list[dict[str, Any]], names: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    steps = [row["step"] for row in rows]
    for name in names:
        axes.plot(steps, [row[f"p_{name}"] for row in rows], drawstyle="steps-post", marker="o", markersize=3,
                  label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("sampling proportion")
    axes.set_title(f"domain proportions ({title})")
    axes.set_ylim(0, 1)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
