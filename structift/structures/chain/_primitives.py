"""The chain's differentiable primitives: custom operators under one ``autograd.Function``.

Three layers, each for a reason:

* **Custom operators** (``torch.library.custom_op``: ``structift::chain_posterior``,
  ``chain_log_partition``, ``chain_hvp``, ``chain_viterbi``) run a backend's kernels. They are
  opaque to ``torch.compile`` (one node in the graph, with a shape-only fake implementation),
  so a compiled loss compiles once for every length and batch size instead of unrolling T steps
  and specialising on ``min(lengths)``; and each has a ``vmap`` rule that folds the vmapped
  dimension into the batch (the kernels are batched already).
* **``_Posterior``**, an ``autograd.Function`` with ``setup_context`` and a generated vmap
  rule, gives them derivatives: ``d log Z = mu`` and ``d mu = H v`` (the centred HVP). It works
  with ``torch.func.grad``, ``vmap``, ``jacrev`` (custom operators' own autograd does not).
* The public functions in ``structift.structures.chain`` call ``_Posterior``.

Backends travel through the operators as the key of a registry (``backend_key``): operator
arguments must be tensors or plain values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structift._ops import lengths_to_mask, sum_to_shape
from structift.structures.chain import _hvp
from structift.structures.chain.backends import REGISTRY, AbstractChainBackend

_LOW = (torch.float16, torch.bfloat16)


def backend_key(backend: AbstractChainBackend) -> str:
    """The string the operators take for ``backend`` (registered when it was created)."""
    return backend.key


def _work(x: Tensor) -> Tensor:
    """The working dtype: float32 for float16/bfloat16 inputs."""
    return x.float() if x.dtype in _LOW else x


def _working_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW else x.dtype


def reduced_binary_shape(unary: Tensor, binary: Tensor) -> tuple[int, int, int, int]:
    """``[B, Tb, Z, Z]``: the batch kept, time summed where ``binary`` has no time dimension.

    (An ``expand``-ed view keeps its full shape: the gradient of a view is per position, and
    autograd's ``expand`` backward sums it.)
    """
    B, T, Z = unary.shape
    shared_t = (binary.dim() < 3 or binary.shape[-3] == 1) and T > 1
    return (B, 1 if shared_t else T - 1, Z, Z)


# ---- custom operators ----------------------------------------------------------------------


@torch.library.custom_op("structift::chain_posterior", mutates_args=())
def _posterior_op(
    unary: Tensor, binary: Tensor, lengths: Tensor, backend: str, full: bool, want_binary: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log Z [B], mu_unary [B, T, Z], mu_binary)`` in the working dtype, no graph.

    ``mu_binary`` is ``[B, T-1, Z, Z]`` if ``full``, else summed over time where ``binary`` is
    shared over time (``reduced_binary_shape``), or an empty ``[0]`` without ``want_binary``.
    """
    engine = REGISTRY[backend]
    u, b = _work(unary), _work(binary)
    B, T, Z = u.shape
    shape = (B, T - 1, Z, Z) if full else reduced_binary_shape(u, b)
    log_z, state = engine.forward(u, b, lengths, eager=want_binary)
    mu_u, mu_b = engine.backward(
        state, u, b, lengths, u.new_ones(B), shape if want_binary else None
    )
    if mu_b is None:
        mu_b = u.new_zeros(0)
    return log_z, mu_u, mu_b.reshape(shape) if want_binary else mu_b


@_posterior_op.register_fake
def _(unary, binary, lengths, backend, full, want_binary):
    B, T, Z = unary.shape
    dtype = _working_dtype(unary)
    shape = (B, T - 1, Z, Z) if full else reduced_binary_shape(unary, binary)
    mu_b = unary.new_empty(shape if want_binary else (0,), dtype=dtype)
    return unary.new_empty(B, dtype=dtype), unary.new_empty(B, T, Z, dtype=dtype), mu_b


@torch.library.custom_op("structift::chain_log_partition", mutates_args=())
def _log_partition_op(unary: Tensor, binary: Tensor, lengths: Tensor, backend: str) -> Tensor:
    """``log Z [B]`` in the working dtype (the forward pass only)."""
    log_z, _ = REGISTRY[backend].forward(_work(unary), _work(binary), lengths, eager=False)
    return log_z


@_log_partition_op.register_fake
def _(unary, binary, lengths, backend):
    return unary.new_empty(unary.shape[0], dtype=_working_dtype(unary))


@torch.library.custom_op("structift::chain_hvp", mutates_args=())
def _hvp_op(
    mu_u: Tensor, mu_b: Tensor, lengths: Tensor, v_u: Tensor, v_b: Tensor, backend: str
) -> tuple[Tensor, Tensor]:
    """``H v`` from the marginals (``_hvp.hvp``); an empty ``v_b`` means no binary direction."""
    mask = lengths_to_mask(lengths.to(mu_u.device), mu_u.shape[1])
    sweeps = REGISTRY[backend].sweeps
    return _hvp.hvp(mu_u, mu_b, mask, v_u, v_b if v_b.numel() else None, sweeps=sweeps)


@_hvp_op.register_fake
def _(mu_u, mu_b, lengths, v_u, v_b, backend):
    return torch.empty_like(mu_u), torch.empty_like(mu_b)


@torch.library.custom_op("structift::chain_viterbi", mutates_args=())
def _viterbi_op(unary: Tensor, binary: Tensor, lengths: Tensor, backend: str) -> Tensor:
    """MAP tags ``[B, T]`` (LongTensor)."""
    return REGISTRY[backend].viterbi(_work(unary), _work(binary), lengths)


@_viterbi_op.register_fake
def _(unary, binary, lengths, backend):
    return unary.new_empty(unary.shape[:2], dtype=torch.long)


# ---- vmap: fold the vmapped dimension into the batch ---------------------------------------


def _lead(x: Tensor, dim: int | None, size: int) -> Tensor:
    """``x`` with the vmapped dimension first (expanded if ``x`` is not vmapped)."""
    return x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)


