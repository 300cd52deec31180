"""Results table next to reference baselines, and the learning-curve plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tagger.spans import SpanScores
from tagger.training import History, Scores

# Reference figures quoted from the shared data README (not re-run by this script): the same
# split and the same 89 base tags.
REFERENCES: list[tuple[str, float, str]] = [
    ("python-crfsuite, L-BFGS 100 it. (reference)", 0.9476, "86 s"),
    ("NLTK bigram backoff tagger (reference)", 0.845, "-"),
]


def _fmt(x: float, present: bool) -> str:
    return f"{x:>8.4f}" if present else f"{'-':>8}"


def results_table(
    name: str,
    rows: Sequence[tuple[str, Scores, float, SpanScores | None]],
    references: Sequence[tuple[str, float, str]],
    scheme: str | None = None,
) -> str:
    """Format test accuracy (overall, known, unknown words), span P/R/F1 and training time.

    "-" marks a column with nothing to measure (no unknown words in the test set; spans
    without a span scheme; quoted reference figures).
    """
    first = rows[0][1] if rows else Scores()
    has_unknown = first.unknown_total > 0
    spans = scheme is not None
    head = f"{'model':<46} {'overall':>8} {'known':>8} {'unknown':>8}"
    if spans:
        head += f" {'span P':>8} {'span R':>8} {'span F1':>8}"
    head += f" {'train time':>11}"
    title = (
        f"Test accuracy on {name}: {first.total} tokens "
        f"({first.known_total} known, {first.unknown_total} unknown words)"
    )
    if spans:
        gold = rows[0][3].gold if rows and rows[0][3] is not None else 0
        title += f"; {gold} gold {scheme} spans (conlleval), constraints applied"
    lines = [title, head, "-" * len(head)]
    for label, s, seconds, sp in rows:
        line = f"{label:<46} {s.accuracy:>8.4f} {s.known:>8.4f} {_fmt(s.unknown, has_unknown)}"
        if spans:
            ok = sp is not None
            line += (
                f" {_fmt(sp.precision if ok else 0, ok)} {_fmt(sp.recall if ok else 0, ok)}"
                f" {_fmt(sp.f1 if ok else 0, ok)}"
            )
        lines.append(line + f" {seconds:>9.0f} s")
    for label, acc, time in references:
        line = f"{label:<46} {acc:>8.4f} {'-':>8} {'-':>8}"
        if spans:
            line += f" {'-':>8} {'-':>8} {'-':>8}"
        lines.append(line + f" {time:>11}")
    return "\n".join(lines)


def plot_learning_curves(
    curves: dict[str, History], path: Path, reference: float | None = None
) -> Path:
    """Plot dev accuracy and training loss per epoch for each head; save a PNG.

    ``reference``: a quoted test accuracy drawn as a dashed line (the Brown default only).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(8, 3.2))
    for head, h in curves.items():
        ax_acc.plot(h.epoch, h.dev_accuracy, marker="o", label=head)
        ax_loss.plot(h.epoch, h.train_loss, marker="o", label=head)
    if reference is not None:
        ax_acc.axhline(
            reference, color="gray", linestyle="--", linewidth=1, label="crfsuite (test, ref.)"
        )
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("dev token accuracy")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss per token")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
