"""Saved results (``results.jsonl``), the markdown table (``results.md``) and the plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from hmm_lm.data import SPLIT_RULE

COLUMNS = ("model", "states", "rank", "parameters", "valid ppl", "test ppl", "time/epoch")


def append_result(out: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Append ``row`` to ``out/results.jsonl`` (replacing an earlier row of the same
    ``name``), rewrite ``out/results.md`` and return every saved row."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in load_results(out) if r["name"] != row["name"]] + [row]
    with (out / "results.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (out / "results.md").write_text(results_table(rows) + "\n")
    return rows


def load_results(out: Path) -> list[dict[str, Any]]:
    """The rows saved in ``out/results.jsonl`` (none if the file is absent)."""
    path = out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cell(row: dict[str, Any], column: str) -> str:
    value = row.get(column)
    if value is None or (value == 0 and column in ("rank", "states")):
        return "-"
    if column in ("valid ppl", "test ppl"):
        return f"{value:.1f}"
    if column == "time/epoch":
        return f"{value:.0f} s"
    if column == "parameters":
        return f"{value / 1e6:.2f} M"
    return str(value)


def results_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of ``rows``, headed by the data description of the first row."""
    data = rows[0].get("data", "") if rows else ""
    lines = [
        f"Brown corpus LM, split {SPLIT_RULE}; {data}. Perplexity per token, `</s>` included.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _epochs(row: dict[str, Any]) -> int | str:
    """Epochs trained (rows saved before the field existed: read from the label)."""
    if "epochs" in row:
        return row["epochs"]
    label = row.get("model", "")
    return label.rsplit("/", 1)[-1].rstrip(")") if "/" in label else "?"


def plot_results(out: Path, path: Path | None = None) -> Path:
    """Perplexity vs Z (log2 axis) per HMM family from ``out/results.jsonl``, the n-gram
    baselines as horizontal lines; save a PNG (``out/ppl_vs_states.png`` by default)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_results(out)
    path = path or out / "ppl_vs_states.png"
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    families: dict[str, list[tuple[int, float]]] = {}
    styles = iter(["--", ":", "-.", (0, (5, 5))] * 4)
    for r in rows:
        if r.get("family") == "ngram":
            ax.axhline(r["test ppl"], linestyle=next(styles), color="gray", linewidth=1,
                       label=f"{r['model']}: {r['test ppl']:.1f}")  # fmt: skip
        elif math.isfinite(r["test ppl"]):
            # Runs of different lengths are different curves: epochs are part of the family.
            family = f"{r['family']}, {_epochs(r)} ep."
            families.setdefault(family, []).append((r["states"], r["test ppl"]))
    for family, points in sorted(families.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=family)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden states Z")
    ax.set_ylabel("test perplexity")
    ax.set_title("HMM language models on Brown", fontsize=9)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the data
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
