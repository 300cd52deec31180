"""Softmax, sparsemax, structured and SparseMAP attention on a task whose evidence is a span.

The task (synthetic, generated here): each position of a sequence holds a token with a colour
(one of C) and a bit. A query names a colour k. Somewhere in the sequence lies a hidden span of
L ∈ {3, 5, 7} consecutive positions; inside it most tokens have colour k (a few are noise of
another colour), outside it a few isolated distractor tokens also have colour k. The answer is
the majority bit over the span. Colour alone is noisy evidence of span membership; contiguity
resolves it: an isolated colour-k token is a distractor, a short gap inside a run is noise.

The keys are per-token embeddings with no contextual encoder, so contiguity can only come from
the attention layer: softmax and sparsemax select tokens independently, while structured
attention (Kim et al., arXiv:1702.00887) selects with a linear-chain CRF over binary selection
variables whose learned pairwise potentials favour runs; SparseMAP attention (Niculae et al.,
arXiv:1802.04223) takes the same chain's L2-regularized marginals, a sparse mixture of a few
selections whose weights are mostly exactly 0 or 1.

Run:
    python examples/structured_attention.py --out runs/attention
    python examples/structured_attention.py --smoke --out /tmp/attn   # seconds, for tests
Prints a test-accuracy table and saves ``attention_heatmap.png`` and ``results.json`` to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from structift.layers import StructuredAttention, attention_weights


@dataclass(frozen=True)
class TaskConfig:
    """Generator settings of the contiguous-span majority task."""

    colours: int = 6
    min_length: int = 16
    max_length: int = 24
    span_lengths: tuple[int, ...] = (3, 5, 7)
    inside_noise: float = 0.25  # P(token inside the span has another colour)
    distractors: float = 0.12  # P(token outside the span has the query colour)


@dataclass
class Batch:
    """One batch of the task; T = max_length."""

    colour: Tensor  # LongTensor [B, T], padding = 0
    bit: Tensor  # LongTensor [B, T], padding = 0
    lengths: Tensor  # LongTensor [B]
    query: Tensor  # LongTensor [B], the query colour
    span: Tensor  # BoolTensor [B, T], the hidden span
    answer: Tensor  # LongTensor [B], majority bit over the span


def make_batch(n: int, cfg: TaskConfig, generator: torch.Generator) -> Batch:
    """Sample ``n`` sequences of the contiguous-span majority task."""
    g = generator
    T = cfg.max_length
    lengths = torch.randint(cfg.min_length, cfg.max_length + 1, (n,), generator=g)
    query = torch.randint(0, cfg.colours, (n,), generator=g)
    spans = torch.tensor(cfg.span_lengths)
    span_len = spans[torch.randint(0, len(spans), (n,), generator=g)]
    start = (torch.rand(n, generator=g) * (lengths - span_len + 1)).long()
    pos = torch.arange(T)
    span = (pos >= start[:, None]) & (pos < (start + span_len)[:, None])
    valid = pos < lengths[:, None]
    # another colour than the query: shift by 1..C-1
    other = (query[:, None] + torch.randint(1, cfg.colours, (n, T), generator=g)) % cfg.colours
    u = torch.rand(n, T, generator=g)
    is_query = torch.where(span, u >= cfg.inside_noise, u < cfg.distractors)
    colour = torch.where(is_query, query[:, None], other) * valid
    bit = torch.randint(0, 2, (n, T), generator=g) * valid
    answer = ((bit * span).sum(1) * 2 > span_len).long()
    return Batch(colour, bit, lengths, query, span, answer)


class SpanReader(nn.Module):
    """Embed tokens, attend from the query colour, classify the context (2 classes)."""

    def __init__(self, cfg: TaskConfig, kind: str, gradient: str, dim: int = 16) -> None:
        super().__init__()
        self.token = nn.Embedding(2 * cfg.colours, dim)  # (colour, bit) pairs
        self.query = nn.Embedding(cfg.colours, dim)
        grad = gradient if kind == "structured" else "autograd"
        self.attention = StructuredAttention(dim, dim, kind=kind, gradient=grad)
        self.value = nn.Embedding(2 * cfg.colours, dim)
        self.out = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Return ``(logits [B, 2], weights [B, T])``."""
        tok = batch.colour * 2 + batch.bit
        q = self.query(batch.query)
        context, weights = self.attention(q, self.token(tok), self.value(tok), batch.lengths)
        return self.out(torch.cat([context, q], -1)), weights


