"""Training loop, evaluation, checkpoints and DistributedDataParallel plumbing."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tagger.features import Encoded, Vocab, collate, length_sorted_batches
from tagger.model import Tagger, TaggerConfig


@dataclass
class Dist:
    """Where this process sits in a torchrun job (world of one without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, local_rank=local_rank)


@dataclass
class Scores:
    """Token accuracy overall and on words seen / not seen in training."""

    correct: int = 0
    total: int = 0
    known_correct: int = 0
    known_total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def known(self) -> float:
        return self.known_correct / max(self.known_total, 1)

    @property
    def unknown(self) -> float:
        return (self.correct - self.known_correct) / max(self.total - self.known_total, 1)

    @property
    def unknown_total(self) -> int:
        return self.total - self.known_total


@torch.no_grad()
def evaluate(
    model: Tagger, items: Sequence[Encoded], batch_size: int, device: torch.device
) -> tuple[Scores, list[list[int]]]:
    """Tag ``items`` and score against their gold tags (unknown gold tags count as errors)."""
    was_training = model.training
    model.eval()
    scores = Scores()
    predictions: list[list[int]] = [[] for _ in items]
    for idx in length_sorted_batches(items, batch_size):
        batch = collate([items[i] for i in idx]).to(device)
        pred = model.predict(batch)
        mask = torch.arange(batch.words.shape[1], device=device) < batch.lengths.unsqueeze(1)
        hit = (pred == batch.tags) & mask
        scores.correct += int(hit.sum())
        scores.total += int(mask.sum())
        scores.known_correct += int((hit & batch.known).sum())
        scores.known_total += int((mask & batch.known).sum())
        for row, i in enumerate(idx):
            predictions[i] = pred[row, : int(batch.lengths[row])].tolist()
    model.train(was_training)
    return scores, predictions


@dataclass
class History:
    """Per-epoch learning curve: training loss and the dev-split scores used for selection."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    dev_accuracy: list[float] = field(default_factory=list)
    dev_f1: list[float] = field(default_factory=list)  # span F1 (empty without a span scheme)
    train_seconds: list[float] = field(default_factory=list)

    def selection(self) -> list[float]:
        """The model-selection metric per epoch: dev span F1 if scored, else dev accuracy."""
        return self.dev_f1 if self.dev_f1 else self.dev_accuracy

    @property
    def best_epoch(self) -> int:
        metric = self.selection()
        return self.epoch[max(range(len(metric)), key=metric.__getitem__)] if metric else 0


def save_checkpoint(
    path: Path,
    model: Tagger,
    optimizer: torch.optim.Optimizer,
    vocab: Vocab,
    history: History,
    best: dict[str, torch.Tensor],
) -> None:
    """Write everything needed to resume training or tag new text, atomically.

    ``model`` is the latest state (resuming continues from it, with the optimizer and the random
    generator's state); ``best`` the state of the best dev epoch (what ``--tag`` uses).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "config": model.config.to_dict(),
            "model": model.state_dict(),
            "best_model": best,
            "optimizer": optimizer.state_dict(),
            "vocab": vocab.state_dict(),
            "history": history.__dict__,
            "rng": torch.get_rng_state(),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: torch.device) -> dict[str, object]:
    """Load a checkpoint written by `save_checkpoint` (plain tensors and containers)."""
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r} does not exist; train first")
    return torch.load(path, map_location=device, weights_only=True)


def model_from_checkpoint(state: dict[str, object], device: torch.device) -> tuple[Tagger, Vocab]:
    """The best-dev-epoch model of a checkpoint and its vocabulary."""
    config = TaggerConfig(**state["config"])  # type: ignore[arg-type]
    model = Tagger(config).to(device)
    model.load_state_dict(state.get("best_model", state["model"]))  # type: ignore[arg-type]
    vocab = Vocab.from_state_dict(state["vocab"])  # type: ignore[arg-type]
    return model, vocab


def param_groups(
    model: Tagger, lr: float, sparse_lr: float, sparse_decay: float = 0.0
) -> list[dict[str, object]]:
    """Give the sparse feature weights their own, larger step (and their own weight decay).

    Each sparse feature is active on few tokens, so its weight gets few updates per epoch;
    the neural part sees every token and wants a small step. Decoupled weight decay (AdamW)
    on the sparse weights shrinks the weights of rare features, which would otherwise fit the
    training set exactly, towards 0 (crfsuite's L2 term does that job).
    """
    sparse = [p for n, p in model.named_parameters() if n.startswith("feat_weights")]
    other = [p for n, p in model.named_parameters() if not n.startswith("feat_weights")]
    groups: list[dict[str, object]] = [
        {"params": other, "lr": lr, "base_lr": lr, "weight_decay": 0.0}
    ]
    if sparse:
        groups.append(
            {"params": sparse, "lr": sparse_lr, "base_lr": sparse_lr, "weight_decay": sparse_decay}
        )
    return groups


