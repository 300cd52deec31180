"""The linear chain: its structure object, its backends, and batch-first functions.

Potentials are log-space scores:

* ``unary`` ``[B, T, Z]``: ``unary[b, t, z]`` scores state ``z`` at position ``t``;
* ``binary`` ``[B, T-1, Z, Z]`` laid out ``[from, to]``: ``binary[b, t, i, j]`` scores the
  transition ``z_t = i -> z_{t+1} = j``. Anything broadcastable to that shape is accepted
  (``[Z, Z]``, ``[T-1, Z, Z]``, ``[B, 1, Z, Z]``, or an ``expand``-ed view): broadcast
  dimensions are exponentiated and stored once, and the gradient has the shape passed in;
* ``lengths`` LongTensor ``[B]`` with ``1 <= lengths[b] <= T``.

The score of a tag sequence ``z`` of length ``L`` is
``<theta, phi(z)> = sum_{t<L} unary[t, z_t] + sum_{t<L-1} binary[t, z_t, z_{t+1}]`` and
``A(theta) = log sum_z exp <theta, phi(z)>``. Padding (``unary[b, t]`` for ``t >= L``,
``binary[b, t]`` for ``t >= L-1``) is ignored: its value never matters (even NaN or inf) and its
gradient is 0. Potentials may be ``-inf`` (hard constraints). A sequence without a finite-score
path has ``A = -inf`` and gradient (marginals) 0; no NaN is produced from ``-inf``.

Every function takes ``backend=`` (see ``backends``: ``Scaled`` on CPU, ``Fused`` Triton
kernels on CUDA, ``Log`` the reference; ``None`` resolves the choice in effect).
float16/bfloat16 inputs are computed in float32. No validation beyond cheap asserts happens
here: the families validate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from structift.structures.chain import _kbest, _primitives
from structift.structures.chain._decode import score
from structift.structures.chain._local import entropy, kl
from structift.structures.chain.backends import (
    AbstractChainBackend,
    BackendSpec,
    Fused,
    Log,
    Scaled,
    current_backend,
    resolve,
    use_backend,
)
from structift.structures.chain.structure import Chain

__all__ = [
    "AbstractChainBackend",
    "Chain",
    "Fused",
    "Log",
    "Scaled",
    "current_backend",
    "entropy",
    "forward_backward",
    "hvp",
    "kl",
    "log_partition",
    "marginals",
    "resolve",
    "sample",
    "score",
    "topk",
    "use_backend",
    "viterbi",
]


def _check(unary: Tensor, binary: Tensor, lengths: Tensor) -> None:
    assert unary.dim() == 3, f"unary must be [B, T, Z], got {tuple(unary.shape)}"
    assert binary.dim() <= 4, f"binary must broadcast to [B, T-1, Z, Z], got {tuple(binary.shape)}"
    assert lengths.dim() == 1, f"lengths must be [B], got {tuple(lengths.shape)}"
    assert unary.dtype == binary.dtype, f"dtype mismatch: {unary.dtype} vs {binary.dtype}"


def log_partition(
    unary: Tensor, binary: Tensor, lengths: Tensor, backend: BackendSpec = None
) -> Tensor:
    """Compute the log-partition ``A(theta) = log sum_z exp <theta, phi(z)>`` of a chain.

    The gradient w.r.t. ``unary`` and ``binary`` is the marginals (0 on padding), formed during
    the forward pass without storing a per-step graph; twice (and more) differentiable, and
    usable under ``torch.func`` transforms and ``torch.compile``.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``, ``1 <= lengths[b] <= T``.
        backend: a chain backend or its name (default: the choice in effect).

    Returns:
        ``[B]``; ``-inf`` where no tag sequence has a finite score (gradient 0 there).
    """
    _check(unary, binary, lengths)
    engine = resolve(backend, unary)
    if torch.is_grad_enabled() and (unary.requires_grad or binary.requires_grad):
        log_z = _primitives.posterior(unary, binary, lengths, engine, full=False)[0]
    else:
        log_z = _primitives.log_partition_values(unary, binary, lengths, engine)
    return log_z.to(unary.dtype)


def forward_backward(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    create_graph: bool = False,
    backend: BackendSpec = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute ``(log Z [B], mu_unary [B, T, Z], mu_binary [B, T-1, Z, Z])`` in one pass.

    ``mu_unary[b, t, z] = p(z_t = z)`` and ``mu_binary[b, t, i, j] = p(z_t = i, z_{t+1} = j)``,
    each position normalised by its own total (so float32 accuracy does not depend on
    ``|log Z|``); zero beyond each length and for sequences without a finite-score path.
    ``log Z`` is ``-inf`` exactly where no tag sequence has a finite score: that, and nothing
    else, decides infeasibility.

    Args:
        unary: as in ``log_partition``.
        binary: as in ``log_partition``.
        lengths: as in ``log_partition``.
        backend: as in ``log_partition``.
        create_graph: If ``True`` the outputs are differentiable w.r.t. ``unary`` and
            ``binary``: the marginals' backward is the exact Hessian-vector product of ``A``
            (one forward-backward sweep with tangent messages, no tape). Otherwise detached.
    """
    _check(unary, binary, lengths)
    engine = resolve(backend, unary)
    if create_graph:
        out = _primitives.posterior(unary, binary, lengths, engine, full=True)
    else:
        with torch.no_grad():
            out = _primitives.posterior(unary, binary, lengths, engine, full=True)
    log_z, mu_u, mu_b = (x.to(unary.dtype) for x in out)
    return log_z, mu_u, mu_b


