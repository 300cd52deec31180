"""Registry of family test cases (numpyro style): generic tests parametrize over ``CASES``.

A case knows how to draw parameters (hypothesis), build the family on a device, enumerate it
by brute force, and declares capabilities (lengths, chain structure) instead of tests growing
``if family is X: skip`` chains.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st

import structift as st_
from tests import strategies
from tests.families.case import Case, Params
from tests.reference import brute_force
from tests.seeding import seeded


def chain_mass(dist: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One tag per position, one pair per consecutive positions, pairs consistent with tags."""
    mu = dist.marginals
    T = mu.unary.shape[1]
    mask = (torch.arange(T, device=mu.unary.device) < dist.lengths[:, None]).to(mu.unary.dtype)
    pair = mask[:, 1:]
    return [
        (mu.unary.sum(-1), mask),
        (mu.binary.sum((-1, -2)), pair),
        (mu.binary.sum(-1), mu.unary[:, :-1] * pair[..., None]),
        (mu.binary.sum(-2), mu.unary[:, 1:] * pair[..., None]),
    ]


# ---- Categorical --------------------------------------------------------------------------


def _cat_shift(params: Params, b: int, c: float) -> tuple[Params, torch.Tensor]:
    logits = params["logits"].clone()
    logits[b] += c
    delta = torch.zeros(logits.shape[0], dtype=logits.dtype)
    delta[b] = c
    return {"logits": logits}, delta


CATEGORICAL = Case(
    name="categorical",
    params=lambda **kw: strategies.categorical_params(**kw),
    like=lambda p, **kw: strategies.categorical_params(dims=tuple(p["logits"].shape), **kw),
    make=lambda p, **kw: st_.Categorical(p["logits"], **kw),
    brute=lambda p: [brute_force.categorical(row) for row in p["logits"]],
    shift=_cat_shift,
    pad=None,
    select=lambda p, b: {"logits": p["logits"][b : b + 1]},
    fixed=lambda: {
        "logits": torch.tensor([[0.3, -1.2, 2.0, 0.1], [1.0, float("-inf"), 0.0, -0.5]]).double()
    },
    is_chain=False,
)


# ---- LinearChainCRF -----------------------------------------------------------------------


def _crf_brute(p: Params) -> list[brute_force.Enumeration]:
    unary, lengths = p["unary"], p["lengths"]
    B, T, Z = unary.shape
    binary = p["binary"].expand(B, T - 1, Z, Z)
    return [brute_force.chain(unary[b], binary[b], int(lengths[b])) for b in range(B)]


def _crf_shift(p: Params, b: int, c: float) -> tuple[Params, torch.Tensor]:
    unary = p["unary"].clone()
    t = int(p["lengths"][b]) - 1  # a real (non-padding) position
    unary[b, t] += c
    delta = torch.zeros(unary.shape[0], dtype=unary.dtype)
    delta[b] = c
    return {**p, "unary": unary}, delta


def _crf_pad(p: Params, data: st.DataObject) -> Params:
    unary = p["unary"].clone()
    B, T, Z = unary.shape
    binary = p["binary"].expand(B, T - 1, Z, Z).clone()
    junk = data.draw(strategies.tensors((B, T, Z), neg_inf=True))
    junk_b = data.draw(strategies.tensors((B, max(T - 1, 0), Z, Z), neg_inf=True))
    for b in range(B):
        n = int(p["lengths"][b])
        unary[b, n:] = junk[b, n:]
        binary[b, max(n - 1, 0) :] = junk_b[b, max(n - 1, 0) :]
    return {**p, "unary": unary, "binary": binary}


def _crf_fixed() -> Params:
    # Small on purpose (gradgradcheck cost grows with the input count): B=2, T=4, Z=2.
    g = seeded(1)
    unary = torch.randn(2, 4, 2, generator=g, dtype=torch.float64)
    binary = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    unary[0, 1, 1] = float("-inf")
    binary[1, 0, 0, 1] = float("-inf")
    return {"unary": unary, "binary": binary, "lengths": torch.tensor([4, 3])}