def _fold_chain(in_dims: tuple, size: int, unary: Tensor, binary: Tensor, lengths: Tensor):
    u = _lead(unary, in_dims[0], size)  # shape: (V, B, T, Z)
    V, B, T, Z = u.shape
    b = _lead(binary, in_dims[1], size)
    b = b.reshape(V, *((1,) * (5 - b.dim())), *b.shape[1:]).expand(V, B, -1, Z, Z)
    lens = _lead(lengths, in_dims[2], size).expand(V, B)
    return u.reshape(V * B, T, Z), b.reshape(V * B, *b.shape[2:]), lens.reshape(V * B), V, B


def _unfold(x: Tensor, V: int, B: int) -> Tensor:
    return x.reshape(V, B, *x.shape[1:]) if x.numel() or x.dim() > 1 else x.expand(V, *x.shape)


def _posterior_vmap(info, in_dims, unary, binary, lengths, backend, full, want_binary):
    u, b, lens, V, B = _fold_chain(in_dims, info.batch_size, unary, binary, lengths)
    log_z, mu_u, mu_b = _posterior_op(u, b, lens, backend, full, want_binary)
    mu_b = _unfold(mu_b, V, B) if want_binary else mu_b
    return (log_z.reshape(V, B), mu_u.reshape(V, B, *mu_u.shape[1:]), mu_b), (
        0,
        0,
        0 if want_binary else None,
    )


def _log_partition_vmap(info, in_dims, unary, binary, lengths, backend):
    u, b, lens, V, B = _fold_chain(in_dims, info.batch_size, unary, binary, lengths)
    return _log_partition_op(u, b, lens, backend).reshape(V, B), 0


def _viterbi_vmap(info, in_dims, unary, binary, lengths, backend):
    u, b, lens, V, B = _fold_chain(in_dims, info.batch_size, unary, binary, lengths)
    return _viterbi_op(u, b, lens, backend).reshape(V, B, -1), 0


def _hvp_vmap(info, in_dims, mu_u, mu_b, lengths, v_u, v_b, backend):
    size = info.batch_size
    m_u = _lead(mu_u, in_dims[0], size)  # shape: (V, B, T, Z)
    V, B, T, Z = m_u.shape
    m_b = _lead(mu_b, in_dims[1], size)
    lens = _lead(lengths, in_dims[2], size).expand(V, B)
    vu = _lead(v_u, in_dims[3], size)
    vb = _lead(v_b, in_dims[4], size) if v_b.numel() else v_b
    h_u, h_b = _hvp_op(
        m_u.reshape(V * B, T, Z),
        m_b.reshape(V * B, *m_b.shape[2:]),
        lens.reshape(V * B),
        vu.reshape(V * B, T, Z),
        vb.reshape(V * B, *vb.shape[2:]) if v_b.numel() else v_b,
        backend,
    )
    return (h_u.reshape(V, B, T, Z), h_b.reshape(V, B, *h_b.shape[1:])), (0, 0)


_posterior_op.register_vmap(_posterior_vmap)
_log_partition_op.register_vmap(_log_partition_vmap)
_viterbi_op.register_vmap(_viterbi_vmap)
_hvp_op.register_vmap(_hvp_vmap)


# ---- derivatives ---------------------------------------------------------------------------


