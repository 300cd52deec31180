"""Data, the three trainers (VAE, SA-VAE, IFT) and their evaluation.

Trainers, each one loss per minibatch (θ: decoder, φ: encoder, λ₀ = g_φ(x)):

- ``vae``: −ELBO(λ₀; θ), the amortized VAE;
- ``savi``: −ELBO(λ_K; θ) with λ_K from K unrolled refinement steps; backpropagation
  reaches θ directly and through the steps, and φ through λ₀ (Kim et al. 1802.02550);
- ``ift``: −ELBO(λ*; θ) with λ* from ``custom_root`` (θ's gradient), plus −ELBO(λ₀; sg(θ))
  for φ alone: through λ* the encoder gets ∂λ*/∂λ₀ = 0, so it needs its own objective.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from savi.model import (
    Encoder,
    GaussianVAE,
    Params,
    Posterior,
    active_units,
    init_decoder,
    is_log_likelihood,
    kl_to_prior,
)
from savi.refine import Inner, SolveLog, linear_solver, refine_ift, refine_unrolled, stationarity

METHODS = ("vae", "savi", "ift")


@dataclass(frozen=True)
class Config:
    """Model and training settings (the defaults are the documented run)."""

    latent: int = 16
    hidden: int = 128
    gamma: float = 0.1
    samples: int = 8
    steps: int = 20
    ift_steps: int = 100
    inner_lr: float = Inner.lr
    momentum: float = Inner.momentum
    lr: float = 2e-3
    batch_size: int = 64
    epochs: int = 30
    solver: str = "minres"
    eval_steps: int = 150
    eval_samples: int = 32
    eval_every: int = 5
    eval_size: int = 120
    seed: int = 0

    @property
    def inner(self) -> Inner:
        return Inner(self.inner_lr, self.momentum)


def load_digits_split(test_size: int = 360, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Return scikit-learn's bundled digits scaled to [0, 1]: (train ``[1437, 64]``, test).

    The split is ``train_test_split(test_size=360, stratify=labels, random_state=seed)``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    train, test = train_test_split(
        x, test_size=test_size, stratify=digits.target, random_state=seed
    )
    return torch.from_numpy(train), torch.from_numpy(test)


class Decoder(nn.Module):
    """θ as an ``nn.Module`` (for the optimizer) whose ``params`` feed `decode`."""

    def __init__(self, sizes: list[int], generator: torch.Generator) -> None:
        super().__init__()
        init = init_decoder(sizes, generator, torch.float32)
        self.weights = nn.ParameterList([nn.Parameter(p) for p in init])

    @property
    def params(self) -> Params:
        return tuple(self.weights)


@dataclass
class Models:
    """The decoder θ, encoder φ and likelihood of one trainer."""

    decoder: Decoder
    encoder: Encoder
    vae: GaussianVAE

    @classmethod
    def build(cls, cfg: Config, D: int) -> Models:
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # the encoder's nn.Linear initialization
        dec = Decoder([cfg.latent, cfg.hidden, cfg.hidden, D], gen)
        return cls(dec, Encoder(D, cfg.latent, cfg.hidden), GaussianVAE(cfg.gamma))


def loss(method: str, m: Models, x: Tensor, eps: Tensor, cfg: Config, log: SolveLog) -> Tensor:
    """Return the minibatch loss of ``method`` (mean over the batch)."""
    params = m.decoder.params
    lam0 = m.encoder(x)
    if method == "vae":
        return -m.vae.elbo(lam0, params, x, eps).mean()
    if method == "savi":
        lam = refine_unrolled(m.vae, params, x, eps, lam0, cfg.steps, cfg.inner)
        return -m.vae.elbo(lam, params, x, eps).mean()
    if method == "ift":
        solver = linear_solver(cfg.solver, x.dtype, log)
        lam = refine_ift(m.vae, params, x, eps, lam0, cfg.ift_steps, cfg.inner, solver)
        frozen = tuple(p.detach() for p in params)
        amortized = m.vae.elbo(lam0, frozen, x, eps)
        return -(m.vae.elbo(lam, params, x, eps) + amortized).mean()
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass
class Evaluation:
    """Test-set summaries at λ₀ (amortized) and at λ* (refined to stationarity)."""

    elbo0: float
    elbo_star: float
    kl0: float
    kl_star: float
    stationarity: float
    lam0: Posterior
    lam_star: Posterior

    @property
    def gap(self) -> float:
        """The amortization gap ELBO(λ*) − ELBO(λ₀) (nats per example)."""
        return self.elbo_star - self.elbo0

    def summary(self) -> dict[str, float]:
        """The scalars, with the active units at λ₀ and at λ*."""
        return {
            "elbo0": self.elbo0,
            "elbo_star": self.elbo_star,
            "gap": self.gap,
            "kl0": self.kl0,
            "kl_star": self.kl_star,
            "stationarity": self.stationarity,
            "au0": active_units(self.lam0.mean),
            "au_star": active_units(self.lam_star.mean),
        }


def evaluate(m: Models, x: Tensor, cfg: Config, seed: int = 12345) -> Evaluation:
    """Refine λ₀ = g_φ(x) for ``cfg.eval_steps`` steps and summarize on fresh noise.

    λ* maximizes the ELBO on ``cfg.eval_samples`` fixed draws; the ELBOs reported at λ₀ and
    λ* are then estimated on 256 other draws (the same for both), since an objective
    evaluated on the noise it was maximized on is biased upward.
    """
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(x.shape[0], cfg.eval_samples, cfg.latent, generator=gen)
    fresh = torch.randn(x.shape[0], 256, cfg.latent, generator=gen)
    params = tuple(p.detach() for p in m.decoder.params)
    with torch.no_grad():
        lam0 = m.encoder(x)
    lam = refine_unrolled(m.vae, params, x, eps, lam0, cfg.eval_steps, cfg.inner, False)
    with torch.no_grad():
        e0, e1 = m.vae.elbo(lam0, params, x, fresh), m.vae.elbo(lam, params, x, fresh)
    res = stationarity(m.vae, lam, params, x, eps)
    return Evaluation(
        float(e0.mean()),
        float(e1.mean()),
        float(kl_to_prior(lam0).mean()),
        float(kl_to_prior(lam).mean()),
        float(res.max()),
        lam0,
        lam,
    )


@dataclass
class History:
    """Per-epoch training loss and wall time, and the evaluations at ``epochs``."""

    method: str
    loss: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    evals: list[Evaluation] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    solves: SolveLog = field(default_factory=SolveLog.empty)


def train_epoch(
    method: str,
    m: Models,
    opt: torch.optim.Optimizer,
    train: Tensor,
    cfg: Config,
    gen: torch.Generator,
    log: SolveLog,
) -> float:
    """Run one epoch of minibatch Adam; the noise ε is drawn per minibatch and held fixed."""
    order = torch.randperm(train.shape[0], generator=gen)
    total = 0.0
    for idx in order.split(cfg.batch_size):
        x = train[idx]
        eps = torch.randn(x.shape[0], cfg.samples, cfg.latent, generator=gen)
        opt.zero_grad(set_to_none=True)
        value = loss(method, m, x, eps, cfg, log)
        value.backward()
        opt.step()
        total += float(value.detach()) * x.shape[0]
    return total / train.shape[0]


def fit(method: str, train: Tensor, test: Tensor, cfg: Config, progress=None) -> tuple:
    """Train ``method`` for ``cfg.epochs`` epochs; return (models, history).

    Every ``cfg.eval_every`` epochs (and after the last) the first ``cfg.eval_size`` test
    digits are evaluated (`evaluate`): the amortization gap over training.
    """
    m = Models.build(cfg, train.shape[1])
    opt = torch.optim.Adam([*m.decoder.parameters(), *m.encoder.parameters()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    hist = History(method)
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        hist.loss.append(train_epoch(method, m, opt, train, cfg, gen, hist.solves))
        hist.seconds.append(time.perf_counter() - start)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            hist.epochs.append(epoch)
            hist.evals.append(evaluate(m, test[: cfg.eval_size], cfg))
        if progress is not None:
            progress(hist)
    return m, hist


def test_results(m: Models, test: Tensor, cfg: Config, samples: int, seed: int = 777) -> dict:
    """Final test metrics, the importance-sampled log-likelihood (proposal q_λ*) included."""
    ev = evaluate(m, test, cfg)
    params = tuple(p.detach() for p in m.decoder.params)
    gen = torch.Generator().manual_seed(seed)
    ll, se = is_log_likelihood(m.vae, ev.lam_star, params, test, samples, gen)
    n = test.shape[0]
    return {**ev.summary(), "is_ll": float(ll.mean()), "is_se": float(se.square().sum().sqrt() / n)}
