"""Results table next to reference baselines, and the learning-curve plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tagger.training import History, Scores

# Reference figures quoted from the shared data README (not re-run by this script): the same
# split and the same 89 base tags.
REFERENCES: list[tuple[str, float, str]] = [
    ("python-crfsuite, L-BFGS 100 it. (reference)", 0.9476, "86 s"),
    ("NLTK bigram backoff tagger (reference)", 0.845, "-"),
]


def results_table(
    name: str,
    rows: Sequence[tuple[str, Scores, float]],
    references: Sequence[tuple[str, float, str]],
) -> str:
    """Format test accuracy (overall, known words, unknown words) and training time."""
    first = rows[0][1] if rows else Scores()
    lines = [
        f"Test accuracy on {name}: {first.total} tokens "
        f"({first.known_total} known, {first.unknown_total} unknown words)",
        f"{'model':<46} {'overall':>8} {'known':>8} {'unknown':>8} {'train time':>11}",
        "-" * 85,
    ]
    for label, s, seconds in rows:
        lines.append(
            f"{label:<46} {s.accuracy:>8.4f} {s.known:>8.4f} {s.unknown:>8.4f} {seconds:>9.0f} s"
        )
    for label, acc, time in references:
        lines.append(f"{label:<46} {acc:>8.4f} {'-':>8} {'-':>8} {time:>11}")
    return "\n".join(lines)


def plot_learning_curves(curves: dict[str, History], path: Path) -> Path:
    """Plot test accuracy and training loss per epoch for each head; save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(8, 3.2))
    for head, h in curves.items():
        ax_acc.plot(h.epoch, h.test_accuracy, marker="o", label=head)
        ax_loss.plot(h.epoch, h.train_loss, marker="o", label=head)
    ax_acc.axhline(0.9476, color="gray", linestyle="--", linewidth=1, label="crfsuite (ref.)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test token accuracy")
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
