"""Training loop, evaluation per decoder, checkpoints and the per-epoch learning curve."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tagger.features import length_sorted_batches
from tagger.training import learning_rate
from torch import nn

from parser.features import Encoded, Vocab, collate
from parser.metrics import AttachmentScores
from parser.model import Parser, ParserConfig


@dataclass
class History:
    """Per-epoch learning curve: training loss, dev UAS (the selection metric), seconds."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    dev_uas: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)

    @property
    def best_epoch(self) -> int:
        """The epoch with the best dev UAS (the first one on ties); 0 before training."""
        if not self.dev_uas:
            return 0
        return self.epoch[max(range(len(self.dev_uas)), key=self.dev_uas.__getitem__)]


@torch.no_grad()
def evaluate(
    model: Parser,
    items: Sequence[Encoded],
    decoder: str,
    device: torch.device,
    batch_size: int = 64,
) -> tuple[AttachmentScores, list[list[int]]]:
    """Parse ``items`` with ``decoder``; return the scores and the heads of words ``1 … n``."""
    was_training = model.training
    model.eval()
    scores = AttachmentScores()
    predictions: list[list[int]] = [[] for _ in items]
    for idx in length_sorted_batches(items, batch_size):
        batch = collate([items[i] for i in idx]).to(device)
        pred = model.decode(batch, decoder).cpu()
        for row, i in enumerate(idx):
            n = int(batch.lengths[row])
            heads = pred[row, 1 : n + 1].tolist()
            predictions[i] = heads
            scores.add(items[i].heads[1:], heads, items[i].punct[1:])
    model.train(was_training)
    return scores, predictions


def train_one_epoch(
    model: Parser,
    optimizer: torch.optim.Optimizer,
    items: Sequence[Encoded],
    batches: list[list[int]],
    device: torch.device,
    step0: int,
    horizon: int,
    progress: object | None = None,
) -> float:
    """Run one pass over ``batches`` (learning rate 10x lower every ``horizon`` steps)."""
    model.train()
    total, count = 0.0, 0
    for k, idx in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(group["base_lr"], step0 + k, horizon)
        loss = model(collate([items[i] for i in idx]).to(device))
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


def epoch_batches(items: Sequence[Encoded], batch_size: int, seed: int, epoch: int) -> list:
    """Length-sorted batches in an order fixed by ``(seed, epoch)`` (resumable)."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return length_sorted_batches(items, batch_size, generator=g)


def make_optimizer(model: Parser, lr: float) -> torch.optim.Optimizer:
    """Adam with β₂ = 0.9, as Dozat & Manning (2017) use for the biaffine parser."""
    return torch.optim.Adam(
        [{"params": list(model.parameters()), "lr": lr, "base_lr": lr}], betas=(0.9, 0.9)
    )


def save_checkpoint(
    path: Path,
    model: Parser,
    optimizer: torch.optim.Optimizer,
    vocab: Vocab,
    history: History,
    best: dict[str, torch.Tensor],
) -> None:
    """Write what resuming and ``--parse`` need, atomically.

    ``model`` is the latest state (resuming continues from it, with the optimizer and the
    random generator); ``best`` is the state of the best dev epoch (``--parse`` and the test
    scores use it).
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


def model_from_checkpoint(state: dict[str, object], device: torch.device) -> tuple[Parser, Vocab]:
    """The best-dev-epoch model of a checkpoint and its vocabulary."""
    model = Parser(ParserConfig(**state["config"])).to(device)  # type: ignore[arg-type]
    model.load_state_dict(state["best_model"])  # type: ignore[arg-type]
    model.eval()
    return model, Vocab.from_state_dict(state["vocab"])  # type: ignore[arg-type]
