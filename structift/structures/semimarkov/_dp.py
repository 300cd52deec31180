r"""The semi-Markov forward-backward recursions, in log space with a true ``-inf`` zero.

A segmentation of the positions ``0..L-1`` is a path through the states ``(t, c)``, "a segment
labelled c ends at boundary t" (``(0, c)`` is the initial label), with the step
``(s, a) -> (s + k, c)`` scored ``scores[s, k, a, c]``. With the masked scores ``ms``
(``-inf`` for k = 0 and for segments past ``L - 1``)::

    alpha[0, c] = 0,   alpha[t, c] = logsumexp_{k, a} alpha[t-k, a] + ms[t-k, k, a, c]
    beta[L-1, c] = 0,  beta[t, a]  = logsumexp_{k, c} ms[t, k, a, c] + beta[t+k, c]
    A = logsumexp_c alpha[L-1, c] = logsumexp_c beta[0, c]
    mu[s, k, a, c] = exp(alpha[s, a] + ms[s, k, a, c] + beta[s + k, c] - A)

each in O(N K C^2) time and O(N C) state per element (N positions, segments of 1..K-1 steps,
C labels), vectorized over the batch and the labels; one Python step per position.

Float32 strategy: every recursion runs in float64 (``WORK``) and results are cast back. The
chart holds unnormalised log-scores whose size grows like |A| (``N`` times the score scale);
in float32 their rounding, ulp(|A|), would be an absolute error of every log-marginal, so
marginals of peaked long problems would leave [0, 1]. In float64 the same error is ~1e-16 |A|,
far below float32 resolution for any |A| < 1e9. The state is O(N C) per element, so on CPU the
cost is the per-step overhead either way.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from structift._ops import logsumexp, softmax_entropy, softmax_kl

__all__ = ["WORK", "beta_pass", "by_end", "by_start", "entropy", "forward", "kl", "posterior"]

WORK = torch.float64
_NEG_INF = float("-inf")


def by_end(ms: Tensor, N: int) -> Tensor:
    """Index the scores by segment end: ``E[b, t, j] = ms[b, t-j-1, j+1]`` (``-inf`` if t <= j).

    Args:
        ms: masked scores ``[B, N-1, K, C, C]``.
        N: the number of positions.

    Returns:
        ``[B, N, K-1, C, C]`` (functional: differentiable to any order).
    """
    K = ms.shape[2]
    cols = []
    for k in range(1, K):
        part = ms[:, : max(N - k, 0), k]  # segments ending at t = k..N-1
        cols.append(F.pad(part, (0, 0, 0, 0, min(k, N), 0), value=_NEG_INF))
    return torch.stack(cols, dim=2)


def by_start(beta: Tensor, K: int) -> Tensor:
    """``Bk[b, s, k, c] = beta[b, s + k, c]`` for s in 0..N-2, k in 0..K-1 (``-inf`` past N-1)."""
    N = beta.shape[1]
    padded = F.pad(beta, (0, 0, 0, K), value=_NEG_INF)  # shape: (B, N + K, C)
    return padded.unfold(1, K, 1)[:, : N - 1].permute(0, 1, 3, 2)  # shape: (B, N-1, K, C)


def forward(ends: Tensor, graph: bool) -> Tensor:
    """``alpha [B, N, C]`` from the end-indexed scores ``[B, N, K-1, C, C]``.

    ``graph``: use ``structift._ops.logsumexp`` (zero, not NaN, gradients at ``-inf``; twice
    differentiable); otherwise ``torch.logsumexp`` under no grad.
    """
    B, N, K1, C, _ = ends.shape
    lse = logsumexp if graph else torch.logsumexp
    first = ends.new_zeros(B, 1, C)
    # hist[:, j] = alpha[t - 1 - j]: the K-1 most recent rows of the chart.
    hist = torch.cat([first, ends.new_full((B, K1 - 1, C), _NEG_INF)], 1)
    alphas = [first[:, 0]]
    for t in range(1, N):
        new = lse(hist[..., None] + ends[:, t], dim=(1, 2))  # shape: (B, C)
        alphas.append(new)
        hist = torch.cat([new[:, None], hist[:, :-1]], 1)
    return torch.stack(alphas, 1)


def beta_pass(ms: Tensor, lengths: Tensor) -> Tensor:
    """``beta [B, N, C]`` (no graph): the log-score of completing from ``(t, c)`` to ``L - 1``."""
    B, N1, K, C, _ = ms.shape
    N = N1 + 1
    last = lengths - 1
    zero = ms.new_zeros(B, C)
    top = torch.where((last == N - 1)[:, None], zero, _NEG_INF)
    fut = torch.cat([top[:, None], ms.new_full((B, K - 2, C), _NEG_INF)], 1)  # beta[t+1+j]
    betas = [top]
    for t in range(N - 2, -1, -1):
        new = torch.logsumexp(ms[:, t, 1:] + fut[:, :, None, :], dim=(1, 3))  # shape: (B, C)
        new = torch.where((last == t)[:, None], zero, new)
        betas.append(new)
        fut = torch.cat([new[:, None], fut[:, :-1]], 1)
    return torch.stack(betas[::-1], 1)


def _safe(log_z: Tensor) -> Tensor:
    return torch.where(torch.isfinite(log_z), log_z, 0.0)


def posterior(ms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A [B], mu [B, N-1, K, C, C], alpha [B, N, C], beta [B, N, C])``, no graph, float64."""
    N1, K = ms.shape[1], ms.shape[2]
    N = N1 + 1
    alpha = forward(by_end(ms, N), graph=False)
    beta = beta_pass(ms, lengths)
    log_z = torch.logsumexp(beta[:, 0], -1)
    shift = _safe(log_z)[:, None, None, None, None]
    bk = by_start(beta, K)  # shape: (B, N-1, K, C)
    mu = torch.exp(alpha[:, :N1, None, :, None] + ms + bk[:, :, :, None, :] - shift)
    return log_z, mu, alpha, beta


