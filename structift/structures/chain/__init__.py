"""Linear-chain kernels: log-partition, marginals, Viterbi, score and sampling.

All functions are pure and batch-first. Potentials are log-space scores:

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

``log_partition`` and ``marginals`` pick a kernel with ``kernel_for``: on CUDA with Triton
installed, a fused log-space kernel that runs each sequence's whole recursion in one program
(``_fused``); otherwise forward-backward in probability space with per-step rescaling, which
certifies each row's numerical range and redoes the uncertified rows in log space (``_scaled``).
The environment variable ``STRUCTIFT_CHAIN_KERNEL`` (``auto``, ``fused`` or ``scaled``) overrides
the choice; see ``docs/kernels.md``. float16/bfloat16 inputs are computed in float32.

No validation beyond cheap asserts happens here: the families validate.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from structift._ops import lengths_to_mask
from structift.chain import _decode, _fused, _fused_decode, _hvp, _log, _scaled
from structift.chain._decode import score
from structift.chain._local import entropy, kl

__all__ = [
    "KERNELS",
    "entropy",
    "forward_backward",
    "kernel_for",
    "kl",
    "log_partition",
    "marginals",
    "sample",
    "score",
    "viterbi",
]

_LOW = (torch.float16, torch.bfloat16)

#: Values of ``STRUCTIFT_CHAIN_KERNEL``.
KERNELS = ("auto", "fused", "scaled")


def kernel_for(unary: Tensor) -> str:
    """Name the forward-backward kernel used for these potentials: ``"fused"`` or ``"scaled"``.

    ``auto`` (the default) picks ``fused`` for CUDA tensors when Triton is installed, ``Z <=
    128`` and ``T > 1``, else ``scaled``; the first time on each device it checks the fused
    kernel on a tiny chain and, if it fails to build or disagrees with the log-space path,
    warns once and stays with ``scaled``. ``STRUCTIFT_CHAIN_KERNEL=fused`` asks for the fused
    kernel everywhere it can run (CUDA, or CPU under ``TRITON_INTERPRET=1``) and raises where it
    cannot; ``scaled`` always uses the probability-space path. Chains of length 1 have no
    transitions and always use ``scaled``.

    Args:
        unary: ``[B, T, Z]`` log-potentials (only device and shape are read).
    """
    choice = os.environ.get("STRUCTIFT_CHAIN_KERNEL", "auto") or "auto"
    if choice not in KERNELS:
        raise ValueError(
            f"STRUCTIFT_CHAIN_KERNEL must be one of {KERNELS}, got {choice!r}; unset it for auto"
        )
    if choice == "scaled" or unary.shape[1] < 2:
        return "scaled"
    if choice == "auto":
        usable = unary.is_cuda and _fused.supports(unary) and _fused.works_on(unary.device)
        return "fused" if usable else "scaled"
    if not _fused.supports(unary):
        raise ValueError(
            "STRUCTIFT_CHAIN_KERNEL=fused needs Triton installed, a CUDA tensor (or CPU with "
            f"TRITON_INTERPRET=1) and Z <= {_fused.MAX_Z}; got a {unary.device.type} tensor "
            f"with Z = {unary.shape[2]}, triton installed: {_fused.triton_available()}. "
            "Unset it to fall back to the scaled kernel."
        )
    return "fused"


def _engine(unary: Tensor) -> ModuleType:
    """The module (``forward``/``backward`` pair) of ``kernel_for(unary)``."""
    return _fused if kernel_for(unary) == "fused" else _scaled


def _check(unary: Tensor, binary: Tensor, lengths: Tensor) -> None:
    assert unary.dim() == 3, f"unary must be [B, T, Z], got {tuple(unary.shape)}"
    assert binary.dim() <= 4, f"binary must broadcast to [B, T-1, Z, Z], got {tuple(binary.shape)}"
    assert lengths.dim() == 1, f"lengths must be [B], got {tuple(lengths.shape)}"
    assert unary.dtype == binary.dtype, f"dtype mismatch: {unary.dtype} vs {binary.dtype}"


def _work(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _LOW else x


def _sum_to_shape(x: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the reverse of ``expand``)."""
    if x.shape == shape:
        return x
    lead = x.dim() - len(shape)
    x = x.sum(dim=tuple(range(lead))) if lead > 0 else x
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dim=dims, keepdim=True) if dims else x