def marginals(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    create_graph: bool = False,
    backend: BackendSpec = None,
) -> tuple[Tensor, Tensor]:
    """``(mu_unary, mu_binary)`` of ``forward_backward`` (arguments as there)."""
    _, mu_u, mu_b = forward_backward(unary, binary, lengths, create_graph, backend)
    return mu_u, mu_b


def hvp(
    mu_unary: Tensor,
    mu_binary: Tensor,
    lengths: Tensor,
    v_unary: Tensor | None,
    v_binary: Tensor | None,
    backend: BackendSpec = None,
) -> tuple[Tensor, Tensor]:
    """Multiply the Hessian of ``A`` (the covariance of the statistics) by ``v``, from ``mu``.

    The one covariance-vector product of the chain (``_hvp``: centred tangent recursions, so
    float32 error does not grow with T), used by the marginals' backward, the gradients of
    entropy and KL, and the variational IFT solve. No graph.

    Args:
        mu_unary: ``[B, T, Z]`` exact marginals, zero on padding; mu_binary: ``[B, T-1, Z, Z]``.
        lengths: LongTensor ``[B]``.
        v_unary: direction ``[B, T, Z]`` (or broadcastable, or ``None``); finite.
        v_binary: direction broadcastable to ``[B, T-1, Z, Z]`` (or ``None``); finite.
        backend: as in ``log_partition`` (``Fused`` runs both recursions in one launch).

    Returns:
        ``(h_unary [B, T, Z], h_binary [B, T-1, Z, Z])``, zero where the marginals are zero.
    """
    B, T, Z = mu_unary.shape
    engine = resolve(backend, mu_unary)
    vu = mu_unary.new_zeros(()).expand(B, T, Z) if v_unary is None else v_unary.expand(B, T, Z)
    vb = mu_unary.new_zeros(0) if v_binary is None else v_binary.expand(mu_binary.shape)
    with torch.no_grad():
        return _primitives._hvp_op(
            mu_unary, mu_binary, lengths, vu, vb, _primitives.backend_key(engine)
        )


def viterbi(
    unary: Tensor, binary: Tensor, lengths: Tensor, backend: BackendSpec = None
) -> tuple[Tensor, Tensor]:
    """Find the highest-scoring tag sequence (MAP) by max-plus dynamic programming.

    Ties go to the lowest state index on every backend.

    Args:
        unary: as in ``log_partition``.
        binary: as in ``log_partition``.
        lengths: as in ``log_partition``.
        backend: as in ``log_partition``.

    Returns:
        ``(tags LongTensor [B, T], score [B])``. Tags beyond each length are 0. ``score`` is
        ``score(unary, binary, lengths, tags)``, differentiable (its gradient is the indicator
        of the path); ``-inf`` with an arbitrary path when no finite path exists.
    """
    _check(unary, binary, lengths)
    with torch.no_grad():
        tags = _primitives.viterbi_tags(unary, binary, lengths, resolve(backend, unary))
    return tags, score(unary, binary, lengths, tags)


def topk(unary: Tensor, binary: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Find the ``k`` highest-scoring tag sequences, exactly (k-best Viterbi, ``_kbest``).

    One torch loop on every device and backend. Paths of equal score come in ascending
    lexicographic order of the reversed sequence (lower last tag first, then lower
    second-to-last, ...), which for ``k = 1`` is ``viterbi``'s rule.

    Args:
        unary: as in ``log_partition``.
        binary: as in ``log_partition``.
        lengths: as in ``log_partition``.
        k: the number of paths, an int ``>= 1`` (not validated here; the families check it).

    Returns:
        ``(tags LongTensor [k, B, T], scores [k, B])``, best first. ``scores[r]`` is
        ``score(unary, binary, lengths, tags[r])`` (differentiable). Where a sequence has fewer
        than ``k`` finite-score paths, the missing ranks have score ``-inf`` and tags 0.
    """
    _check(unary, binary, lengths)
    return _kbest.topk(unary, binary, lengths, k)


def sample(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    sample_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    backend: BackendSpec = None,
) -> Tensor:
    """Draw exact samples by forward-filtering backward-sampling.

    ``z_{L-1} ~ softmax(alpha_{L-1})`` and ``z_t ~ softmax_i(alpha_t[i] + binary_t[i, z_{t+1}])``
    for ``t < L-1``. ``Fused`` draws by inverting the CDF at uniforms from ``generator``; the
    loops use the Gumbel-max trick. Both are exact; a seed gives different samples on the two.

    Args:
        unary: as in ``log_partition``.
        binary: as in ``log_partition``.
        lengths: as in ``log_partition``.
        backend: as in ``log_partition``.
        sample_shape: Leading sample dimensions ``S``.
        generator: Optional ``torch.Generator`` on the potentials' device.

    Returns:
        LongTensor ``[*S, B, T]``; padding positions are 0. Sequences without a finite path
        get an arbitrary (NaN-free) sequence.
    """
    _check(unary, binary, lengths)
    engine = resolve(backend, unary)
    with torch.no_grad():
        u, b = _primitives._work(unary.detach()), _primitives._work(binary.detach())
        return engine.sample(u, b, lengths, tuple(sample_shape), generator)