def _chain_parts(ms: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(P [B, N-1, C], logits [B, N-1, C, K*C])`` of the Markov chain over ``(t, c)`` states.

    ``P[t, a]`` is the probability that a segment (or the start) ends at t with label a;
    ``logits[t, a]`` are the unnormalised log-probabilities of the next segment ``(k, c)``.
    """
    B, N1, K, C, _ = ms.shape
    log_z = _safe(torch.logsumexp(beta[:, 0], -1))
    P = torch.exp(alpha[:, :N1] + beta[:, :N1] - log_z[:, None, None])
    logits = ms + by_start(beta, K)[:, :, :, None, :]  # shape: (B, N-1, K, C_a, C_c)
    return P, logits.permute(0, 1, 3, 2, 4).reshape(B, N1, C, K * C)


def entropy(ms: Tensor, lengths: Tensor) -> Tensor:
    """H = H(initial label) + Σ_{t,a} P(t, a) H(next segment | t, a), each term >= 0."""
    with torch.no_grad():
        alpha = forward(by_end(ms, ms.shape[1] + 1), graph=False)
        beta = beta_pass(ms, lengths)
        P, logits = _chain_parts(ms, alpha, beta)
        local = torch.where(P > 0, P * softmax_entropy(logits, -1), 0.0)
        return softmax_entropy(beta[:, 0], -1) + local.flatten(1).sum(-1)


def kl(ms_p: Tensor, ms_q: Tensor, lengths: Tensor) -> Tensor:
    """KL(p ‖ q) = KL(initial) + Σ_{t,a} P_p(t, a) KL(next_p | t, a ‖ next_q | t, a), >= 0."""
    with torch.no_grad():
        N = ms_p.shape[1] + 1
        alpha = forward(by_end(ms_p, N), graph=False)
        beta_p, beta_q = beta_pass(ms_p, lengths), beta_pass(ms_q, lengths)
        P, logits_p = _chain_parts(ms_p, alpha, beta_p)
        _, logits_q = _chain_parts(ms_q, alpha, beta_q)
        local = torch.where(P > 0, P * softmax_kl(logits_p, logits_q, -1), 0.0)
        return softmax_kl(beta_p[:, 0], beta_q[:, 0], -1) + local.flatten(1).sum(-1)