def to(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to ``device``."""
    return Batch(*(getattr(batch, f).to(device) for f in Batch.__dataclass_fields__))


def train(
    kind: str, cfg: TaskConfig, args: argparse.Namespace, test: Batch, seed: int
) -> tuple[SpanReader, dict[str, Any]]:
    """Train one model on fresh batches and return it with its test metrics."""
    torch.manual_seed(seed)
    device = torch.device(args.device)
    model = SpanReader(cfg, kind, args.gradient).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"{kind} seed {seed}", leave=False, disable=args.smoke)
    for step in bar:
        batch = to(make_batch(args.batch_size, cfg, g), device)
        logits, _ = model(batch)
        loss = nn.functional.cross_entropy(logits, batch.answer)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        logits, weights = model(to(test, device))
        acc = (logits.argmax(-1).cpu() == test.answer).float().mean().item()
        w = weights.cpu()
        valid = torch.arange(w.shape[1]) < test.lengths[:, None]
        # how much weight lands on the hidden span, per unit of total weight
        on_span = ((w * test.span).sum(1) / w.sum(1).clamp_min(1e-12)).mean().item()
        pairwise = model.attention.pairwise
    metrics = {
        "accuracy": acc,
        "weight_on_span": on_span,
        "mean_total_weight": (w * valid).sum(1).mean().item(),
        "train_seconds": seconds,
    }
    if pairwise is not None:
        metrics["pairwise"] = pairwise.detach().cpu().tolist()
    if kind == "structured":
        metrics["gradient"] = args.gradient
    return model, metrics


def hand_set_reference(test: Batch, smoke: bool) -> dict[str, Any]:
    """Best test accuracy of structured attention with hand-set potentials (no training).

    Scores are ``a`` for a query-colour key and ``c`` otherwise, the pairwise potentials are
    ``[[0, w], [w, r]]``, and the answer is the sign of Σ_t w_t (2 bit_t − 1). The grid is
    searched on the test set itself, so this is a reference for what the layer can express on
    this task, not a fair competitor.
    """
    match = (test.colour == test.query[:, None]).double()
    sign = (2 * test.bit - 1).double()
    grid = (
        [(1.0, -3.0, -3.0, 1.0)]
        if smoke
        else [
            (a, c, w, r)
            for a in (1.0, 2.0, 3.0, 4.0)
            for c in (-1.0, -2.0, -3.0, -4.0)
            for w in (-1.0, -2.0, -3.0, -4.0)
            for r in (0.0, 1.0, 2.0)
        ]
    )
    best: dict[str, Any] = {"accuracy": -1.0}
    with torch.no_grad():
        for a, c, w, r in grid:
            binary = torch.tensor([[0.0, w], [w, r]], dtype=torch.float64)
            weights = attention_weights(a * match + c * (1 - match), test.lengths, binary=binary)
            pred = ((weights * sign).sum(1) > 0).long()
            acc = (pred == test.answer).double().mean().item()
            if acc > best["accuracy"]:
                best = {
                    "accuracy": acc,
                    "colour_score": a,
                    "other_score": c,
                    "pairwise": [[0.0, w], [w, r]],
                }
    return best


def heatmap(models: dict[str, SpanReader], test: Batch, path: Path, rows: int = 4) -> None:
    """Save, for a few test sequences, query-colour matches, the span and each kind's weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sub = Batch(*(getattr(test, f)[:rows] for f in Batch.__dataclass_fields__))
    T = int(sub.lengths.max())
    labels = ["query colour", "hidden span", *(f"{kind} (÷max)" for kind in models)]
    fig, axes = plt.subplots(rows, 1, figsize=(7.0, 1.25 * rows * len(labels) / 5 + 0.6))
    for r, ax in enumerate(axes):
        grid = [
            (sub.colour[r] == sub.query[r]).float()
            * (torch.arange(sub.colour.shape[1]) < sub.lengths[r]),
            sub.span[r].float(),
        ]
        with torch.no_grad():
            for model in models.values():
                device = next(model.parameters()).device
                w = model(to(sub, device))[1][r].cpu()
                # softmax weights sum to one and would look dark: show each row / its max
                grid.append(w / w.max().clamp_min(1e-12))
        image = torch.stack(grid)[:, :T].numpy()
        ax.imshow(image, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xticks(range(0, T, 2), [str(t) for t in range(0, T, 2)], fontsize=6)
        ax.set_title(f"query colour {int(sub.query[r])}, answer {int(sub.answer[r])}", fontsize=8)
    axes[-1].set_xlabel("position t", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/structured_attention"))
    p.add_argument(
        "--kinds", nargs="+", default=["softmax", "sparsemax", "structured", "sparsemap"]
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed")
    p.add_argument(
        "--gradient",
        default="autograd",
        choices=["autograd", "ift"],
        help="how structured attention is differentiated (autograd: faster here, see docs)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--smoke", action="store_true", help="tiny run for tests (seconds)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.test_size = 20, 64
    return args


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Average the metrics of several seeds; keep the runs."""
    acc = [r["accuracy"] for r in runs]
    out: dict[str, Any] = {
        key: statistics.fmean(r[key] for r in runs)
        for key in ("accuracy", "weight_on_span", "mean_total_weight", "train_seconds")
    }
    out.update(accuracy_min=min(acc), accuracy_max=max(acc), runs=runs)
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Train each kind of attention, print the accuracy table, save the heatmap."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TaskConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    test = make_batch(args.test_size, cfg, torch.Generator().manual_seed(12345))
    models, results = {}, {}
    for kind in args.kinds:
        runs = []
        for seed in args.seeds:
            model, metrics = train(kind, cfg, args, test, seed)
            models.setdefault(kind, model)  # the heatmap shows the first seed's model
            runs.append({"seed": seed, **metrics})
        results[kind] = summarize(runs)
    reference = hand_set_reference(test, args.smoke)
    chance = max(test.answer.float().mean().item(), 1 - test.answer.float().mean().item())
    print(
        f"\ncontiguous-span majority task: {args.steps} steps x {args.batch_size}, "
        f"{args.test_size} test sequences, majority-class rate {chance:.3f}, "
        f"seeds {args.seeds} (mean, [min, max]), structured gradient {args.gradient!r}"
    )
    print("| attention | test accuracy | weight on span | total weight | train s |")
    print("|---|---|---|---|---|")
    for kind, m in results.items():
        spread = (
            f" [{m['accuracy_min']:.3f}, {m['accuracy_max']:.3f}]" if len(args.seeds) > 1 else ""
        )
        print(
            f"| {kind} | {m['accuracy']:.3f}{spread} | {m['weight_on_span']:.3f} | "
            f"{m['mean_total_weight']:.2f} | {m['train_seconds']:.1f} |"
        )
    print(
        f"| (structured, hand-set potentials, best of a grid on the test set) | "
        f"{reference['accuracy']:.3f} | | | |"
    )
    heatmap(models, test, args.out / "attention_heatmap.png")
    saved = {**results, "hand_set_reference": reference}
    (args.out / "results.json").write_text(json.dumps(saved, indent=2))
    print(f"saved {args.out / 'attention_heatmap.png'} and {args.out / 'results.json'}")
    if not all(math.isfinite(m["accuracy"]) for m in results.values()):
        raise RuntimeError("non-finite accuracy")
    return results


if __name__ == "__main__":
    main()
