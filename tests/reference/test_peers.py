"""Cross-checks against torch-struct 0.5 and pytorch-crf 0.7.2 on random inputs with lengths.

torch-struct folds unary potentials into edge potentials laid out ``[to, from]``:
edge[b, t, j, i] = binary[b, t, i, j] + unary[b, t+1, j] (+ unary[b, 0, i] at t = 0).
pytorch-crf takes emissions, one shared [from, to] transition matrix, start and end
transitions and a bool mask; its log-likelihood of tags is our log_prob once the start scores
are added to unary[:, 0] and the end scores to unary[b, length - 1].
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as hst
from torch.testing import assert_close

import structift as st
from tests import strategies
from tests.seeding import seeded

torch_struct = pytest.importorskip("torch_struct")
torchcrf = pytest.importorskip("torchcrf")

pytestmark = pytest.mark.reference

TOL = {"rtol": 1e-8, "atol": 1e-8}


def _to_torch_struct(unary: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    edge = binary.transpose(-1, -2) + unary[:, 1:, :, None]  # shape: (B, T-1, Z_to, Z_from)
    first = edge[:, :1] + unary[:, :1, None, :]
    return torch.cat([first, edge[:, 1:]], dim=1)


@given(
    params=strategies.chain_params(dims=None, neg_inf=False, shared_binary=False).filter(
        lambda p: p["unary"].shape[1] >= 2
    )
)
def test_against_torch_struct(params) -> None:
    unary, binary, lengths = params["unary"], params["binary"], params["lengths"]
    # torch-struct needs lengths >= 2 and the longest equal to T.
    lengths = lengths.clamp(min=2)
    lengths[0] = unary.shape[1]
    ours = st.LinearChainCRF(unary, binary, lengths)
    theirs = torch_struct.LinearChainCRF(_to_torch_struct(unary, binary), lengths=lengths)
    assert_close(ours.log_partition, theirs.partition.detach(), **TOL)
    assert_close(ours.entropy(), theirs.entropy.detach(), **TOL)
    edge_marginals = theirs.marginals.detach().transpose(-1, -2)  # back to [from, to]
    pair = (torch.arange(1, unary.shape[1]) < lengths[:, None]).double()[..., None, None]
    assert_close(ours.marginals.binary, edge_marginals * pair, **TOL)
    assert_close(ours.max_score, theirs.max.detach(), **TOL)


def test_against_torch_struct_random_larger() -> None:
    g = seeded(11)
    B, T, Z = 8, 12, 5
    unary = torch.randn(B, T, Z, generator=g, dtype=torch.float64) * 3
    binary = torch.randn(B, T - 1, Z, Z, generator=g, dtype=torch.float64)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    ours = st.LinearChainCRF(unary, binary, lengths)
    theirs = torch_struct.LinearChainCRF(_to_torch_struct(unary, binary), lengths=lengths)
    assert_close(ours.log_partition, theirs.partition.detach(), **TOL)
    assert_close(ours.entropy(), theirs.entropy.detach(), **TOL)
    q_unary = torch.randn(B, T, Z, generator=g, dtype=torch.float64)
    q = st.LinearChainCRF(q_unary, binary, lengths)
    theirs_q = torch_struct.LinearChainCRF(_to_torch_struct(q_unary, binary), lengths=lengths)
    assert_close(torch.distributions.kl_divergence(ours, q), theirs.kl(theirs_q).detach(), **TOL)


def _pytorch_crf(Z: int, start, end, transitions) -> torchcrf.CRF:
    crf = torchcrf.CRF(Z, batch_first=True).double()
    with torch.no_grad():
        crf.start_transitions.copy_(start)
        crf.end_transitions.copy_(end)
        crf.transitions.copy_(transitions)
    return crf


@given(data=hst.data())
def test_against_pytorch_crf(data) -> None:
    params = data.draw(strategies.chain_params(neg_inf=False, shared_binary=True))
    unary, transitions, lengths = params["unary"], params["binary"], params["lengths"]
    B, T, Z = unary.shape
    start = data.draw(strategies.tensors((Z,)))
    end = data.draw(strategies.tensors((Z,)))
    mask = torch.arange(T)[None, :] < lengths[:, None]  # shape: (B, T)
    # Fold start and end scores into the unary potentials of the first and last positions.
    ours_unary = unary.clone()
    ours_unary[:, 0] += start
    ours_unary[torch.arange(B), lengths - 1] += end
    ours = st.LinearChainCRF(ours_unary, transitions, lengths)
    theirs = _pytorch_crf(Z, start, end, transitions)

    normalizer = theirs._compute_normalizer(unary.transpose(0, 1), mask.transpose(0, 1))
    assert_close(ours.log_partition, normalizer.detach(), **TOL)
    tags = data.draw(
        hst.lists(hst.lists(hst.integers(0, Z - 1), min_size=T, max_size=T), min_size=B, max_size=B)
    )
    tags = torch.tensor(tags)
    tags = torch.where(mask, tags, torch.zeros_like(tags))
    llh = theirs(unary, tags, mask=mask, reduction="none")
    assert_close(ours.log_prob(tags), llh.detach(), **TOL)
    decoded = theirs.decode(unary, mask=mask)
    best = ours.score(ours.argmax)
    for b in range(B):
        path = torch.zeros(T, dtype=torch.long)
        path[: int(lengths[b])] = torch.tensor(decoded[b])
        # Compare scores, not paths: ties may be broken differently.
        assert_close(best[b], ours.score(path.expand(B, T))[b], **TOL)


def test_gradients_against_pytorch_crf() -> None:
    """d log-likelihood / d emissions and transitions agree with pytorch-crf's autograd."""
    g = seeded(12)
    B, T, Z = 6, 9, 4
    emissions = torch.randn(B, T, Z, generator=g, dtype=torch.float64, requires_grad=True)
    transitions = torch.randn(Z, Z, generator=g, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    tags = torch.randint(0, Z, (B, T), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    zeros = torch.zeros(Z, dtype=torch.float64)
    theirs = _pytorch_crf(Z, zeros, zeros, transitions.detach())
    theirs.transitions.requires_grad_(True)
    llh = theirs(emissions, tags, mask=mask, reduction="sum")
    ref = torch.autograd.grad(llh, [emissions, theirs.transitions])
    ours = st.LinearChainCRF(emissions, transitions, lengths).log_prob(tags).sum()
    mine = torch.autograd.grad(ours, [emissions, transitions])
    for a, r in zip(mine, ref):
        assert_close(a, r, **TOL)