def _fast_marginals(
    unary: Tensor, binary: Tensor, lengths: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log Z, mu_unary, mu_binary)`` by the kernel's path, detached, ``mu_binary`` at full shape.

    Computed (and returned) in the working dtype: float32 for float16/bfloat16 inputs.
    """
    B, T, Z = unary.shape
    with torch.no_grad():
        u, b = _work(unary), _work(binary)
        engine = _engine(u)
        log_z, state = engine.forward(u, b, lengths, eager=True)
        mu_u, mu_b = engine.backward(state, u, b, lengths, u.new_ones(B), (B, T - 1, Z, Z))
    assert mu_b is not None
    return log_z, mu_u, mu_b


class _Marginals(torch.autograd.Function):
    """``mu(theta) = grad A(theta)``: fast forward, exact Hessian-vector products backward.

    Forward: the scaled path (no graph). Backward: ``H v`` by an analytic forward-backward
    sweep with tangent messages (``_hvp``, no tape); if a graph is requested (third
    derivatives), autograd through the log-space path.
    """

    @staticmethod
    def forward(
        ctx, unary: Tensor, binary: Tensor, lengths: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        log_z, *work = _fast_marginals(unary, binary, lengths)
        out = (work[0].to(unary.dtype), work[1].to(unary.dtype))
        # The backward needs the marginals in the working dtype: the outputs themselves (no
        # extra memory), or a float32 copy for float16/bfloat16 inputs.
        ctx.save_for_backward(unary, binary, lengths, *(work if out[0] is not work[0] else out))
        log_z = log_z.to(unary.dtype)
        ctx.mark_non_differentiable(log_z)  # a by-product: differentiate log_partition instead
        return (*out, log_z)

    @staticmethod
    def backward(
        ctx, v_u: Tensor | None, v_b: Tensor | None, _: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, None]:
        unary, binary, lengths, mu_u, mu_b = ctx.saved_tensors
        need_u, need_b = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            _, mu_u, mu_b = _log.forward_backward(unary, binary, lengths)
            inputs = [x for x, n in ((unary, need_u), (binary, need_b)) if n]
            pairs = [(m, v) for m, v in ((mu_u, v_u), (mu_b, v_b)) if v is not None]
            grads = torch.autograd.grad(
                [m for m, _ in pairs], inputs, [v for _, v in pairs], create_graph=True
            )
            it = iter(grads)
            return (next(it) if need_u else None), (next(it) if need_b else None), None
        mask = lengths_to_mask(lengths.to(unary.device), unary.shape[1])
        fused = kernel_for(unary) == "fused"
        h_u, h_b = _hvp.hvp(mu_u, mu_b, mask, v_u, v_b, fused=fused)
        return (
            h_u.to(unary.dtype) if need_u else None,
            _sum_to_shape(h_b, binary.shape).to(binary.dtype) if need_b else None,
            None,
        )


class _LogPartition(torch.autograd.Function):
    """``A(theta)`` whose backward returns the forward-backward marginals.

    Forward: the scaled forward pass plus the backward messages needed to certify each row; it
    keeps ``alpha`` ``[B, T, Z]``, a few ``[B, T]`` scalars and ``exp(binary)`` at its
    broadcast shape, no autograd graph. First-order backward: turns those buffers into the
    marginals in place. Double backward (``create_graph=True``): the marginals come from
    ``_Marginals``, whose own backward is an exact Hessian-vector product.
    """

    @staticmethod
    def forward(ctx, unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
        eager = ctx.needs_input_grad[1]
        ctx.engine = _engine(unary)
        log_z, state = ctx.engine.forward(_work(unary), _work(binary), lengths, eager=eager)
        ctx.save_for_backward(unary, binary, lengths)
        ctx.state = state if any(ctx.needs_input_grad[:2]) else None
        return log_z.to(unary.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        unary, binary, lengths = ctx.saved_tensors
        need_u, need_b = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():
            mu_u, mu_b, _ = _Marginals.apply(unary, binary, lengths)
            g_u = grad[:, None, None] * mu_u if need_u else None
            g_b = _sum_to_shape(grad[:, None, None, None] * mu_b, binary.shape) if need_b else None
            return g_u, g_b, None
        state, ctx.state = ctx.state, None
        u, b = _work(unary), _work(binary)
        if state is None:  # a second backward through a retained graph: buffers were consumed
            _, state = ctx.engine.forward(u, b, lengths, eager=need_b)
        g_u, g_b = ctx.engine.backward(state, u, b, lengths, grad, binary.shape if need_b else None)
        return (
            g_u.to(unary.dtype) if need_u else None,
            g_b.to(binary.dtype) if g_b is not None else None,
            None,
        )


def log_partition(unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
    """Compute the log-partition ``A(theta) = log sum_z exp <theta, phi(z)>`` of a chain.

    The gradient w.r.t. ``unary`` and ``binary`` is the marginals (0 on padding), computed by
    the backward recursion without storing a per-step graph (extra memory: ``exp(binary)`` at
    its broadcast shape, which becomes the gradient, plus ``O(B T Z)``). Twice differentiable.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``, ``1 <= lengths[b] <= T``.

    Returns:
        ``[B]``; ``-inf`` where no tag sequence has a finite score (gradient 0 there).
    """
    _check(unary, binary, lengths)
    return _LogPartition.apply(unary, binary, lengths)


def marginals(
    unary: Tensor, binary: Tensor, lengths: Tensor, create_graph: bool = False
) -> tuple[Tensor, Tensor]:
    """Compute the exact marginals ``mu = grad A(theta)`` by forward-backward.

    ``mu_unary[b, t, z] = p(z_t = z)`` and ``mu_binary[b, t, i, j] = p(z_t = i, z_{t+1} = j)``,
    each position normalised by its own total (so float32 accuracy does not depend on
    ``|log Z|``). ``forward_backward`` also returns ``log Z``.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``, ``1 <= lengths[b] <= T``.
        create_graph: If ``True`` the result is differentiable w.r.t. ``unary`` and ``binary``:
            its backward is the exact Hessian-vector product of ``A`` (one forward-backward
            sweep with tangent messages, no tape). Otherwise it is detached. The values come from
            the fast scaled path either way.

    Returns:
        ``(mu_unary [B, T, Z], mu_binary [B, T-1, Z, Z])``, zero beyond each length and for
        sequences without a finite-score path.
    """
    _, mu_u, mu_b = forward_backward(unary, binary, lengths, create_graph)
    return mu_u, mu_b


def forward_backward(
    unary: Tensor, binary: Tensor, lengths: Tensor, create_graph: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Compute ``(log Z [B], mu_unary, mu_binary)`` in one forward-backward (see ``marginals``).

    ``log Z`` is a detached by-product (``-inf`` exactly where no tag sequence has a finite
    score: that, and nothing else, decides infeasibility); the marginals are differentiable
    when ``create_graph``.
    """
    _check(unary, binary, lengths)
    if create_graph:
        mu_u, mu_b, log_z = _Marginals.apply(unary, binary, lengths)
        return log_z, mu_u, mu_b
    log_z, mu_u, mu_b = _fast_marginals(unary, binary, lengths)
    return log_z.to(unary.dtype), mu_u.to(unary.dtype), mu_b.to(unary.dtype)


