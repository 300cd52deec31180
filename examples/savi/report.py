"""Markdown tables and matplotlib figures for the SA-VAE example."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LABELS = {
    "vae": "VAE (amortized)",
    "savi": "SA-VAE (unrolled)",
    "ift": "IFT (custom_root)",
}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def agreement_table(rows: list[dict]) -> str:
    """Gradient agreement against K, one row per (K, outer objective)."""
    body = [
        [
            str(r["K"]),
            r["outer"],
            f"{r['stationarity']:.1e}",
            f"{r['rel_diff']:.1e}",
            f"{r['lam0_unrolled']:.1e}",
            f"{r['lam0_ift']:.0e}" if r["lam0_ift"] else "0",
            f"{r['cg_iters']}",
            f"{r['cg_residual']:.1e}",
        ]
        for r in rows
    ]
    header = [
        "K",
        "outer",
        "max ‖∇λ ELBO(λ_K)‖",
        "‖dθ unrolled − dθ IFT‖ / ‖dθ IFT‖",
        "‖dλ₀‖ unrolled",
        "‖dλ₀‖ IFT",
        "solver iters",
        "solver residual",
    ]
    return _table(header, body)


def cost_table(rows: list[dict]) -> str:
    """Graph bytes and time per step against K for both methods."""
    by = {(r["K"], r["method"]): r for r in rows}
    body = []
    for K in sorted({r["K"] for r in rows}):
        u, i = by[K, "unrolled"], by[K, "ift"]
        body.append(
            [
                str(K),
                _bytes(u["graph_fwd"]),
                _bytes(i["graph_fwd"]),
                _bytes(i["graph_bwd"]),
                f"{1000 * u['seconds']:.0f}",
                f"{1000 * i['seconds']:.0f}",
            ]
        )
    header = [
        "K",
        "graph after fwd, unrolled",
        "graph after fwd, IFT",
        "most saved in bwd, IFT",
        "ms/step unrolled",
        "ms/step IFT",
    ]
    return _table(header, body)


def malloc_table(rows: list[dict]) -> str:
    """The glibc peak of one forward + backward against K."""
    body = [[str(r["K"]), _bytes(r["unrolled"]), _bytes(r["ift"])] for r in rows]
    return _table(["K", "malloc peak, unrolled", "malloc peak, IFT"], body)


def results_table(results: dict[str, dict]) -> str:
    """Per-model test results."""
    body = []
    for name, r in results.items():
        body.append(
            [
                LABELS.get(name, name),
                f"{r['elbo0']:.2f}",
                f"{r['elbo_star']:.2f}",
                f"{r['is_ll']:.2f} ± {r['is_se']:.3f}",
                f"{r['gap']:.2f}",
                f"{r['kl0']:.2f}",
                f"{r['kl_star']:.2f}",
                f"{r['au0']} / {r['au_star']}",
                f"{r['seconds']:.0f}",
            ]
        )
    header = [
        "model",
        "ELBO(λ₀)",
        "ELBO(λ*)",
        "IS log p(x)",
        "gap",
        "KL(λ₀)",
        "KL(λ*)",
        "AU λ₀ / λ*",
        "train s",
    ]
    return _table(header, body)


def plot_cost(rows: list[dict], path: Path) -> None:
    """Memory (graph and peak) and time per step against K."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for method, color in (("unrolled", "C3"), ("ift", "C0")):
        rs = [r for r in rows if r["method"] == method]
        Ks = [r["K"] for r in rs]
        ax1.plot(Ks, [r["graph_fwd"] / 2**20 for r in rs], "o-", color=color, label=method)
        if method == "ift":
            bwd = [r["graph_bwd"] / 2**20 for r in rs]
            ax1.plot(Ks, bwd, "s--", color=color, label="ift: most saved in backward")
        ax2.plot(Ks, [1000 * r["seconds"] for r in rs], "o-", color=color, label=method)
    ax1.set(xlabel="refinement steps K", ylabel="MiB", xscale="log", yscale="log")
    ax1.set_title("bytes saved for backward (graph)")
    ax2.set(xlabel="refinement steps K", ylabel="ms per step (fwd + bwd)", xscale="log")
    ax2.set(yscale="log")
    ax2.set_title("time per step")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_agreement(rows: list[dict], path: Path) -> None:
    """Relative gradient difference and ‖dλ₀‖ against K."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for outer, color in (("elbo", "C0"), ("iw", "C2")):
        rs = [r for r in rows if r["outer"] == outer]
        Ks = [r["K"] for r in rs]
        diff, lam0 = [r["rel_diff"] for r in rs], [r["lam0_unrolled"] for r in rs]
        ax.plot(Ks, diff, "o-", color=color, label=f"dθ rel. diff ({outer})")
        ax.plot(Ks, lam0, "s--", color=color, label=f"‖dλ₀‖ unrolled ({outer})")
    rs = [r for r in rows if r["outer"] == "elbo"]
    ax.plot([r["K"] for r in rs], [r["stationarity"] for r in rs], "k:", label="max ‖∇λ ELBO(λ_K)‖")
    ax.set(xlabel="refinement steps K", xscale="log", yscale="log")
    ax.set_title("unrolled vs IFT gradient (float64)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap(histories: dict[str, list[dict]], path: Path) -> None:
    """Amortization gap and test ELBO(λ*) per epoch for each trainer."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, evals) in enumerate(histories.items()):
        epochs = [e["epoch"] for e in evals]
        ax1.plot(
            epochs, [e["gap"] for e in evals], "o-", color=f"C{i}", label=LABELS.get(name, name)
        )
        ax2.plot(epochs, [e["elbo_star"] for e in evals], color=f"C{i}", label="ELBO(λ*)")
        ax2.plot(epochs, [e["elbo0"] for e in evals], "--", color=f"C{i}", label="ELBO(λ₀)")
    ax1.set(xlabel="epoch", ylabel="nats per digit")
    ax1.set_title("amortization gap ELBO(λ*) − ELBO(λ₀), test set")
    ax2.set(xlabel="epoch", ylabel="nats per digit")
    ax2.set_title("test ELBO at λ* (solid) and λ₀ (dashed)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def solve_summary(log: dict[str, list]) -> dict[str, float]:
    """Summarize the backward's linear solves over training (iterations, residuals)."""
    its, res, rhs = log["iterations"], log["residual"], log["rhs"]
    rel = [r / b for r, b in zip(res, rhs) if b > 0]
    return {
        "solves": len(its),
        "iterations_median": sorted(its)[len(its) // 2],
        "iterations_max": max(its),
        "residual_max": max(res),
        "relative_residual_max": max(rel) if rel else 0.0,
    }
