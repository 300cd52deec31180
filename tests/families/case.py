"""The test-case type of the family registry (``tests.families.cases``), in its own module.

The structure-specific case modules (``cases_semimarkov``, ``cases_tree``) import ``Case``
from here, and ``cases`` imports them, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

from tests.reference import brute_force

Params = dict[str, Any]


def _to(params: Params, device: torch.device | str) -> Params:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}


@dataclass(frozen=True)
class Case:
    """One family under test.

    Attributes:
        name: Test id.
        params: ``params(**fixed) -> strategy`` of parameter dicts (float64, CPU).
        like: ``like(params, **kw) -> strategy`` of parameters on the same sample space.
        make: ``make(params, **kwargs) -> ExpFamily``.
        brute: ``brute(params) -> list[Enumeration]`` (one per batch element).
        shift: ``shift(params, b, c) -> (params', expected change of A [B])``: add ``c`` to
            the potentials of one position of element ``b``.
        pad: ``pad(params, data) -> params'`` that changes only padding (None: no lengths).
        select: ``select(params, b) -> params`` of batch element ``b`` alone (batch of one).
        fixed: a small fixed parameter dict for gradcheck and sampling tests (float64).
        is_chain: marginals are ``ChainMarginals`` (unary/binary) with lengths.
        mass: ``mass(dist) -> [(got, expected), ...]``: the normalization the marginals obey
            (default: they sum to one over the last dimension, as a Categorical's).
        kbest: ``topk(k)`` is exact for every k (False: k = 1 only, a clear error beyond).
    """

    name: str
    params: Callable[..., st.SearchStrategy[Params]]
    like: Callable[..., st.SearchStrategy[Params]]
    make: Callable[..., Any]
    brute: Callable[[Params], list[brute_force.Enumeration]]
    shift: Callable[[Params, int, float], tuple[Params, torch.Tensor]]
    pad: Callable[[Params, st.DataObject], Params] | None
    select: Callable[[Params, int], Params]
    fixed: Callable[[], Params]
    is_chain: bool
    mass: Callable[[Any], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    kbest: bool = True

    def build(self, params: Params, device: Any = "cpu", **kwargs: Any) -> Any:
        return self.make(_to(params, device), **kwargs)

    def __repr__(self) -> str:
        return self.name