class _Posterior(torch.autograd.Function):
    """``(log Z, mu_unary, mu_binary)`` with ``d log Z = mu`` and ``d mu = H v``.

    First order (no graph requested): the marginals saved from the forward pass scale the
    incoming gradient, and cotangents on the marginals go through the analytic HVP (``_hvp``,
    no tape). Higher order (``create_graph``, ``torch.func`` transforms): the same quantities
    rebuilt differentiably (``_Posterior`` again for the marginals; autograd through the
    log-space path for ``H v``, which gives third derivatives).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        unary: Tensor, binary: Tensor, lengths: Tensor, backend: str, full: bool, want_b: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _posterior_op(unary, binary, lengths, backend, full, want_b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        unary, binary, lengths, backend, full, want_b = inputs
        ctx.backend, ctx.full, ctx.want_b = backend, full, want_b
        ctx.save_for_backward(unary, binary, lengths, output[1], output[2])
        ctx.set_materialize_grads(False)
        if not full:  # the reduced marginals only serve log Z's own gradient
            ctx.mark_non_differentiable(output[1], output[2])

    @staticmethod
    def backward(ctx: Any, g_z: Tensor | None, v_u: Tensor | None, v_b: Tensor | None) -> tuple:
        unary, binary, lengths, mu_u, mu_b = ctx.saved_tensors
        need_u, need_b = ctx.needs_input_grad[:2]
        if not ctx.full:
            v_u = v_b = None
        if torch.is_grad_enabled():
            g_u, g_b = _higher_order(ctx, unary, binary, lengths, g_z, v_u, v_b)
        else:
            mu_b = mu_b if ctx.want_b else None
            g_u, g_b = _first_order(ctx.backend, mu_u, mu_b, lengths, g_z, v_u, v_b)
            g_b = None if g_b is None else sum_to_shape(g_b, binary.shape)
        out_u = g_u.to(unary.dtype) if need_u and g_u is not None else None
        out_b = g_b.to(binary.dtype) if need_b and g_b is not None else None
        return out_u, out_b, None, None, None, None


def _first_order(backend, mu_u, mu_b, lengths, g_z, v_u, v_b):
    """``g_z mu + H v`` from the saved marginals, without a graph (binary part unsummed)."""
    g_u = g_b = None
    if g_z is not None:
        g = g_z.to(mu_u.dtype)
        if _all_ones(g):  # the gradient of a sum: the saved marginals are the answer
            g_u, g_b = mu_u, mu_b
        else:
            g_u = mu_u * g[:, None, None]
            g_b = mu_b * g[:, None, None, None] if mu_b is not None else None
    if v_u is not None or v_b is not None:
        assert mu_b is not None  # cotangents on the marginals: the full marginals were formed
        B, T, Z = mu_u.shape
        vu = mu_u.new_zeros(()).expand(B, T, Z) if v_u is None else v_u.to(mu_u.dtype)
        vb = mu_u.new_zeros(0) if v_b is None else v_b.to(mu_u.dtype)
        h_u, h_b = _hvp_op(mu_u, mu_b, lengths, vu, vb, backend)
        g_u = h_u if g_u is None else g_u + h_u
        g_b = h_b if g_b is None else g_b + h_b
    return g_u, g_b


def _all_ones(g: Tensor) -> bool:
    """Whether ``g`` is all ones, checked only where that is free (on the host).

    Returning the saved marginals then saves a pass over them (for per-(b, t) transitions,
    the largest tensor of the computation). Autograd never writes into a returned gradient
    it does not own (it copies before accumulating), so the saved tensors stay intact for a
    second backward.
    """
    return g.device.type == "cpu" and bool((g == 1).all())


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return b if a is None else a if b is None else a + b


def _higher_order(ctx, unary, binary, lengths, g_z, v_u, v_b):
    """``g_z mu + H v`` rebuilt differentiably (see ``_Posterior``), shaped like the inputs.

    ``mu`` comes from ``_Posterior`` again (its backward is the HVP), and ``H v`` from the HVP's
    plain-torch form ``_hvp.hvp(mu, v)``, an exact function of the marginals: autograd through
    it (chain rule through ``mu``) gives the third derivatives. No ``torch.autograd.grad``
    runs inside, so this also works under ``torch.func`` transforms.
    """
    _, mu_u, mu_b = _Posterior.apply(unary, binary, lengths, ctx.backend, True, True)
    g_u = g_b = None
    if g_z is not None:
        g_u = mu_u * g_z[:, None, None].to(mu_u.dtype)
        g_b = mu_b * g_z[:, None, None, None].to(mu_b.dtype)
    if v_u is not None or v_b is not None:
        mask = lengths_to_mask(lengths.to(mu_u.device), mu_u.shape[1])
        h_u, h_b = _hvp.hvp(mu_u, mu_b, mask, v_u, v_b)
        g_u, g_b = _add(g_u, h_u), _add(g_b, h_b)
    return g_u, None if g_b is None else sum_to_shape(g_b, binary.shape)


def posterior(
    unary: Tensor, binary: Tensor, lengths: Tensor, backend: AbstractChainBackend, full: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(log Z, mu_unary, mu_binary)``, differentiable (see ``_Posterior``), working dtype."""
    key = backend_key(backend)
    want_b = full or (torch.is_grad_enabled() and binary.requires_grad)
    return _Posterior.apply(unary, binary, lengths, key, full, want_b)


def log_partition_values(
    unary: Tensor, binary: Tensor, lengths: Tensor, backend: AbstractChainBackend
) -> Tensor:
    """``log Z`` without derivatives (the forward pass only), working dtype."""
    return _log_partition_op(unary, binary, lengths, backend_key(backend))


def viterbi_tags(
    unary: Tensor, binary: Tensor, lengths: Tensor, backend: AbstractChainBackend
) -> Tensor:
    """MAP tags ``[B, T]``."""
    return _viterbi_op(unary.detach(), binary.detach(), lengths, backend_key(backend))
