"""Registry of family cases for the variational tests: a strategy per family, one builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st

import structift as sf
from tests.strategies import categorical_params, chain_params, hmm_params

TEMPERATURES = [0.25, 1.0, 3.0]


@dataclass(frozen=True)
class Case:
    """A family: how to draw its parameters and build it in a dtype."""

    name: str
    params: Any  # a hypothesis strategy of parameter dicts

    def build(self, p: dict[str, Any], dtype: torch.dtype = torch.float64) -> Any:
        f = {k: v.to(dtype) if v.is_floating_point() else v for k, v in p.items()}
        if self.name == "categorical":
            return sf.Categorical(f["logits"])
        if self.name == "crf":
            return sf.LinearChainCRF(f["unary"], f["binary"], f["lengths"])
        return sf.HMM(
            f["init_logits"],
            f["transition_logits"],
            f["emission_logits"],
            f["observations"],
            f["lengths"],
        )


CASES = [
    Case("categorical", categorical_params()),
    Case("crf", chain_params()),
    Case("hmm", hmm_params()),
]
CASE_IDS = [c.name for c in CASES]

temperatures = st.sampled_from(TEMPERATURES)
