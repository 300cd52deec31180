"""Semi-amortized VI on scikit-learn's digits: VAE, SA-VAE (unrolled) and the IFT.

The model of Dai et al. (arXiv:1912.10702): z ~ N(0, I_16), x | z ~ N(MLP_θ(z), 0.1 I_64),
q_λ(z | x) = N(m, diag σ²), λ = (m, log σ), with the inner problem λ* = argmax_λ ELBO(λ; θ, x)
on fixed noise. Three trainers (see ``savi/train.py``), then measurements of the unrolled
against the implicit (``structift.implicit.custom_root``) gradient as the number of
refinement steps K grows: agreement, memory and time. Everything is written to ``--out``.

Examples::

    python examples/savi.py                      # the documented run (a few minutes, CPU)
    python examples/savi.py --smoke              # seconds, for tests
    python examples/savi.py --docs docs/examples # also copy the figures for the docs
    python examples/savi.py --methods vae ift --epochs 10

Data: ``sklearn.datasets.load_digits`` (1,797 8×8 images bundled with scikit-learn, no
download), pixels scaled to [0, 1], split 1,437 / 360 stratified by digit (random_state 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

# Passive OpenMP waiting: spinning threads slow small kernels several-fold on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from savi import report
from savi.measure import Problem, gradient_agreement, malloc_peak, step_cost
from savi.model import Posterior
from savi.train import METHODS, Config, Models, fit, load_digits_split, test_results
from tqdm import tqdm

FIGURES = ("savi_cost.png", "savi_agreement.png", "savi_gap.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=int, default=Config.epochs)
    p.add_argument("--steps", type=int, default=Config.steps, help="SA-VAE's unrolled K")
    p.add_argument("--ift-steps", type=int, default=Config.ift_steps, help="IFT trainer's K")
    p.add_argument("--solver", choices=["cg", "minres"], default=Config.solver)
    p.add_argument("--gamma", type=float, default=Config.gamma, help="decoder variance γ")
    p.add_argument("--Ks", type=int, nargs="+", default=[5, 10, 20, 50, 100, 200])
    p.add_argument("--is-samples", type=int, default=1000, help="importance samples (k)")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats per K")
    p.add_argument(
        "--malloc-peak", type=int, nargs="*", default=[], metavar="K", help="glibc peak (slow)"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/savi"))
    p.add_argument("--docs", type=Path, help="copy the figures here (docs/examples)")
    p.add_argument("--smoke", action="store_true", help="tiny run (seconds), for tests")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    cfg = Config(
        epochs=args.epochs,
        steps=args.steps,
        ift_steps=args.ift_steps,
        solver=args.solver,
        gamma=args.gamma,
        seed=args.seed,
    )
    if args.smoke:
        cfg = replace(
            cfg, epochs=2, steps=3, ift_steps=20, eval_steps=30, eval_samples=4, hidden=32
        )
        cfg = replace(cfg, eval_every=1, eval_size=32)
    return cfg


def train_all(args: argparse.Namespace, cfg: Config, train, test) -> dict:
    """Fit every trainer; return {method: (models, history, results)}."""
    out = {}
    for method in args.methods:
        bar = tqdm(total=cfg.epochs, desc=method, file=sys.stdout, leave=False)

        def progress(hist, bar=bar) -> None:
            gap = f"{hist.evals[-1].gap:.3f}" if hist.evals else "-"
            bar.set_postfix(loss=f"{hist.loss[-1]:.2f}", gap=gap)
            bar.update()

        m, hist = fit(method, train, test, cfg, progress)
        bar.close()
        seconds = sum(hist.seconds)  # training epochs only, without the evaluations
        res = {**test_results(m, test, cfg, args.is_samples), "seconds": seconds}
        print(
            f"[{method}] {seconds:.0f} s training; test ELBO(λ₀) {res['elbo0']:.2f}, ELBO(λ*) "
            f"{res['elbo_star']:.2f}, IS log p(x) {res['is_ll']:.2f}"
        )
        out[method] = (m, hist, res)
    return out


def problem(m: Models, test: torch.Tensor, cfg: Config, batch: int = 64) -> Problem:
    """A fixed test minibatch of the inner problem at the trained θ, φ."""
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    x = test[:batch]
    eps = torch.randn(x.shape[0], cfg.samples, cfg.latent, generator=gen)
    eps_iw = torch.randn(x.shape[0], 16, cfg.latent, generator=gen)
    with torch.no_grad():
        lam0 = m.encoder(x)
    params = tuple(p.detach() for p in m.decoder.params)
    return Problem(m.vae, params, x, eps, eps_iw, Posterior(*lam0))


def measure(args: argparse.Namespace, cfg: Config, m: Models, test: torch.Tensor) -> dict:
    """The sweeps over K at the trained model: agreement (float64), cost and malloc peaks."""
    p = problem(m, test, cfg)
    p32 = p.to(torch.float32)
    peaks = [
        {"K": K, **{meth: malloc_peak(p32, meth, K, cfg.inner) for meth in ("unrolled", "ift")}}
        for K in args.malloc_peak
    ]
    return {
        "agreement": gradient_agreement(p, args.Ks, cfg.inner),
        "cost": step_cost(p32, args.Ks, cfg.inner, args.repeats),
        "malloc_peak": peaks,
    }


def write(args: argparse.Namespace, summary: dict) -> None:
    """Print and save the tables, the figures and the JSON summary."""
    tables = {
        "results": report.results_table(summary["results"]),
        "agreement": report.agreement_table(summary["agreement"]),
        "cost": report.cost_table(summary["cost"]),
    }
    if summary["malloc_peak"]:
        tables["malloc"] = report.malloc_table(summary["malloc_peak"])
    for name, table in tables.items():
        print(f"\n{name}\n{table}")
    report.plot_cost(summary["cost"], args.out / FIGURES[0])
    report.plot_agreement(summary["agreement"], args.out / FIGURES[1])
    report.plot_gap(summary["histories"], args.out / FIGURES[2])
    (args.out / "results.md").write_text("\n\n".join(tables.values()) + "\n")
    (args.out / "results.json").write_text(json.dumps(summary, indent=1))
    if args.docs is not None:
        for name in FIGURES:
            shutil.copy(args.out / name, args.docs / name)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = config(args)
    if args.smoke:
        args.Ks, args.is_samples, args.repeats = [2, 5], 100, 1
    train, test = load_digits_split(seed=args.seed)
    if args.smoke:
        train, test = train[:256], test[:64]
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trained = train_all(args, cfg, train, test)
    # The sweeps run at the IFT-trained model when it was trained, else the first one.
    m = trained.get("ift", next(iter(trained.values())))[0]
    summary = {
        "config": asdict(cfg),
        "results": {k: v[2] for k, v in trained.items()},
        **measure(args, cfg, m, test),
        "histories": {
            k: [{"epoch": n, **e.summary()} for n, e in zip(v[1].epochs, v[1].evals)]
            for k, v in trained.items()
        },
        "solves": {
            k: report.solve_summary(asdict(v[1].solves))
            for k, v in trained.items()
            if v[1].solves.iterations
        },
    }
    summary["seconds"] = time.perf_counter() - start
    write(args, summary)
    print(f"\nwall time {summary['seconds']:.0f} s; results in {args.out}")
    return summary


if __name__ == "__main__":
    main()
