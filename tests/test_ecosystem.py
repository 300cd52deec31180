"""structift with the rest of PyTorch: torch.func, torch.compile, autocast, masks (issue 11).

Every derivative below is checked against plain autograd (or a Python loop over examples) on
the same float64 inputs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.func import grad, jacrev, vmap

import structift as st
from tests.seeding import seeded

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def _chain(B: int = 3, T: int = 5, Z: int = 4, seed: int = 0):
    g = seeded(seed)
    unary = torch.randn(B, T, Z, dtype=F64, generator=g)
    binary = torch.randn(Z, Z, dtype=F64, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return unary, binary, lengths


class TestTorchFunc:
    def test_grad_of_the_log_partition_is_autograd(self) -> None:
        u, b, L = _chain()

        def log_z(u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return st.LinearChainCRF(u, b, L).log_partition.sum()

        got = grad(log_z, argnums=(0, 1))(u, b)
        leaves = (u.clone().requires_grad_(), b.clone().requires_grad_())
        ref = torch.autograd.grad(log_z(*leaves), leaves)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)

    def test_per_example_gradients_by_vmap_equal_a_loop(self) -> None:
        u, b, L = _chain(B=4)

        def one(u1: torch.Tensor, b: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
            return st.LinearChainCRF(u1[None], b, l1[None]).log_partition[0]

        per_u, per_b = vmap(grad(one, argnums=(0, 1)), in_dims=(0, None, 0))(u, b, L)
        assert per_b.shape == (4, *b.shape)
        for i in range(4):
            leaves = (u[i].clone().requires_grad_(), b.clone().requires_grad_())
            ref = torch.autograd.grad(one(leaves[0], leaves[1], L[i]), leaves)
            torch.testing.assert_close(per_u[i], ref[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(per_b[i], ref[1], rtol=1e-12, atol=1e-12)

    def test_jacrev_of_the_marginals_is_the_hessian(self) -> None:
        u, b, L = _chain(B=2, T=3, Z=3)

        def mu(u: torch.Tensor) -> torch.Tensor:
            return st.LinearChainCRF(u, b, L).marginals.unary

        J = jacrev(mu)(u)
        H = jacrev(jacrev(lambda u: st.LinearChainCRF(u, b, L).log_partition.sum()))(u)
        torch.testing.assert_close(J, H, rtol=1e-10, atol=1e-12)
        x = u.clone().requires_grad_()
        ref = torch.autograd.functional.jacobian(mu, x)
        torch.testing.assert_close(J, ref, rtol=1e-10, atol=1e-12)

    def test_vmap_and_grad_of_the_entropy(self) -> None:
        u, b, L = _chain()

        def h(u1: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
            return st.LinearChainCRF(u1[None], b, l1[None]).entropy()[0]

        batched = vmap(h)(u, L)
        torch.testing.assert_close(batched, st.LinearChainCRF(u, b, L).entropy())
        g = grad(lambda u: st.LinearChainCRF(u, b, L).entropy().sum())(u)
        x = u.clone().requires_grad_()
        (ref,) = torch.autograd.grad(st.LinearChainCRF(x, b, L).entropy().sum(), x)
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)

    def test_categorical_under_transforms(self) -> None:
        logits = torch.randn(4, 6, dtype=F64, generator=seeded(3))
        g = vmap(grad(lambda x: st.Categorical(x).entropy()))(logits)
        x = logits.clone().requires_grad_()
        (ref,) = torch.autograd.grad(st.Categorical(x).entropy().sum(), x)
        torch.testing.assert_close(g, ref)


@pytest.mark.slow
def test_compiled_nll_compiles_once_over_lengths_and_batch_sizes() -> None:
    """fullgraph, dynamic shapes: one graph for every (B, T, lengths); values and grads eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trans = torch.randn(5, 5, dtype=F64, generator=seeded(4), requires_grad=True)

    def nll(emissions: torch.Tensor, tags: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        crf = st.LinearChainCRF(emissions, trans, lengths, validate_args=False)
        return (crf.log_partition - crf.score(tags)).sum()

    compiled = torch.compile(nll, dynamic=True, fullgraph=True)
    g = seeded(5)
    for B, T in [(4, 7), (6, 9), (3, 12), (5, 7), (2, 30)]:
        emissions = torch.randn(B, T, 5, dtype=F64, generator=g)
        tags = torch.randint(0, 5, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        got = [emissions.clone().requires_grad_()]
        out = compiled(got[0], tags, lengths)
        got_grads = torch.autograd.grad(out, [got[0], trans])
        ref_e = emissions.clone().requires_grad_()
        ref = nll(ref_e, tags, lengths)
        ref_grads = torch.autograd.grad(ref, [ref_e, trans])
        torch.testing.assert_close(out, ref)
        for a, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(a, r)
    assert counters["stats"]["unique_graphs"] == 1


def test_autocast_promotes_low_precision_emissions() -> None:
    g = seeded(6)
    layer = torch.nn.Linear(4, 3)
    trans = torch.nn.Parameter(torch.randn(3, 3, generator=g))
    x = torch.randn(2, 5, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emissions = layer(x)
        assert emissions.dtype == torch.bfloat16
        log_z = st.LinearChainCRF(emissions, trans).log_partition
    assert log_z.dtype == torch.float32
    log_z.sum().backward()
    assert trans.grad is not None and layer.weight.grad is not None
    ref = st.LinearChainCRF(emissions.float(), trans.detach()).log_partition
    torch.testing.assert_close(log_z.detach(), ref)
    with pytest.raises(TypeError, match="binary must have the dtype of unary"):
        st.LinearChainCRF(emissions.detach(), trans.detach())  # outside autocast: an error


class TestMasks:
    def test_a_prefix_mask_is_lengths(self) -> None:
        u, b, L = _chain()
        mask = torch.arange(u.shape[1])[None] < L[:, None]
        a, c = st.LinearChainCRF(u, b, L), st.LinearChainCRF(u, b, mask=mask)
        torch.testing.assert_close(a.log_partition, c.log_partition)
        assert torch.equal(a.lengths, c.lengths)
        hmm = st.HMM(
            torch.zeros(3, dtype=F64), torch.zeros(3, 3, dtype=F64), torch.zeros(3, 4, dtype=F64),
            torch.zeros(3, 5, dtype=torch.long), mask=mask,
        )  # fmt: skip
        assert torch.equal(hmm.lengths, L)

    def test_bad_masks_get_clear_errors(self) -> None:
        u, b, L = _chain()
        mask = torch.arange(u.shape[1])[None] < L[:, None]
        holes = mask.clone()
        holes[0, 1] = False
        with pytest.raises(ValueError, match=r"prefix mask.*row 0 has holes"):
            st.LinearChainCRF(u, b, mask=holes)
        with pytest.raises(ValueError, match="lengths or mask, not both"):
            st.LinearChainCRF(u, b, L, mask=mask)
        with pytest.raises(TypeError, match="looks like a mask"):
            st.LinearChainCRF(u, b, mask)
        with pytest.raises(TypeError, match="mask must be a bool tensor"):
            st.LinearChainCRF(u, b, mask=mask.long())

    def test_extra_batch_dimensions_say_what_to_do(self) -> None:
        with pytest.raises(ValueError, match=r"one batch dimension.*flatten.*vmap"):
            st.LinearChainCRF(torch.zeros(2, 3, 4, 5), torch.zeros(5, 5))


class TestArchitecture:
    """The redesign's invariants, checked on the source (issue 11, 'Done when')."""

    def test_environment_is_read_in_config_only(self) -> None:
        offenders = [
            str(p.relative_to(ROOT))
            for p in (ROOT / "structift").rglob("*.py")
            if p.name != "config.py"
            and ("os.environ" in p.read_text() or "getenv(" in p.read_text())
        ]
        assert offenders == []

    def test_no_isinstance_on_family_classes_outside_families(self) -> None:
        families = ("Categorical", "LinearChainCRF", "HMM")
        offenders = []
        for p in (ROOT / "structift").rglob("*.py"):
            if "families" in p.parts:
                continue
            text = p.read_text()
            offenders += [f"{p.name}: {f}" for f in families if f"isinstance(dist, {f}" in text]
            offenders += [
                f"{p.name}: {f}" for f in families if f", {f})" in text and "isinstance" in text
            ]
        assert offenders == []

    def test_the_old_chain_module_is_an_alias_with_a_warning(self) -> None:
        import importlib
        import sys

        sys.modules.pop("structift.chain", None)
        with pytest.warns(DeprecationWarning, match="structift.chain moved"):
            old = importlib.import_module("structift.chain")
        from structift.structures import chain

        assert old.log_partition is chain.log_partition
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            importlib.import_module("structift.structures.chain")