CRF = Case(
    name="crf",
    params=lambda **kw: strategies.chain_params(**kw),
    like=lambda p, **kw: strategies.chain_params(
        dims=tuple(p["unary"].shape), lengths=p["lengths"], **kw
    ),
    make=lambda p, **kw: st_.LinearChainCRF(p["unary"], p["binary"], p["lengths"], **kw),
    brute=_crf_brute,
    shift=_crf_shift,
    pad=_crf_pad,
    select=lambda p, b: {
        "unary": p["unary"][b : b + 1],
        "binary": p["binary"][b : b + 1] if p["binary"].dim() == 4 else p["binary"],
        "lengths": p["lengths"][b : b + 1],
    },
    fixed=_crf_fixed,
    is_chain=True,
    mass=chain_mass,
)


# ---- HMM ----------------------------------------------------------------------------------

_HMM_ARGS = ("init_logits", "transition_logits", "emission_logits", "observations", "lengths")


def _hmm_row(p: Params, name: str, b: int) -> torch.Tensor:
    x = p[name]
    batched = x.dim() == {"init_logits": 2, "transition_logits": 3, "emission_logits": 3}[name]
    return x[b] if batched else x


def _hmm_brute(p: Params) -> list[brute_force.Enumeration]:
    B = p["observations"].shape[0]
    return [
        brute_force.hmm_posterior(
            _hmm_row(p, "init_logits", b),
            _hmm_row(p, "transition_logits", b),
            _hmm_row(p, "emission_logits", b),
            p["observations"][b],
            int(p["lengths"][b]),
        )
        for b in range(B)
    ]


def _hmm_shift(p: Params, b: int, c: float) -> tuple[Params, torch.Tensor]:
    # Rows are softmax-normalised: shifting one row's logits changes nothing at all.
    emission = p["emission_logits"].clone()
    row = emission[b] if emission.dim() == 3 else emission
    row[0] += c
    return {**p, "emission_logits": emission}, torch.zeros(p["observations"].shape[0]).double()


def _hmm_pad(p: Params, data: st.DataObject) -> Params:
    obs = p["observations"].clone()
    B, T = obs.shape
    V = p["emission_logits"].shape[-1]
    for b in range(B):
        n = int(p["lengths"][b])
        for t in range(n, T):
            # Padding may hold anything, out-of-range values (e.g. -100) included.
            obs[b, t] = data.draw(st.sampled_from([-100, 0, V - 1, V + 5]))
    return {**p, "observations": obs}


def _hmm_fixed() -> Params:
    g = seeded(2)
    transition = torch.randn(3, 3, generator=g, dtype=torch.float64)
    transition[0, 2] = float("-inf")
    return {
        "init_logits": torch.randn(3, generator=g, dtype=torch.float64),
        "transition_logits": transition,
        "emission_logits": torch.randn(3, 2, generator=g, dtype=torch.float64),
        "observations": torch.tensor([[0, 1, 1, 0], [1, 0, 1, 7]]),
        "lengths": torch.tensor([4, 3]),
    }


HMM = Case(
    name="hmm",
    params=lambda **kw: strategies.hmm_params(**kw),
    like=lambda p, **kw: strategies.hmm_params(
        dims=(*p["observations"].shape, *p["emission_logits"].shape[-2:]),
        lengths=p["lengths"],
        observations=p["observations"],
        **kw,
    ),
    make=lambda p, **kw: st_.HMM(*(p[k] for k in _HMM_ARGS), **kw),
    brute=_hmm_brute,
    shift=_hmm_shift,
    pad=_hmm_pad,
    select=lambda p, b: {
        **{k: _hmm_row(p, k, b) for k in _HMM_ARGS[:3]},
        "observations": p["observations"][b : b + 1],
        "lengths": p["lengths"][b : b + 1],
    },
    fixed=_hmm_fixed,
    is_chain=True,
    mass=chain_mass,
)


def _structures() -> list[Case]:
    """The segmentation and tree cases (their own modules, which import ``Case`` from here)."""
    from tests.families.cases_semimarkov import SEMI_MARKOV
    from tests.families.cases_tree import ALL_TREE_CASES

    return [SEMI_MARKOV, *ALL_TREE_CASES]


CASES = [CATEGORICAL, CRF, HMM, *_structures()]
CHAIN_CASES = [c for c in CASES if c.is_chain]
