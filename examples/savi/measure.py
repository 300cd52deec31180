"""Unrolled vs IFT against the number of refinement steps K: gradients, memory, time.

Memory is measured two ways on CPU:

- *graph bytes* (every run): the bytes of every tensor autograd saves for the backward (a
  ``saved_tensors_hooks`` pack hook; each storage counted once, released when autograd
  releases it), held after the forward and at most during the backward (where the IFT
  records the residual's graph for its Hessian-vector products). Deterministic: it is what
  the graph holds, independent of the allocator and of other processes;
- *malloc peak* (``--malloc-peak``, glibc only, slow): the process's allocated bytes
  (``mallinfo2``) sampled after every ATen op of forward + backward (a dispatch mode),
  above what was allocated before. ``torch.profiler``'s memory events were tried first and
  undercount the IFT backward (0.8 MiB against 2–4 MiB here): allocations made by the
  ``torch.autograd.grad`` calls nested inside a custom ``Function.backward`` are not all
  attributed to events.
"""

from __future__ import annotations

import ctypes
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from savi.model import GaussianVAE, Params, Posterior
from savi.refine import (
    Inner,
    SolveLog,
    linear_solver,
    refine_ift,
    refine_unrolled,
    stationarity,
)

OUTERS = ("elbo", "iw")


@dataclass(frozen=True)
class Problem:
    """One minibatch of the inner problem: θ, x, fixed noise, and λ₀."""

    vae: GaussianVAE
    params: Params
    x: Tensor
    eps: Tensor
    eps_iw: Tensor
    lam0: Posterior

    def to(self, dtype: torch.dtype) -> Problem:
        """Return a copy in ``dtype`` with fresh leaves (θ and λ₀ require grad)."""

        def leaf(t: Tensor) -> Tensor:
            return t.detach().to(dtype).requires_grad_(True)

        return Problem(
            self.vae,
            tuple(leaf(p) for p in self.params),
            self.x.to(dtype),
            self.eps.to(dtype),
            self.eps_iw.to(dtype),
            Posterior(leaf(self.lam0.mean), leaf(self.lam0.log_std)),
        )

    def outer(self, name: str, lam: Posterior) -> Tensor:
        """The outer objective (to maximize): the ELBO or the IW bound at λ, summed."""
        if name == "elbo":
            return self.vae.elbo(lam, self.params, self.x, self.eps).sum()
        return self.vae.iw_bound(lam, self.params, self.x, self.eps_iw).sum()

    def lam(self, method: str, K: int, inner: Inner, log: SolveLog, solver: str = "minres"):
        """λ_K by unrolling or with the IFT backward."""
        if method == "unrolled":
            return refine_unrolled(self.vae, self.params, self.x, self.eps, self.lam0, K, inner)
        lin = linear_solver(solver, self.x.dtype, log)
        return refine_ift(self.vae, self.params, self.x, self.eps, self.lam0, K, inner, lin)


def gradients(
    p: Problem, method: str, outer: str, K: int, inner: Inner, log: SolveLog, solver="minres"
) -> tuple[Tensor, Tensor]:
    """Return (dθ, dλ₀) of the outer objective at λ_K, each flattened to one vector."""
    value = p.outer(outer, p.lam(method, K, inner, log, solver))
    grads = torch.autograd.grad(value, (*p.params, *p.lam0), allow_unused=True)
    flat = [
        torch.zeros_like(t).flatten() if g is None else g.flatten()
        for g, t in zip(grads, (*p.params, *p.lam0))
    ]
    n = len(p.params)
    return torch.cat(flat[:n]), torch.cat(flat[n:])


def gradient_agreement(p: Problem, Ks: list[int], inner: Inner) -> list[dict]:
    """For each K and outer objective: ‖dθ_unrolled − dθ_IFT‖ / ‖dθ_IFT‖ and ‖dλ₀‖ of both."""
    p = p.to(torch.float64)
    rows = []
    for K in Ks:
        lam = refine_unrolled(p.vae, p.params, p.x, p.eps, p.lam0, K, inner, False)
        res = stationarity(p.vae, lam, tuple(t.detach() for t in p.params), p.x, p.eps)
        for outer in OUTERS:
            log = SolveLog.empty()
            gu, lu = gradients(p, "unrolled", outer, K, inner, log)
            gi, li = gradients(p, "ift", outer, K, inner, log)
            rows.append(
                {
                    "K": K,
                    "outer": outer,
                    "rel_diff": float((gu - gi).norm() / gi.norm()),
                    "grad_norm": float(gi.norm()),
                    "lam0_unrolled": float(lu.norm()),
                    "lam0_ift": float(li.norm()),
                    "stationarity": float(res.max()),
                    "cg_iters": log.iterations[-1],
                    "cg_residual": log.residual[-1],
                }
            )
    return rows


class _Saved:
    """What the pack hook hands to autograd: the tensor, and a handle to count its life."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedBytes:
    """Track the bytes of tensors that autograd holds for backward, saved inside the context.

    Every saved tensor is wrapped; when autograd releases it (after a backward, or when a
    graph built for ``torch.autograd.grad`` is freed) its storage stops counting. ``live``
    is what is held now, ``peak`` the most held at once; a storage counts once however many
    saved tensors view it.
    """

    def __init__(self) -> None:
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage address -> [saved tensors, bytes]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> _Saved:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        entry = self._refs.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        saved = _Saved(t)
        weakref.finalize(saved, self._release, key)
        return saved

    @staticmethod
    def _unpack(saved: _Saved) -> Tensor:
        return saved.tensor

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def graph_bytes(p: Problem, method: str, K: int, inner: Inner, solver: str = "minres"):
    """Return (bytes the graph holds after the forward, peak bytes saved in the backward)."""
    log = SolveLog.empty()
    with SavedBytes() as fwd:
        value = -p.outer("elbo", p.lam(method, K, inner, log, solver))
    held = fwd.live
    with SavedBytes() as bwd:
        value.backward()
    return held, bwd.peak


class _MallocPeak(TorchDispatchMode):
    """Sample glibc's allocated bytes after every ATen op; keep the maximum."""

    def __init__(self, allocated: Callable[[], int]) -> None:
        super().__init__()
        self.allocated, self.base, self.peak = allocated, allocated(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.allocated() - self.base)
        return out


def _glibc_allocated() -> Callable[[], int]:
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2

    def allocated() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd  # heap in use + mmapped blocks

    return allocated


_MALLINFO2 = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
_MALLINFO2 = _MALLINFO2.split()


def malloc_peak(p: Problem, method: str, K: int, inner: Inner) -> int:
    """Peak bytes allocated (glibc ``mallinfo2``) during one forward + backward of ``method``."""
    allocated = _glibc_allocated()
    with _MallocPeak(allocated) as mode:
        value = -p.outer("elbo", p.lam(method, K, inner, SolveLog.empty()))
        value.backward()
    return mode.peak


def step_cost(p: Problem, Ks: list[int], inner: Inner, repeats: int) -> list[dict]:
    """Graph bytes and median fwd+bwd seconds for each method and K."""
    rows = []
    for K in Ks:
        for method in ("unrolled", "ift"):
            fwd, bwd = graph_bytes(p, method, K, inner)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                value = -p.outer("elbo", p.lam(method, K, inner, SolveLog.empty()))
                value.backward()
                times.append(time.perf_counter() - start)
            rows.append(
                {
                    "K": K,
                    "method": method,
                    "graph_fwd": fwd,
                    "graph_bwd": bwd,
                    "seconds": statistics.median(times),
                }
            )
    for t in (*p.params, *p.lam0):
        t.grad = None
    return rows