def sparse_parameters(model: Tagger) -> list[nn.Parameter]:
    """The sparse linear model's parameters: feature weights and the CRF's scores."""
    return [p for n, p in model.named_parameters() if n.startswith(("feat_weights", "crf"))]


def fit_sparse_lbfgs(
    model: Tagger,
    items: Sequence[Encoded],
    l2: float,
    iterations: int,
    device: torch.device,
    chunk: int = 512,
    l1: float = 0.0,
    l1_smoothing: float = 1e-3,
    start: Sequence[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Stage 1 of ``--sparse-init lbfgs``: the sparse CRF alone, by full-batch L-BFGS.

    Minimises ``-sum log p(y | x) + l1 sum_i s(w_i) + l2 ||w||^2`` over the sparse feature
    weights and the CRF scores (the neural part is switched off), crfsuite's objective with
    ``c1 = l1``, ``c2 = l2``. crfsuite minimises the exact L1 term by OWL-QN; here
    ``s(w) = sqrt(w^2 + eps^2) - eps`` (``eps = l1_smoothing``) is a smooth stand-in, within
    ``eps`` of ``|w|`` everywhere, so torch's L-BFGS applies (weights that L1 would set to 0
    end within a few ``eps`` of it). A convex problem, so this is the penalised
    maximum-likelihood sparse CRF whatever the starting point (a warm start only saves
    iterations; ``start``, in `sparse_parameters` order, is copied in first). The loss is
    summed over chunks of ``chunk`` sentences (one full-batch gradient per function
    evaluation). Afterwards the neural part starts from a zero output layer, so the joint
    model begins as this sparse CRF.

    Returns ``{"objective": final objective per token, "evaluations": closure calls}``.
    """
    params = sparse_parameters(model)
    if start is not None:
        with torch.no_grad():
            for p, q in zip(params, start, strict=True):
                p.copy_(q)
    # Chunks of similar length: padding costs as much as real tokens in the forward pass.
    chunks = length_sorted_batches(items, chunk)
    batches = [collate([items[i] for i in idx]).to(device) for idx in chunks]
    tokens = sum(int(b.lengths.sum()) for b in batches)
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=iterations, history_size=10, line_search_fn="strong_wolfe",
        tolerance_grad=1e-9, tolerance_change=1e-12,
    )  # fmt: skip
    calls, last = 0, float("nan")

    def closure() -> torch.Tensor:
        nonlocal calls, last
        calls += 1
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for batch in batches:
            loss = model(batch) * batch.lengths.sum() / tokens  # mean NLL per token, summed
            loss.backward()
            total = total + loss.detach()
        penalty = l2 / tokens * sum((p * p).sum() for p in params)
        if l1 > 0:
            eps = l1_smoothing
            penalty = penalty + l1 / tokens * sum(
                ((p * p + eps * eps).sqrt() - eps).sum() for p in params
            )
        penalty.backward()
        last = float(total + penalty.detach())
        return total + penalty.detach()

    model.train()
    model.sparse_only = True
    dropout = model.config.feature_dropout
    model.config.feature_dropout = 0.0  # a deterministic objective for the line search
    try:
        optimizer.step(closure)  # returns the first objective; ``last`` is the final one
    finally:
        model.sparse_only = False
        model.config.feature_dropout = dropout
    if model.config.neural:  # the joint model starts as the sparse CRF
        nn.init.zeros_(model.proj.weight)
        nn.init.zeros_(model.proj.bias)
    return {"objective": last, "evaluations": float(calls)}


def learning_rate(base: float, step: int, horizon: int) -> float:
    """Exponential decay by 10x every ``horizon`` optimizer steps (no warm-up needed).

    A function of the step alone, not of the number of epochs planned, so training resumed
    after 2 epochs for 3 more follows the schedule of 5 epochs in one go.
    """
    return base * 0.1 ** (step / max(horizon, 1))


def train_one_epoch(
    model: Tagger,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    items: Sequence[Encoded],
    batches: list[list[int]],
    device: torch.device,
    step0: int,
    horizon: int,
    progress: object | None = None,
) -> float:
    """Run one pass over ``batches``; return the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for k, idx in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(group["base_lr"], step0 + k, horizon)
        batch = collate([items[i] for i in idx]).to(device)
        loss = wrapped(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        total += float(loss.detach())
        count += 1
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
            progress.set_postfix(loss=f"{total / count:.3f}")  # type: ignore[attr-defined]
    return total / max(count, 1)


def epoch_batches(
    items: Sequence[Encoded], batch_size: int, seed: int, epoch: int, d: Dist
) -> list[list[int]]:
    """Every rank derives the same shuffled batches, then takes an equal share of them."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    batches = length_sorted_batches(items, batch_size, generator=g)
    per_rank = len(batches) // d.world
    return batches[d.rank : per_rank * d.world : d.world]


class Timer:
    """Wall-clock stopwatch."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start
