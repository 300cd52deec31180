"""Chain backends as values: one written interface, three engines, one way to choose.

A backend is an immutable object that runs the chain's dynamic programs:

| method | computes |
|---|---|
| ``forward(unary, binary, lengths, eager)`` | ``(log Z [B], state)``; ``state`` is opaque |
| ``backward(state, ..., grad, binary_shape)`` | ``grad * mu``, binary summed to its shape |
| ``sweeps(mu_u, mu_b, vu0, g_f, inv_to, g_b, inv_from)`` | the HVP's two recursions |
| ``viterbi(unary, binary, lengths)`` | MAP tags ``[B, T]`` (ties to the lowest state) |
| ``sample(unary, binary, lengths, shape, generator)`` | exact samples ``[*shape, B, T]`` |

The engines: ``Log`` (the log-space reference, ``_log``), ``Scaled`` (probability space with
per-step rescaling, certified, log-space fallback per row; the CPU default) and ``Fused``
(Triton kernels, one program per sequence; the CUDA default; its launch settings are its
fields). They agree to rounding on every input.

Choosing: a structure takes ``backend=`` when it is built (an object, or a name ``"auto"``,
``"scaled"``, ``"fused"``, ``"log"``); without one, the innermost ``use_backend(...)`` block
decides, else the default named by ``STRUCTIFT_CHAIN_KERNEL`` (read in ``structift.config``),
else ``"auto"``: ``Fused`` for CUDA tensors when Triton is installed, ``Z <= 128`` and the
kernel passes a one-time self-check on that device, ``Scaled`` otherwise. Chains of length 1
have no transitions and run ``Scaled``.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from structift import config
from structift._ops import sum_to_shape
from structift.structures.chain import (
    _decode,
    _fused,
    _fused_decode,
    _fused_hvp,
    _hvp,
    _log,
    _scaled,
)

__all__ = [
    "AbstractChainBackend",
    "BackendSpec",
    "Fused",
    "Log",
    "Scaled",
    "current_backend",
    "resolve",
    "use_backend",
]


class AbstractChainBackend(abc.ABC):
    """The interface every chain engine implements (see the module docstring)."""

    name: ClassVar[str]

    @property
    def key(self) -> str:
        """A string that identifies this backend and its settings (the operators take it)."""
        return self.name

    def __post_init__(self) -> None:
        REGISTRY.setdefault(self.key, self)  # the operators find a backend by its key

    def can_run(self, unary: Tensor) -> bool:
        """Whether this engine runs on these potentials (device, size, installed software)."""
        return True

    @abc.abstractmethod
    def forward(
        self, unary: Tensor, binary: Tensor, lengths: Tensor, eager: bool = False
    ) -> tuple[Tensor, Any]:
        """``(log Z [B], state)``; ``eager`` lets an engine form marginals during the pass."""

    @abc.abstractmethod
    def backward(
        self,
        state: Any,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        grad: Tensor,
        binary_shape: tuple[int, ...] | None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(grad * mu_unary, sum-to-shape(grad * mu_binary))``; consumes ``state``."""

    @abc.abstractmethod
    def sweeps(self, *tangents: Tensor) -> tuple[Tensor, Tensor]:
        """The centred tangent messages ``(ra, rb)`` of ``_hvp`` (arguments as there)."""

    @abc.abstractmethod
    def viterbi(self, unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
        """MAP tags LongTensor ``[B, T]``, 0 beyond each length, ties to the lowest state."""

    @abc.abstractmethod
    def sample(
        self,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        sample_shape: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> Tensor:
        """Exact samples LongTensor ``[*sample_shape, B, T]``, 0 beyond each length."""


REGISTRY: dict[str, AbstractChainBackend] = {}
"""Every backend by its ``key`` (custom operators take strings, not objects)."""


class _LoopDecoding(AbstractChainBackend):
    """Viterbi, sampling and HVP sweeps as loops of torch ops (any device)."""

    def sweeps(self, *tangents: Tensor) -> tuple[Tensor, Tensor]:
        return _hvp.loop_sweeps(*tangents)

    def viterbi(self, unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
        return _decode.viterbi(unary, binary, lengths)

    def sample(
        self,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        sample_shape: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> Tensor:
        return _decode.sample(unary, binary, lengths, sample_shape, generator)


@dataclass(frozen=True)
class Log(_LoopDecoding):
    """The log-space reference engine (``_log``): centred messages, any device, slowest."""

    name: ClassVar[str] = "log"

    def forward(
        self, unary: Tensor, binary: Tensor, lengths: Tensor, eager: bool = False
    ) -> tuple[Tensor, Any]:
        return _log.log_partition(unary.detach(), binary.detach(), lengths), None

    def backward(
        self,
        state: Any,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        grad: Tensor,
        binary_shape: tuple[int, ...] | None,
    ) -> tuple[Tensor, Tensor | None]:
        _, mu_u, mu_b = _log.forward_backward(unary.detach(), binary.detach(), lengths)
        g_u = mu_u * grad[:, None, None]
        if binary_shape is None:
            return g_u, None
        return g_u, sum_to_shape(mu_b * grad[:, None, None, None], torch.Size(binary_shape))


@dataclass(frozen=True)
class Scaled(_LoopDecoding):
    """Probability space with per-step rescaling, certified per row (``_scaled``); CPU default."""

    name: ClassVar[str] = "scaled"

    def forward(
        self, unary: Tensor, binary: Tensor, lengths: Tensor, eager: bool = False
    ) -> tuple[Tensor, Any]:
        return _scaled.forward(unary, binary, lengths, eager=eager)

    def backward(
        self,
        state: Any,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        grad: Tensor,
        binary_shape: tuple[int, ...] | None,
    ) -> tuple[Tensor, Tensor | None]:
        return _scaled.backward(state, unary, binary, lengths, grad, binary_shape)


@dataclass(frozen=True)
class Fused(AbstractChainBackend):
    """Triton kernels, one program per sequence, the whole chain in one launch (``_fused``).

    Runs on CUDA tensors (or on CPU under ``TRITON_INTERPRET=1``) with ``Z <= 128``.

    Args:
        warps: warps per program (default: one per 512 tile entries, 1..8).
        prefetch: load step ``t+1``'s tile during step ``t`` (default: for ``Z <= 64``).
    """

    name: ClassVar[str] = "fused"
    warps: int | None = None
    prefetch: bool | None = None

    @property
    def key(self) -> str:
        return f"fused/{self.warps}/{self.prefetch}"

    def can_run(self, unary: Tensor) -> bool:
        return _fused.supports(unary)

    def forward(
        self, unary: Tensor, binary: Tensor, lengths: Tensor, eager: bool = False
    ) -> tuple[Tensor, Any]:
        return _fused.forward(unary, binary, lengths, warps=self.warps, prefetch=self.prefetch)

    def backward(
        self,
        state: Any,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        grad: Tensor,
        binary_shape: tuple[int, ...] | None,
    ) -> tuple[Tensor, Tensor | None]:
        return _fused.backward(
            state, unary, binary, lengths, grad, binary_shape,
            warps=self.warps, prefetch=self.prefetch,
        )  # fmt: skip

    def sweeps(self, *tangents: Tensor) -> tuple[Tensor, Tensor]:
        return _fused_hvp.sweeps(*tangents)

    def viterbi(self, unary: Tensor, binary: Tensor, lengths: Tensor) -> Tensor:
        return _fused_decode.viterbi(unary, binary, lengths, warps=self.warps)

    def sample(
        self,
        unary: Tensor,
        binary: Tensor,
        lengths: Tensor,
        sample_shape: tuple[int, ...],
        generator: torch.Generator | None,
    ) -> Tensor:
        return _fused_decode.sample(unary, binary, lengths, sample_shape, generator)


for _default in (Log(), Scaled(), Fused()):  # registered at import, before any tracing
    REGISTRY.setdefault(_default.key, _default)

BackendSpec = AbstractChainBackend | str | None
_NAMES: dict[str, type[AbstractChainBackend]] = {"log": Log, "scaled": Scaled, "fused": Fused}
_CURRENT: contextvars.ContextVar[BackendSpec] = contextvars.ContextVar(
    "structift_chain_backend", default=None
)


def _named(spec: str) -> AbstractChainBackend | None:
    if spec == "auto":
        return None
    if spec not in _NAMES:
        raise ValueError(
            f"backend must be a chain backend object (Log(), Scaled(), Fused(...)) or one of "
            f"{('auto', *_NAMES)}; got {spec!r}"
        )
    return _NAMES[spec]()


def _check(spec: object) -> BackendSpec:
    if spec is None or isinstance(spec, AbstractChainBackend):
        return spec
    if isinstance(spec, str):
        _named(spec)
        return spec
    raise TypeError(
        "backend must be a chain backend object (Log(), Scaled(), Fused(...)), a name "
        f"('auto', 'scaled', 'fused', 'log') or None; got {type(spec).__name__}"
    )


@contextlib.contextmanager
def use_backend(backend: BackendSpec) -> Iterator[None]:
    """Within the block, chains built without ``backend=`` use ``backend``.

    Args:
        backend: a backend object, a name (``"auto"``, ``"scaled"``, ``"fused"``, ``"log"``),
            or ``None`` (the default again). Context-local (``contextvars``): threads and
            asyncio tasks each see their own choice.
    """
    token = _CURRENT.set(_check(backend))
    try:
        yield
    finally:
        _CURRENT.reset(token)


@torch.compiler.assume_constant_result
def current_backend() -> BackendSpec:
    """The choice in effect: the innermost ``use_backend``, else the configured default name."""
    spec = _CURRENT.get()
    return spec if spec is not None else config.chain_backend()


def resolve(spec: BackendSpec, unary: Tensor) -> AbstractChainBackend:
    """Turn a backend choice into the engine that runs on ``unary`` (device and shape read).

    ``None`` means ``current_backend()``. ``"auto"`` picks ``Fused`` on CUDA where it can run
    and passed its one-time self-check there, else ``Scaled``. An explicit backend that cannot
    run on these potentials raises a ``ValueError`` saying why. Chains with ``T = 1`` run
    ``Scaled`` (except under ``Log``).
    """
    spec = current_backend() if spec is None else _check(spec)
    backend = _named(spec) if isinstance(spec, str) else spec
    if isinstance(backend, Log):
        return backend
    if unary.shape[1] < 2:
        return Scaled()
    if backend is None:
        usable = unary.is_cuda and _fused.supports(unary) and _fused.works_on(unary.device)
        return Fused() if usable else Scaled()
    if not backend.can_run(unary):
        raise ValueError(
            f"the {backend.name} chain backend cannot run here: it needs Triton installed, a "
            f"CUDA tensor (or CPU with TRITON_INTERPRET=1) and Z <= {_fused.MAX_Z}; got a "
            f"{unary.device.type} tensor with Z = {unary.shape[2]}, triton installed: "
            f"{_fused.triton_available()}. Use backend='auto' or 'scaled'."
        )
    return backend
