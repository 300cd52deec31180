"""Training by minibatched marginal likelihood, perplexity evaluation, checkpoints."""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from hmm_lm.data import batches
from hmm_lm.model import HMMLM, ModelConfig


@dataclass
class History:
    """Per-epoch training loss (nats/token), validation perplexity and training seconds."""

    train_loss: list[float] = field(default_factory=list)
    valid_ppl: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def best_epoch(self) -> int:
        """1-based epoch with the lowest validation perplexity (0 before any epoch)."""
        if not self.valid_ppl:
            return 0
        return min(range(len(self.valid_ppl)), key=self.valid_ppl.__getitem__) + 1


@torch.no_grad()
def perplexity(model: HMMLM, seqs: Sequence[Sequence[int]], max_tokens: int) -> float:
    """``exp(-sum_x log p(x) / tokens)`` over ``seqs`` (every token and ``</s>`` counted)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for x, lengths in batches(seqs, max_tokens, shuffle=False):
        total += float(model(x, lengths).sum())
        tokens += int(lengths.sum())
    model.train(was_training)
    return math.exp(-total / max(tokens, 1))


def train_epoch(
    model: HMMLM,
    optimizer: torch.optim.Optimizer,
    seqs: Sequence[Sequence[int]],
    max_tokens: int,
    generator: torch.Generator,
    progress: bool,
    desc: str,
    clip: float = 5.0,
) -> float:
    """One pass over shuffled length-bucketed batches; return the mean loss per token.

    The loss of a batch is ``-sum_b log p(x_b) / #tokens`` (the HMM's log-partition), with
    gradient-norm clipping at ``clip``.
    """
    model.train()
    data = batches(seqs, max_tokens, shuffle=True, generator=generator)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc=desc, leave=False)
    total, tokens = 0.0, 0
    for x, lengths in data:
        n = int(lengths.sum())
        loss = -model(x, lengths, generator).sum() / n
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: non-finite training loss {float(loss)}.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        total, tokens = total + float(loss.detach()) * n, tokens + n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total / tokens):.1f}")
    if bar is not None:
        bar.close()
    return total / max(tokens, 1)


@dataclass
class Fit:
    """A finished run: the best-validation model, its history and the checkpoint path."""

    model: HMMLM
    history: History
    checkpoint: Path


def fit(
    model: HMMLM,
    data: dict[str, list[list[int]]],
    epochs: int,
    lr: float,
    max_tokens: int,
    seed: int,
    checkpoint: Path,
    progress: bool = True,
    resume: bool = False,
) -> Fit:
    """Train for ``epochs`` with Adam, evaluate validation perplexity after each epoch, keep
    the best-validation weights (saved with the history to ``checkpoint`` every epoch)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history, best = History(), copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    if resume and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best = History(**state["history"]), state["best"]
        generator.set_state(state["generator"])
        print(f"resumed from {checkpoint} after epoch {len(history.valid_ppl)}")
    elif resume:
        warnings.warn(
            f"--resume: no checkpoint at {checkpoint}; training from scratch.", stacklevel=2
        )
    for epoch in range(len(history.valid_ppl), epochs):
        start = time.perf_counter()
        desc = f"epoch {epoch + 1}/{epochs}"
        loss = train_epoch(model, optimizer, data["train"], max_tokens, generator, progress, desc)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, data["valid"], max_tokens * 2)
        history.train_loss.append(loss)
        history.valid_ppl.append(ppl)
        history.seconds.append(seconds)
        if history.best_epoch == epoch + 1:
            best = copy.deepcopy(model.state_dict())
        print(
            f"{desc}: train ppl {math.exp(loss):.1f}, valid ppl {ppl:.1f}, {seconds:.0f} s",
            flush=True,
        )
        save_checkpoint(checkpoint, model, optimizer, history, best, generator)
    model.load_state_dict(best)
    return Fit(model, history, checkpoint)


def save_checkpoint(
    path: Path,
    model: HMMLM,
    optimizer: torch.optim.Optimizer,
    history: History,
    best: dict[str, Tensor],
    generator: torch.Generator,
) -> None:
    """Write model, optimizer, best weights, history, config and RNG state to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "best": best,
        "history": asdict(history),
        "config": asdict(model.config),
        "generator": generator.get_state(),
    }
    torch.save(state, path)


def config_name(config: ModelConfig) -> str:
    """A short run name, e.g. ``lowrank-Z1024-r128`` or ``blocked-Z512-M16-neural``."""
    name = f"{config.kind}-Z{config.states}"
    if config.kind in ("lowrank", "blocked-lowrank"):
        name += f"-r{config.rank}"
    if config.kind.startswith("blocked"):
        name += f"-M{config.clusters}"
    if config.neural:
        name += "-neural"
    if config.dropout > 0:
        name += f"-drop{config.dropout:g}"
    return name
