"""The Gaussian VAE of Dai et al. (arXiv:1912.10702) as functions of explicit parameters.

Generative model: z ~ N(0, I_d), x | z ~ N(MLP_θ(z), γ I_D) with a fixed γ. Variational
family: q_λ(z | x) = N(m, diag σ²), λ = (m, s), σ = exp(s). The decoder is a function of a
tuple of tensors θ (``decode(params, z)``) so that the inner problem can be differentiated
in θ by ``custom_root``, which takes θ positionally.

The ELBO is estimated with reparameterized samples z = m + σ ⊙ ε from noise ε that is fixed
for the whole inner problem, so ELBO(λ; θ, x, ε) is a deterministic, smooth function of λ
(tanh layers: second derivatives exist everywhere) and its stationary points are well
defined.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

Params = tuple[Tensor, ...]


class Posterior(NamedTuple):
    """Local variational parameters λ = (m, s) of q_λ = N(m, diag exp(2s)).

    Attributes:
        mean: m, ``[B, d]``.
        log_std: s, ``[B, d]``.
    """

    mean: Tensor
    log_std: Tensor

    def detach(self) -> Posterior:
        """Return λ cut from the graph."""
        return Posterior(self.mean.detach(), self.log_std.detach())


def decode(params: Params, z: Tensor) -> Tensor:
    """Apply the decoder MLP: affine layers ``(W, b)`` with tanh between them.

    Args:
        params: ``(W_1, b_1, ..., W_L, b_L)``; one layer (L = 1) is the linear-Gaussian model.
        z: ``[..., d]``.

    Returns:
        The mean of p(x | z), ``[..., D]``.
    """
    h = z
    n = len(params) // 2
    for i in range(n):
        h = nn.functional.linear(h, params[2 * i], params[2 * i + 1])
        if i < n - 1:
            h = torch.tanh(h)
    return h


def init_decoder(sizes: list[int], generator: torch.Generator, dtype: torch.dtype) -> Params:
    """Draw decoder parameters for layer widths ``[d, *hidden, D]`` (PyTorch's default scale)."""
    params: list[Tensor] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        w = (torch.rand(fan_out, fan_in, generator=generator, dtype=dtype) * 2 - 1) * bound
        b = (torch.rand(fan_out, generator=generator, dtype=dtype) * 2 - 1) * bound
        params += [w, b]
    return tuple(params)


class Encoder(nn.Module):
    """The inference network g_φ: x ``[B, D]`` -> λ₀ = (m, s), one tanh hidden layer."""

    def __init__(self, D: int, d: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, 2 * d))

    def forward(self, x: Tensor) -> Posterior:
        m, s = self.net(x).chunk(2, dim=-1)
        return Posterior(m, s)


def kl_to_prior(lam: Posterior) -> Tensor:
    """Return KL(q_λ ‖ N(0, I)) = ½ Σ_j (m_j² + σ_j² − 1 − 2 s_j) per example, ``[B]``."""
    m, s = lam
    return 0.5 * (m.square() + torch.exp(2 * s) - 1 - 2 * s).sum(-1)


@dataclass(frozen=True)
class GaussianVAE:
    """The likelihood N(decode(θ, z), γ I) with its bounds, for a fixed noise variance γ."""

    gamma: float

    def log_lik(self, params: Params, x: Tensor, z: Tensor) -> Tensor:
        """Return log p(x | z) for x ``[B, D]`` and z ``[B, S, d]``, shape ``[B, S]``."""
        mu = decode(params, z)  # shape: (B, S, D)
        D = x.shape[-1]
        sq = (x.unsqueeze(-2) - mu).square().sum(-1)
        return -0.5 * sq / self.gamma - 0.5 * D * math.log(2 * math.pi * self.gamma)

    def elbo(self, lam: Posterior, params: Params, x: Tensor, eps: Tensor) -> Tensor:
        """Return ELBO(λ; θ, x, ε) = mean_s log p(x | m + σ ε_s) − KL(q_λ ‖ p), ``[B]``.

        Args:
            lam: λ with fields ``[B, d]``.
            params: decoder θ.
            x: ``[B, D]``.
            eps: fixed standard normal noise ``[B, S, d]``.
        """
        z = lam.mean.unsqueeze(-2) + torch.exp(lam.log_std).unsqueeze(-2) * eps
        return self.log_lik(params, x, z).mean(-1) - kl_to_prior(lam)

    def log_weights(self, lam: Posterior, params: Params, x: Tensor, eps: Tensor) -> Tensor:
        """Return log w = log p(x, z) − log q_λ(z) at z = m + σ ε, ``[B, S]``."""
        z = lam.mean.unsqueeze(-2) + torch.exp(lam.log_std).unsqueeze(-2) * eps
        log_prior = -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)
        # log q at its own sample: the standardized residual is ε itself.
        log_q = (
            -0.5 * (eps.square() + math.log(2 * math.pi)).sum(-1) - lam.log_std.sum(-1)[..., None]
        )
        return self.log_lik(params, x, z) + log_prior - log_q

    def iw_bound(self, lam: Posterior, params: Params, x: Tensor, eps: Tensor) -> Tensor:
        """Return the importance-weighted bound log (1/S) Σ_s w_s (Burda et al., 1509.00519)."""
        lw = self.log_weights(lam, params, x, eps)
        return torch.logsumexp(lw, dim=-1) - math.log(lw.shape[-1])


def is_log_likelihood(
    model: GaussianVAE,
    lam: Posterior,
    params: Params,
    x: Tensor,
    samples: int,
    generator: torch.Generator,
    chunk: int = 250,
) -> tuple[Tensor, Tensor]:
    """Estimate log p(x) by importance sampling with proposal q_λ, ``samples`` draws each.

    log p̂(x) = logsumexp_k log w_k − log k, w_k = p(x, z_k) / q_λ(z_k), z_k ~ q_λ: a
    consistent estimator whose expectation is a lower bound on log p(x) (Jensen), exact for
    every draw when q_λ is the exact posterior. Drawn in chunks to bound memory.

    Returns:
        ``(estimate, std_err)``, each ``[B]``: the delta-method standard error
        std(w) / (√k · mean(w)) of the estimate.
    """
    B, d = lam.mean.shape
    parts = []
    with torch.no_grad():
        for start in range(0, samples, chunk):
            k = min(chunk, samples - start)
            eps = torch.randn(B, k, d, generator=generator, dtype=x.dtype)
            parts.append(model.log_weights(lam, params, x, eps))
    lw = torch.cat(parts, dim=-1)  # shape: (B, samples)
    est = torch.logsumexp(lw, dim=-1) - math.log(samples)
    w = torch.exp(lw - est.unsqueeze(-1))  # weights relative to their mean
    return est, w.std(dim=-1) / math.sqrt(samples)


def active_units(means: Tensor, threshold: float = 0.01) -> int:
    """Count latent dims with Cov_x(E_q[z_j]) > threshold (Burda et al., 1509.00519).

    Args:
        means: posterior means over a data set, ``[N, d]``.
    """
    return int((means.var(dim=0) > threshold).sum())