def viterbi(unary: Tensor, binary: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """Find the highest-scoring tag sequence (MAP) by max-plus dynamic programming.

    Runs the fused Triton kernel where ``kernel_for`` picks it (CUDA), the log-space loop
    otherwise; both break ties towards the lowest state index.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``.

    Returns:
        ``(tags LongTensor [B, T], score [B])``. Tags beyond each length are 0. ``score`` is
        ``score(unary, binary, lengths, tags)``, differentiable (its gradient is the indicator
        of the path); ``-inf`` with an arbitrary path when no finite path exists.
    """
    _check(unary, binary, lengths)
    if kernel_for(unary) != "fused":
        return _decode.viterbi(unary, binary, lengths)
    with torch.no_grad():
        path = _fused_decode.viterbi(_work(unary), _work(binary), lengths)
    return path, score(unary, binary, lengths, path)


def sample(
    unary: Tensor,
    binary: Tensor,
    lengths: Tensor,
    sample_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw exact samples by forward-filtering backward-sampling.

    ``z_{L-1} ~ softmax(alpha_{L-1})`` and ``z_t ~ softmax_i(alpha_t[i] + binary_t[i, z_{t+1}])``
    for ``t < L-1``. The fused kernel (where ``kernel_for`` picks it) draws by inverting the
    CDF at uniforms from ``generator``; the log-space loop uses the Gumbel-max trick. Both are
    exact; a seed gives different samples on the two paths.

    Args:
        unary: ``[B, T, Z]`` log-potentials.
        binary: ``[B, T-1, Z, Z]`` (or broadcastable) log-potentials laid out ``[from, to]``.
        lengths: LongTensor ``[B]``.
        sample_shape: Leading sample dimensions ``S``.
        generator: Optional ``torch.Generator`` on the potentials' device.

    Returns:
        LongTensor ``[*S, B, T]``; padding positions are 0. Sequences without a finite path
        get an arbitrary (NaN-free) sequence.
    """
    _check(unary, binary, lengths)
    if kernel_for(unary) != "fused":
        return _decode.sample(unary, binary, lengths, sample_shape, generator)
    with torch.no_grad():
        return _fused_decode.sample(_work(unary), _work(binary), lengths, sample_shape, generator)
