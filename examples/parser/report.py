"""The results table (markdown) and the learning-curve plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from parser.metrics import AttachmentScores
from parser.training import History

_LABELS = {
    "crf": "non-projective tree CRF",
    "projective": "projective tree CRF",
    "local": "local head selection",
}


@dataclass
class Row:
    """One (model, decoder) line of the table; ``test`` is None for a decoder not run."""

    model: str
    decoder: str
    dev_uas: float | None
    test: AttachmentScores | None
    best_epoch: int
    seconds: float
    note: str = ""


def results_table(name: str, rows: Sequence[Row]) -> str:
    """Format test UAS (with / without punctuation), root accuracy and well-formed trees."""
    first = next((r.test for r in rows if r.test is not None), AttachmentScores())
    lines = [
        f"Test scores on {name}: {first.sentences} sentences, {first.words} words "
        f"({first.words_no_punct} without punctuation); model selected on dev UAS",
        "",
        "| model | decoder | dev UAS | test UAS | UAS w/o punct | root acc. | well-formed "
        "| epoch | train time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r.test
        cells = ["-"] * 4
        if t is not None:
            shares = (t.uas, t.uas_no_punct, t.root_accuracy, t.well_formed_share)
            cells = [f"{x:.4f}" for x in shares]
        dev = f"{r.dev_uas:.4f}" if r.dev_uas is not None else "-"
        label = _LABELS.get(r.model, r.model) + (f" ({r.note})" if r.note else "")
        lines.append(
            f"| {label} | {r.decoder} | {dev} | " + " | ".join(cells)
            + f" | {r.best_epoch} | {r.seconds:.0f} s |"
        )  # fmt: skip
    return "\n".join(lines)


def plot_learning_curves(curves: dict[str, History], path: Path) -> Path:
    """Plot dev UAS and training loss per epoch for each model; save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax_uas, ax_loss) = plt.subplots(1, 2, figsize=(8, 3.2))
    for model, h in curves.items():
        ax_uas.plot(h.epoch, h.dev_uas, marker="o", label=model)
        ax_loss.plot(h.epoch, h.train_loss, marker="o", label=model)
    ax_uas.set_xlabel("epoch")
    ax_uas.set_ylabel("dev UAS")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss per word")
    ax_loss.set_yscale("log")
    for ax in (ax_uas, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
