"""Semirings for the chain dynamic programs, each with a true ``-inf`` zero.

A semiring here is the pair (``plus``, ``times``) = (``sum_op``, ``+``) acting on log-space
scores: the log semiring sums with a NaN-safe logsumexp (inference of ``log Z``), the max
semiring with ``amax`` (Viterbi). Their zero is ``-inf`` and their one is ``0``: never a finite
stand-in, so hard constraints stay exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from structift._ops import logsumexp

__all__ = ["Log", "Max", "Semiring"]


def _amax(x: Tensor, dim: int) -> Tensor:
    return torch.amax(x, dim=dim)


@dataclass(frozen=True)
class Semiring:
    """A commutative semiring over log-space scores.

    Attributes:
        name: Short name used in reprs and error messages.
        sum: ``sum(x, dim) -> Tensor``, the semiring addition reduced along ``dim``.
        zero: Additive identity (``-inf``).
        one: Multiplicative identity (``0``); multiplication is ordinary ``+``.
    """

    name: str
    sum: Callable[[Tensor, int], Tensor]
    zero: float = -float("inf")
    one: float = 0.0

    def matvec(self, alpha: Tensor, weights: Tensor) -> Tensor:
        """Compute ``out[b, j] = sum_i alpha[b, i] * weights[b, i, j]`` in this semiring.

        Args:
            alpha: ``[B, Z]`` scores over the ``from`` state.
            weights: ``[B, Z, Z]`` scores laid out ``[from, to]``.

        Returns:
            ``[B, Z]`` scores over the ``to`` state.
        """
        return self.sum(alpha.unsqueeze(-1) + weights, -2)

    def matvec_argmax(self, alpha: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``matvec`` and the maximizing ``from`` state (the max semiring's back-pointers).

        Ties go to the lowest index. Only for selective semirings (``Max``).
        """
        if self.name != "max":
            raise TypeError(f"matvec_argmax needs the max semiring; {self.name} is not selective")
        return (alpha.unsqueeze(-1) + weights).max(dim=-2)


Log = Semiring("log", logsumexp)
"""Log semiring: ``plus`` = NaN-safe logsumexp, ``times`` = ``+``; gives ``log Z``."""

Max = Semiring("max", _amax)
"""Max (tropical) semiring: ``plus`` = max, ``times`` = ``+``; gives the Viterbi score."""
