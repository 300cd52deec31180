"""Tests for structift.chain against brute-force enumeration in float64.

The enumerator below lists all Z^L tag sequences of each sequence (tiny shapes only) and is the
trusted reference for log Z, marginals, the Viterbi max and sampling probabilities.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from structift.structures import chain
from tests.reference import brute_force as reference
from tests.seeding import seeded

INF = float("inf")
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Brute force: adapters over the one enumerator, tests/reference/brute_force.py
# ---------------------------------------------------------------------------------------------


def enumerate_paths(
    unary: torch.Tensor, binary: torch.Tensor, length: int
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """Return every tag sequence of ``length`` and its score (one sequence, float64)."""
    T = unary.shape[0]
    binary = binary if T > 1 else unary.new_zeros(0, unary.shape[-1], unary.shape[-1])
    enum = reference.chain(unary, binary, length)
    paths = [tuple(row[:length]) for row in enum.structures.tolist()]
    return paths, enum.scores


def brute_force(unary: torch.Tensor, binary: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Log Z, marginals, max score and all-path probabilities by enumeration."""
    B, T, Z = unary.shape
    binary = binary.expand(B, T - 1, Z, Z)
    log_z, mu_u, mu_b, best, probs = [], [], [], [], []
    for b in range(B):
        L = int(lengths[b])
        enum = reference.chain(unary[b], binary[b], L)
        lz = enum.log_partition
        feasible = bool(torch.isfinite(lz))
        empty = (torch.zeros(T, Z, dtype=F64), torch.zeros_like(binary[b]))
        mu = enum.marginals if feasible else empty
        log_z.append(lz)
        mu_u.append(mu[0])
        mu_b.append(mu[1])
        best.append(enum.max_score)
        p = enum.probs if feasible else torch.zeros_like(enum.scores)
        paths = [tuple(row[:L]) for row in enum.structures.tolist()]
        probs.append(dict(zip(paths, p.tolist())))
    return {
        "log_z": torch.stack(log_z),
        "mu_unary": torch.stack(mu_u),
        "mu_binary": torch.stack(mu_b),
        "max": torch.stack(best),
        "probs": probs,
    }


def random_chain(
    B: int,
    T: int,
    Z: int,
    *,
    seed: int,
    masked: float = 0.0,
    lengths: list[int] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = F64,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random potentials with a fraction ``masked`` of entries set to -inf.

    One random path per sequence keeps its finite scores, so every chain has a finite log Z
    under every seed (tests that want an infeasible chain set its -inf entries themselves).
    """
    g = seeded(seed)
    unary = scale * torch.randn(B, T, Z, generator=g, dtype=F64)
    binary = scale * torch.randn(B, T - 1, Z, Z, generator=g, dtype=F64)
    if masked:
        finite_u, finite_b = unary.clone(), binary.clone()
        unary[torch.rand(unary.shape, generator=g) < masked] = -INF
        binary[torch.rand(binary.shape, generator=g) < masked] = -INF
        path = torch.randint(0, Z, (B, T), generator=g)
        b, t = torch.arange(B)[:, None], torch.arange(T)[None]
        unary[b, t, path] = finite_u[b, t, path]
        binary[b, t[:, :-1], path[:, :-1], path[:, 1:]] = finite_b[
            b, t[:, :-1], path[:, :-1], path[:, 1:]
        ]
    if lengths is None:
        lens = torch.randint(1, T + 1, (B,), generator=g)
        lens[0] = T
    else:
        lens = torch.tensor(lengths)
    return unary.to(device, dtype), binary.to(device, dtype), lens.to(device)


CASES = [
    # (B, T, Z, masked, seed)
    (3, 4, 3, 0.0, 0),
    (4, 5, 2, 0.0, 1),
    (3, 3, 4, 0.3, 2),
    (5, 4, 3, 0.4, 3),
    (2, 1, 5, 0.2, 4),
    (1, 2, 3, 0.0, 30),  # B=1, T=2: the single transition block is both "full" and "shared"
    (1, 4, 3, 0.2, 31),
]


@pytest.fixture(params=["eager", "lazy"])
def binary_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run on both ways of forming per-(b, t) binary marginals (CPU default: eager)."""
    from structift.structures.chain import _scaled

    monkeypatch.setattr(_scaled, "eager_on", lambda device: request.param == "eager")
    return request.param


# ---------------------------------------------------------------------------------------------
# log_partition and marginals
# ---------------------------------------------------------------------------------------------


class TestLogPartition:
    @pytest.mark.parametrize("case", CASES)
    def test_matches_brute_force(self, case: tuple, device: torch.device) -> None:
        B, T, Z, masked, seed = case
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, device=device)
        ref = brute_force(unary.cpu(), binary.cpu(), lengths.cpu())
        out = chain.log_partition(unary, binary, lengths)
        torch.testing.assert_close(out.cpu(), ref["log_z"])

    @pytest.mark.parametrize("case", CASES)
    def test_gradient_is_brute_force_marginals(self, case: tuple, device: torch.device) -> None:
        B, T, Z, masked, seed = case
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, device=device)
        ref = brute_force(unary.cpu(), binary.cpu(), lengths.cpu())
        unary.requires_grad_(True)
        binary.requires_grad_(True)
        gu, gb = torch.autograd.grad(
            chain.log_partition(unary, binary, lengths).sum(), (unary, binary)
        )
        torch.testing.assert_close(gu.cpu(), ref["mu_unary"])
        torch.testing.assert_close(gb.cpu(), ref["mu_binary"])

    def test_broadcast_binary_gradient_is_summed(self) -> None:
        unary, _, lengths = random_chain(3, 4, 3, seed=5)
        shared = torch.randn(3, 3, dtype=F64, requires_grad=True)
        out = chain.log_partition(unary, shared, lengths)
        ref = brute_force(unary, shared.detach(), lengths)
        torch.testing.assert_close(out.detach(), ref["log_z"])
        (g,) = torch.autograd.grad(out.sum(), shared)
        torch.testing.assert_close(g, ref["mu_binary"].sum((0, 1)))

    def test_gradcheck(self) -> None:
        unary, binary, lengths = random_chain(3, 4, 3, seed=6, masked=0.2)
        unary.requires_grad_(True)
        binary.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda u, b: chain.log_partition(u, b, lengths), (unary, binary)
        )

    @pytest.mark.parametrize("masked", [0.0, 0.25])
    def test_gradgradcheck(self, masked: float) -> None:
        """Hessian-vector products of A (double backward through the custom Function)."""
        unary, binary, lengths = random_chain(2, 4, 3, seed=7, masked=masked, lengths=[4, 2])
        unary.requires_grad_(True)
        binary.requires_grad_(True)
        assert torch.autograd.gradgradcheck(
            lambda u, b: chain.log_partition(u, b, lengths), (unary, binary), fast_mode=masked > 0
        )

    def test_third_derivatives_through_marginals(self) -> None:
        """gradgradcheck of marginals(create_graph=True): the graph-building backward branch."""
        unary, binary, lengths = random_chain(2, 3, 2, seed=28, lengths=[3, 2])
        unary.requires_grad_(True)
        binary.requires_grad_(True)
        assert torch.autograd.gradgradcheck(
            lambda u, b: chain.marginals(u, b, lengths, create_graph=True),
            (unary, binary),
            fast_mode=True,
        )

    @pytest.mark.parametrize("shared", [False, True])
    def test_hessian_vector_product_matches_finite_differences(self, shared: bool) -> None:
        unary, binary, lengths = random_chain(2, 5, 3, seed=8, masked=0.2)
        if shared:
            binary = binary[0, 0].clone()
        vu = torch.randn_like(unary).masked_fill(torch.isinf(unary), 0.0)
        vb = torch.randn_like(binary).masked_fill(torch.isinf(binary), 0.0)
        u = unary.clone().requires_grad_(True)
        b = binary.clone().requires_grad_(True)
        gu, gb = torch.autograd.grad(
            chain.log_partition(u, b, lengths).sum(), (u, b), create_graph=True
        )
        hu, hb = torch.autograd.grad((gu * vu).sum() + (gb * vb).sum(), (u, b))
        eps = 1e-5
        plus = chain.marginals(unary + eps * vu, binary + eps * vb, lengths)
        minus = chain.marginals(unary - eps * vu, binary - eps * vb, lengths)
        torch.testing.assert_close(hu, (plus[0] - minus[0]) / (2 * eps), atol=1e-7, rtol=1e-6)
        fd_b = (plus[1] - minus[1]) / (2 * eps)
        torch.testing.assert_close(hb, fd_b.sum((0, 1)) if shared else fd_b, atol=1e-7, rtol=1e-6)


class TestMarginals:
    @pytest.mark.parametrize("case", CASES)
    def test_match_brute_force(self, case: tuple, device: torch.device) -> None:
        B, T, Z, masked, seed = case
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, device=device)
        ref = brute_force(unary.cpu(), binary.cpu(), lengths.cpu())
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        assert mu_u.shape == unary.shape and mu_b.shape == binary.shape
        torch.testing.assert_close(mu_u.cpu(), ref["mu_unary"])
        torch.testing.assert_close(mu_b.cpu(), ref["mu_binary"])

    def test_detached_without_create_graph(self) -> None:
        unary, binary, lengths = random_chain(2, 3, 3, seed=9)
        unary.requires_grad_(True)
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        assert not mu_u.requires_grad and not mu_b.requires_grad

    @pytest.mark.parametrize("shared", [True, False])
    def test_repeated_backward_keeps_saved_marginals(self, shared: bool) -> None:
        """The gradient of a sum is returned as the saved marginals themselves (no copy).

        Autograd must not write into them: three backward passes through one graph, with
        the gradient accumulated into ``.grad`` in place and with a second term reaching the
        same input first, all give exactly three times the gradient of one pass.
        """
        unary, binary, lengths = random_chain(3, 5, 4, seed=31, masked=0.2)
        if shared:
            binary = binary[0, 0].clone()
        u, b = unary.clone().requires_grad_(True), binary.clone().requires_grad_(True)
        ref = torch.autograd.grad(chain.log_partition(u, b, lengths).sum(), (u, b))
        for other in (0.0, 2.0):
            u.grad = b.grad = None
            log_z = chain.log_partition(u, b, lengths)
            for _ in range(3):
                ((other * u).sum() + log_z.sum()).backward(retain_graph=True)
            torch.testing.assert_close(u.grad, 3 * ref[0] + 3 * other)
            torch.testing.assert_close(b.grad, 3 * ref[1])

    def test_create_graph_gives_hessian(self) -> None:
        """d<mu(theta), v>/dtheta equals the double backward of log_partition."""
        unary, binary, lengths = random_chain(3, 4, 3, seed=10, masked=0.2)
        vu, vb = torch.randn_like(unary), torch.randn_like(binary)
        u = unary.clone().requires_grad_(True)
        b = binary.clone().requires_grad_(True)
        mu_u, mu_b = chain.marginals(u, b, lengths, create_graph=True)
        assert mu_u.requires_grad and mu_b.requires_grad
        hu, hb = torch.autograd.grad((mu_u * vu).sum() + (mu_b * vb).sum(), (u, b))
        gu, gb = torch.autograd.grad(
            chain.log_partition(u, b, lengths).sum(), (u, b), create_graph=True
        )
        ku, kb = torch.autograd.grad((gu * vu).sum() + (gb * vb).sum(), (u, b))
        torch.testing.assert_close(hu, ku)
        torch.testing.assert_close(hb, kb)
        assert torch.autograd.gradcheck(
            lambda x, y: chain.marginals(x, y, lengths, create_graph=True), (u, b), fast_mode=True
        )

    @given(
        B=st.integers(1, 3),
        T=st.integers(1, 5),
        Z=st.integers(1, 4),
        seed=st.integers(0, 2**16),
        masked=st.sampled_from([0.0, 0.3]),
    )
    def test_sum_to_one_and_consistent(
        self, B: int, T: int, Z: int, seed: int, masked: float
    ) -> None:
        """Per valid position the unary marginals sum to 1 and the binary ones project onto them."""
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, scale=3.0)
        log_z = chain.log_partition(unary, binary, lengths)
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        alive = torch.isfinite(log_z)
        expect = (mask & alive[:, None]).to(F64)
        torch.testing.assert_close(mu_u.sum(-1), expect)
        torch.testing.assert_close(mu_b.sum(-1), mu_u[:, :-1] * expect[:, 1:, None])
        torch.testing.assert_close(mu_b.sum(-2), mu_u[:, 1:] * expect[:, 1:, None])


# ---------------------------------------------------------------------------------------------
# Hessian-vector products (the backward of marginals(create_graph=True))
# ---------------------------------------------------------------------------------------------


def brute_force_hvp(
    unary: torch.Tensor,
    binary: torch.Tensor,
    lengths: torch.Tensor,
    vu: torch.Tensor,
    vb: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``H v = Cov[phi] v`` by enumeration: ``E[phi (s - E s)]`` with ``s = <v, phi>``."""
    B, T, Z = unary.shape
    binary = binary.expand(B, T - 1, Z, Z)
    hu, hb = torch.zeros(B, T, Z, dtype=F64), torch.zeros(B, max(T - 1, 0), Z, Z, dtype=F64)
    for b in range(B):
        L = int(lengths[b])
        paths, scores = enumerate_paths(unary[b], binary[b], L)
        lz = torch.logsumexp(scores, 0)
        if not torch.isfinite(lz):
            continue
        p = torch.exp(scores - lz)
        s = [
            sum(vu[b, t, z[t]] for t in range(L))
            + sum(vb[b, t, z[t], z[t + 1]] for t in range(L - 1))
            for z in paths
        ]
        mean = sum(pz * sz for pz, sz in zip(p, s))
        for z, pz, sz in zip(paths, p, s):
            for t in range(L):
                hu[b, t, z[t]] += pz * (sz - mean)
            for t in range(L - 1):
                hb[b, t, z[t], z[t + 1]] += pz * (sz - mean)
    return hu, hb


def _hvp(
    unary: torch.Tensor,
    binary: torch.Tensor,
    lengths: torch.Tensor,
    vu: torch.Tensor,
    vb: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of ``marginals(create_graph=True)`` with ``(vu, vb)``."""
    u = unary.clone().requires_grad_(True)
    b = binary.clone().requires_grad_(True)
    mu_u, mu_b = chain.marginals(u, b, lengths, create_graph=True)
    hu, hb = torch.autograd.grad((mu_u * vu).sum() + (mu_b * vb).sum(), (u, b))
    return hu, hb


def _forward_mode_hvp(
    unary: torch.Tensor,
    binary: torch.Tensor,
    lengths: torch.Tensor,
    vu: torch.Tensor,
    vb: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous path: the JVP of the log-space marginals by forward-mode AD (``H`` is
    symmetric, so it equals ``H v``)."""
    import torch.autograd.forward_ad as fwad

    from structift.structures.chain import _log

    B, T, Z = unary.shape
    b = binary.expand(B, T - 1, Z, Z).contiguous()
    with fwad.dual_level():
        _, mu_u, mu_b = _log.forward_backward(
            fwad.make_dual(unary, vu), fwad.make_dual(b, vb.expand_as(b).contiguous()), lengths
        )
        return fwad.unpack_dual(mu_u).tangent, fwad.unpack_dual(mu_b).tangent


class TestHessianVectorProduct:
    @given(
        B=st.integers(1, 3),
        T=st.integers(1, 4),
        Z=st.integers(1, 3),
        seed=st.integers(0, 2**16),
        masked=st.sampled_from([0.0, 0.3]),
    )
    def test_matches_brute_force_covariance(
        self, B: int, T: int, Z: int, seed: int, masked: float
    ) -> None:
        """float64, random -inf masks and lengths, directions dirty on padding."""
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, scale=2.0)
        g = seeded(seed + 1)
        vu = torch.randn(unary.shape, generator=g, dtype=F64)
        vb = torch.randn(binary.shape, generator=g, dtype=F64)
        ref = brute_force_hvp(unary, binary, lengths, vu, vb)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        vu[~mask] = float("nan")  # padding directions are ignored
        vb[~mask[:, 1:]] = float("nan")
        hu, hb = _hvp(unary, binary, lengths, vu, vb)
        torch.testing.assert_close(hu, ref[0])
        torch.testing.assert_close(hb, ref[1])

    @pytest.mark.parametrize("case", CASES)
    def test_cases_match_brute_force(self, case: tuple, device: torch.device) -> None:
        B, T, Z, masked, seed = case
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, device=device)
        vu, vb = torch.randn_like(unary), torch.randn_like(binary)
        ref = brute_force_hvp(unary.cpu(), binary.cpu(), lengths.cpu(), vu.cpu(), vb.cpu())
        hu, hb = _hvp(unary, binary, lengths, vu, vb)
        torch.testing.assert_close(hu.cpu(), ref[0])
        torch.testing.assert_close(hb.cpu(), ref[1])

    @pytest.mark.filterwarnings("ignore:.*torch.jit.script:DeprecationWarning")
    @pytest.mark.parametrize("kind", ["full", "shared", "per_t"])
    def test_matches_forward_mode_log_space_path(self, kind: str) -> None:
        """Longer chains than enumeration allows, -inf masks, lengths, broadcast binary."""
        B, T, Z = 5, 23, 4
        unary, binary, lengths = random_chain(B, T, Z, seed=40, masked=0.25, scale=3.0)
        lengths[1], lengths[2] = 1, T
        unary[2, 7] = -INF  # no finite path (position 7 lies within sequence 2)
        if kind == "shared":
            binary = binary[0, 0].clone()
        elif kind == "per_t":
            binary = binary[0].clone()
        vu, vb = torch.randn_like(unary), torch.randn_like(binary)
        hu, hb = _hvp(unary, binary, lengths, vu, vb)
        ru, rb = _forward_mode_hvp(unary, binary, lengths, vu, vb)
        torch.testing.assert_close(hu, ru)
        torch.testing.assert_close(
            hb, rb.sum(0) if kind == "per_t" else rb.sum((0, 1)) if kind == "shared" else rb
        )
        assert (hu[2] == 0).all()
        if kind == "full":
            assert (hb[2] == 0).all()

    def test_float32_rounding_does_not_grow_with_length(self) -> None:
        """The tangent messages are centred each step: float32 stays close to float64 at T=400."""
        unary, binary, lengths = random_chain(4, 400, 3, seed=41, masked=0.1, scale=2.0)
        # Directions with a non-zero mean (as in entropy gradients) make the uncentred
        # conditional expectations grow linearly in T (error ~1e-3 here without centring).
        vu, vb = torch.randn_like(unary) + 10.0, torch.randn_like(binary) + 10.0
        hu, hb = _hvp(unary, binary, lengths, vu, vb)
        hu32, hb32 = _hvp(unary.float(), binary.float(), lengths, vu.float(), vb.float())
        torch.testing.assert_close(hu32.double(), hu, atol=2e-5, rtol=0)
        torch.testing.assert_close(hb32.double(), hb, atol=2e-5, rtol=0)

    def test_low_precision_uses_float32_marginals(self) -> None:
        unary, binary, lengths = random_chain(2, 6, 3, seed=42, dtype=torch.bfloat16)
        vu, vb = torch.randn_like(unary), torch.randn_like(binary)
        hu, hb = _hvp(unary, binary, lengths, vu, vb)
        assert hu.dtype == torch.bfloat16 and hb.dtype == torch.bfloat16
        ref = _hvp(unary.double(), binary.double(), lengths, vu.double(), vb.double())
        torch.testing.assert_close(hu.double(), ref[0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(hb.double(), ref[1], atol=2e-2, rtol=2e-2)

    def test_unary_only_direction_and_none_gradients(self) -> None:
        """A direction on the unary marginals only (the binary cotangent is None)."""
        unary, binary, lengths = random_chain(3, 5, 3, seed=43, masked=0.2)
        vu = torch.randn_like(unary)
        u = unary.clone().requires_grad_(True)
        b = binary.clone().requires_grad_(True)
        mu_u, _ = chain.marginals(u, b, lengths, create_graph=True)
        hu, hb = torch.autograd.grad((mu_u * vu).sum(), (u, b))
        ref = brute_force_hvp(unary, binary, lengths, vu, torch.zeros_like(binary))
        torch.testing.assert_close(hu, ref[0])
        torch.testing.assert_close(hb, ref[1])


# ---------------------------------------------------------------------------------------------
# -inf, padding and invariances
# ---------------------------------------------------------------------------------------------


class TestNaNSafety:
    def test_no_finite_path_gives_neg_inf_and_zero_gradient(self, device: torch.device) -> None:
        unary, binary, lengths = random_chain(3, 4, 3, seed=11, lengths=[4, 3, 2], device=device)
        unary[0, 2] = -INF  # every state forbidden at t=2
        binary[1, 0] = -INF  # every transition forbidden at t=0 (valid since L=3)
        binary[2, 0, :, 1] = -INF
        unary[2, 1, [0, 2]] = -INF  # only state 1 allowed at t=1, but nothing reaches it
        u = unary.clone().requires_grad_(True)
        b = binary.clone().requires_grad_(True)
        log_z = chain.log_partition(u, b, lengths)
        assert (log_z == -INF).all()
        gu, gb = torch.autograd.grad(log_z.sum(), (u, b), create_graph=True)
        assert (gu == 0).all() and (gb == 0).all()
        hu, hb = torch.autograd.grad((gu.sum() + gb.sum()), (u, b), allow_unused=True)
        for h in (hu, hb):
            assert h is None or not torch.isnan(h).any()
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        assert (mu_u == 0).all() and (mu_b == 0).all()
        mu_u, mu_b = chain.marginals(u, b, lengths, create_graph=True)
        assert (mu_u == 0).all() and (mu_b == 0).all()

    def test_mixed_batch_keeps_live_sequences_exact(self) -> None:
        unary, binary, lengths = random_chain(3, 4, 3, seed=12, masked=0.3)
        unary[1, 0] = -INF
        ref = brute_force(unary, binary, lengths)
        u = unary.clone().requires_grad_(True)
        out = chain.log_partition(u, binary, lengths)
        torch.testing.assert_close(out.detach(), ref["log_z"])
        (g,) = torch.autograd.grad(out.sum(), u)
        torch.testing.assert_close(g, ref["mu_unary"])

    def test_padding_is_ignored_even_if_nan(self, device: torch.device, binary_mode: str) -> None:
        unary, binary, lengths = random_chain(3, 5, 3, seed=13, lengths=[5, 2, 1], device=device)
        dirty_u, dirty_b = unary.clone(), binary.clone()
        dirty_u[1, 2:] = float("nan")
        dirty_u[2, 1:] = INF
        dirty_b[1, 1:] = float("nan")
        dirty_b[2, :] = -INF
        u = dirty_u.clone().requires_grad_(True)
        b = dirty_b.clone().requires_grad_(True)
        out = chain.log_partition(u, b, lengths)
        torch.testing.assert_close(out.detach(), chain.log_partition(unary, binary, lengths))
        gu, gb = torch.autograd.grad(out.sum(), (u, b))
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        torch.testing.assert_close(gu, mu_u)
        torch.testing.assert_close(gb, mu_b)
        assert (gu[1, 2:] == 0).all() and (gb[1, 1:] == 0).all() and (gb[2] == 0).all()
        tags, best = chain.viterbi(dirty_u, dirty_b, lengths)
        ref_tags, ref_best = chain.viterbi(unary, binary, lengths)
        assert torch.equal(tags, ref_tags)
        torch.testing.assert_close(best, ref_best)

    @given(seed=st.integers(0, 2**16), shift=st.floats(-50.0, 50.0), t=st.integers(0, 3))
    def test_shift_invariance(self, seed: int, shift: float, t: int) -> None:
        """Adding c to every state at one valid position adds c to A and leaves mu unchanged."""
        unary, binary, lengths = random_chain(3, 4, 3, seed=seed, masked=0.2, lengths=[4, 4, 4])
        shifted = unary.clone()
        shifted[:, t] += shift
        base = chain.log_partition(unary, binary, lengths)
        alive = torch.isfinite(base)
        torch.testing.assert_close(
            chain.log_partition(shifted, binary, lengths)[alive], base[alive] + shift
        )
        for a, c in zip(
            chain.marginals(shifted, binary, lengths), chain.marginals(unary, binary, lengths)
        ):
            torch.testing.assert_close(a, c)

    @given(seed=st.integers(0, 2**16))
    def test_batch_equals_stacked_singles(self, seed: int) -> None:
        unary, binary, lengths = random_chain(4, 4, 3, seed=seed, masked=0.2)
        full = chain.marginals(unary, binary, lengths)
        log_z = chain.log_partition(unary, binary, lengths)
        for i in range(4):
            one = chain.marginals(unary[i : i + 1], binary[i : i + 1], lengths[i : i + 1])
            torch.testing.assert_close(one[0], full[0][i : i + 1])
            torch.testing.assert_close(one[1], full[1][i : i + 1])
            torch.testing.assert_close(
                chain.log_partition(unary[i : i + 1], binary[i : i + 1], lengths[i : i + 1]),
                log_z[i : i + 1],
            )


# ---------------------------------------------------------------------------------------------
# viterbi and score
# ---------------------------------------------------------------------------------------------


class TestViterbi:
    @pytest.mark.parametrize("case", CASES)
    def test_score_is_brute_force_max(self, case: tuple, device: torch.device) -> None:
        B, T, Z, masked, seed = case
        unary, binary, lengths = random_chain(B, T, Z, seed=seed, masked=masked, device=device)
        ref = brute_force(unary.cpu(), binary.cpu(), lengths.cpu())
        tags, best = chain.viterbi(unary, binary, lengths)
        assert tags.dtype == torch.long and tags.shape == (B, T)
        torch.testing.assert_close(best.cpu(), ref["max"])
        torch.testing.assert_close(chain.score(unary, binary, lengths, tags), best)
        mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
        assert (tags[~mask] == 0).all()

    def test_score_is_differentiable_indicator(self) -> None:
        unary, binary, lengths = random_chain(2, 4, 3, seed=14)
        u = unary.clone().requires_grad_(True)
        tags, best = chain.viterbi(u, binary, lengths)
        (g,) = torch.autograd.grad(best.sum(), u)
        expect = torch.zeros_like(unary)
        for b in range(2):
            for t in range(int(lengths[b])):
                expect[b, t, tags[b, t]] = 1.0
        torch.testing.assert_close(g, expect)


class TestScore:
    def test_matches_enumeration(self, device: torch.device) -> None:
        unary, binary, lengths = random_chain(3, 4, 3, seed=15, lengths=[4, 2, 1], device=device)
        g = seeded(0)
        tags = torch.randint(0, 3, (3, 4), generator=g).to(device)
        out = chain.score(unary, binary, lengths, tags)
        for b in range(3):
            L = int(lengths[b])
            z = tuple(tags[b, :L].tolist())
            paths, scores = enumerate_paths(unary[b].cpu(), binary[b].cpu(), L)
            torch.testing.assert_close(out[b].cpu(), scores[paths.index(z)])

    def test_ignores_out_of_range_padding_tags(self) -> None:
        unary, binary, lengths = random_chain(2, 4, 3, seed=16, lengths=[2, 4])
        tags = torch.tensor([[1, 2, -1, 99], [0, 1, 2, 0]])
        clean = torch.tensor([[1, 2, 0, 0], [0, 1, 2, 0]])
        torch.testing.assert_close(
            chain.score(unary, binary, lengths, tags), chain.score(unary, binary, lengths, clean)
        )


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


class TestSample:
    def test_shape_padding_and_support(self, device: torch.device) -> None:
        unary, binary, lengths = random_chain(
            3, 4, 3, seed=17, masked=0.3, lengths=[4, 3, 1], device=device
        )
        unary[:, 0, 0] = 0.0  # keep at least one path alive per sequence
        binary[..., 0, 0] = 0.0
        unary[:, :, 0] = torch.where(torch.isinf(unary[:, :, 0]), 0.0, unary[:, :, 0])
        z = chain.sample(unary, binary, lengths, (2, 5))
        assert z.shape == (2, 5, 3, 4) and z.dtype == torch.long
        mask = torch.arange(4, device=device)[None, :] < lengths[:, None]
        assert (z[..., ~mask] == 0).all()
        flat = z.reshape(-1, 3, 4)
        scores = torch.stack([chain.score(unary, binary, lengths, s) for s in flat])
        assert torch.isfinite(scores).all(), "a sample used a forbidden (-inf) potential"

    def test_generator_makes_it_reproducible(self) -> None:
        unary, binary, lengths = random_chain(2, 5, 4, seed=18)
        a = chain.sample(unary, binary, lengths, (7,), generator=seeded(3))
        b = chain.sample(unary, binary, lengths, (7,), generator=seeded(3))
        assert torch.equal(a, b)

    def test_sequence_frequencies_match_probabilities(self) -> None:
        """Empirical frequencies of whole sequences match exp(score - A).

        N = 40000 seeded draws; each of the (at most 27 per sequence, 55 in all) sequence counts
        is compared with its binomial mean with tolerance 5 standard deviations (+1 count for
        discreteness). Under the normal approximation a correct sampler fails one cell with
        probability 5.7e-7, so the false-failure rate is below 55 * 5.7e-7 < 4e-5 (the run is
        seeded, so in practice it either always passes or always fails).
        """
        unary, binary, lengths = random_chain(3, 3, 3, seed=19, masked=0.15, lengths=[3, 2, 3])
        unary[:, :, 1] = unary[:, :, 1].nan_to_num(neginf=0.0)
        binary[..., 1, 1] = 0.0
        ref = brute_force(unary, binary, lengths)
        n = 40000
        z = chain.sample(unary, binary, lengths, (n,), generator=seeded(0))
        for b in range(3):
            L = int(lengths[b])
            counts: dict[tuple[int, ...], int] = {}
            for row in z[:, b, :L].tolist():
                counts[tuple(row)] = counts.get(tuple(row), 0) + 1
            for path, p in ref["probs"][b].items():
                c = counts.pop(path, 0)
                sd = math.sqrt(n * p * (1 - p))
                assert abs(c - n * p) <= 5 * sd + 1, (b, path, c, n * p)
            assert not counts, f"sampled paths outside the enumeration: {counts}"

    def test_unary_frequencies_match_marginals(self) -> None:
        """Per-position state frequencies match the exact marginals on a larger chain.

        N = 20000 draws, B*T*Z = 2*6*4 = 48 cells, tolerance 5 binomial standard deviations (+1
        count); false-failure rate below 48 * 5.7e-7 < 3e-5 under the normal approximation.
        """
        unary, binary, lengths = random_chain(2, 6, 4, seed=20, lengths=[6, 4])
        n = 20000
        z = chain.sample(unary, binary, lengths, (n,), generator=seeded(1))
        freq = torch.nn.functional.one_hot(z, 4).sum(0).to(F64)  # shape: (B, T, Z)
        mu_u, _ = chain.marginals(unary, binary, lengths)
        mask = (torch.arange(6)[None, :] < lengths[:, None])[..., None]
        sd = torch.sqrt(n * mu_u * (1 - mu_u))
        assert ((freq - n * mu_u).abs() <= 5 * sd + 1)[mask.expand_as(freq)].all()


# ---------------------------------------------------------------------------------------------
# the scaled probability-space path against the log-space path, and its fallback
# ---------------------------------------------------------------------------------------------


def _shaped_binary(kind: str, B: int, T: int, Z: int, g: torch.Generator) -> torch.Tensor:
    """Binary potentials in each broadcast form the kernels accept."""
    shapes = {
        "full": (B, T - 1, Z, Z),
        "shared": (Z, Z),
        "shared4": (1, 1, Z, Z),
        "time": (T - 1, Z, Z),
        "batch": (B, 1, Z, Z),
    }
    if kind == "expanded":
        return torch.randn(1, 1, Z, Z, generator=g, dtype=F64).expand(B, T - 1, Z, Z)
    return torch.randn(shapes[kind], generator=g, dtype=F64)


BINARY_KINDS = ["full", "shared", "shared4", "time", "batch", "expanded"]


class TestScaledPath:
    @pytest.fixture(autouse=True)
    def _scaled_kernel(self, use_chain_backend) -> None:
        """Pin the scaled kernel (on CUDA the default is the fused one)."""
        use_chain_backend("scaled")

    @pytest.mark.parametrize("kind", BINARY_KINDS)
    def test_every_broadcast_form_matches_brute_force(
        self, kind: str, device: torch.device, binary_mode: str
    ) -> None:
        """Value and gradient (summed to the shape passed in) for each binary layout."""
        g = seeded(21)
        B, T, Z = 3, 4, 3
        unary = torch.randn(B, T, Z, generator=g, dtype=F64)
        unary[1, 2, 0] = -INF
        binary = _shaped_binary(kind, B, T, Z, g)
        lengths = torch.tensor([4, 2, 3])
        ref = brute_force(unary, binary.expand(B, T - 1, Z, Z), lengths)
        u = unary.to(device).requires_grad_(True)
        base = binary.to(device) if kind != "expanded" else binary[:1, :1].contiguous().to(device)
        base.requires_grad_(True)
        b = base.expand(B, T - 1, Z, Z) if kind == "expanded" else base
        out = chain.log_partition(u, b, lengths.to(device))
        torch.testing.assert_close(out.detach().cpu(), ref["log_z"])
        gu, gb = torch.autograd.grad(out.sum(), (u, base))
        torch.testing.assert_close(gu.cpu(), ref["mu_unary"])
        expect = ref["mu_binary"]
        if kind != "full":
            expect = expect.sum(0, keepdim=True) if kind != "batch" else expect
            expect = (
                expect.sum(1, keepdim=True)
                if kind in ("shared", "shared4", "batch", "expanded")
                else expect
            )
        torch.testing.assert_close(gb.cpu(), expect.reshape(gb.shape))
        mu_u, mu_b = chain.marginals(unary.to(device), b.detach(), lengths.to(device))
        torch.testing.assert_close(mu_u.cpu(), ref["mu_unary"])
        torch.testing.assert_close(mu_b.cpu(), ref["mu_binary"])

    @pytest.mark.parametrize("kind", ["full", "shared", "time", "batch"])
    @pytest.mark.parametrize("dtype", [torch.float32, F64])
    def test_scaled_equals_log_space_and_is_certified(self, kind: str, dtype: torch.dtype) -> None:
        """On moderate potentials every row takes the scaled path and matches log space."""
        from structift.structures.chain import _log, _scaled

        g = seeded(22)
        B, T, Z = 4, 30, 6
        unary = 4.0 * torch.randn(B, T, Z, generator=g, dtype=F64)
        binary = 4.0 * _shaped_binary(kind, B, T, Z, g)
        unary[unary < -6.0] = -INF  # hard constraints, about 7% of the states
        lengths = torch.tensor([30, 17, 1, 29])
        log_z, mu_u, mu_b = _log.forward_backward(unary, binary, lengths)
        assert torch.isfinite(log_z).all()
        _, state = _scaled.forward(unary.to(dtype), binary.to(dtype), lengths)
        assert state.ok.all(), "moderate potentials must not need the log-space fallback"
        out = chain.log_partition(unary.to(dtype), binary.to(dtype), lengths)
        mine_u, mine_b = chain.marginals(unary.to(dtype), binary.to(dtype), lengths)
        tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {}
        torch.testing.assert_close(out.double(), log_z, **tol)
        torch.testing.assert_close(mine_u.double(), mu_u, **tol)
        torch.testing.assert_close(mine_b.double(), mu_b, **tol)

    def test_fallback_triggers_where_float32_underflows(
        self, monkeypatch: pytest.MonkeyPatch, binary_mode: str
    ) -> None:
        """Row 0 needs a state whose weight exp(-100) is below float32's normal range.

        Its only continuation is through that state, so probability space loses it (log Z
        wrong or -inf); the certificate must reject the row and log space must redo it, while
        row 1 (ordinary) stays on the scaled path.
        """
        from structift.structures.chain import _scaled

        Z, T = 3, 4
        unary = torch.zeros(2, T, Z, dtype=F64)
        unary[0, 0] = torch.tensor([0.0, -100.0, -INF])
        binary = torch.zeros(2, T - 1, Z, Z, dtype=F64)
        binary[0, 0, 0, :] = -110.0  # leaving state 0 costs more than the tiny state 1
        lengths = torch.tensor([T, T])
        ref = brute_force(unary, binary, lengths)
        u32, b32 = unary.float(), binary.float()
        _, state = _scaled.forward(u32, b32, lengths)
        assert state.ok.tolist() == [False, True]
        out = chain.log_partition(u32, b32, lengths)
        torch.testing.assert_close(out.double(), ref["log_z"], atol=1e-4, rtol=1e-6)
        mu_u, mu_b = chain.marginals(u32, b32, lengths)
        torch.testing.assert_close(mu_u.double(), ref["mu_unary"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mu_b.double(), ref["mu_binary"], atol=1e-5, rtol=1e-5)
        # Without the certificate (every row trusted) the scaled answer for row 0 is wrong.
        monkeypatch.setattr(_scaled, "certified_threshold", lambda dtype: 0.0)
        raw = chain.log_partition(u32, b32, lengths)
        assert not torch.isclose(raw[0].double(), ref["log_z"][0], atol=1e-2)
        torch.testing.assert_close(raw[1].double(), ref["log_z"][1], atol=1e-4, rtol=1e-6)

    @pytest.mark.parametrize("kind", BINARY_KINDS)
    def test_all_rows_through_fallback(
        self, kind: str, monkeypatch: pytest.MonkeyPatch, binary_mode: str
    ) -> None:
        """With nothing certified every row goes through log space and still matches."""
        from structift.structures.chain import _scaled

        monkeypatch.setattr(_scaled, "certified_threshold", lambda dtype: INF)
        g = seeded(23)
        B, T, Z = 3, 4, 3
        unary = torch.randn(B, T, Z, generator=g, dtype=F64)
        binary = _shaped_binary(kind, B, T, Z, g)
        lengths = torch.tensor([4, 1, 3])
        ref = brute_force(unary, binary.expand(B, T - 1, Z, Z), lengths)
        u = unary.clone().requires_grad_(True)
        w = torch.tensor([1.0, 2.0, -0.5], dtype=F64)
        out = chain.log_partition(u, binary, lengths)
        torch.testing.assert_close(out.detach(), ref["log_z"])
        (gu,) = torch.autograd.grad((out * w).sum(), u)
        torch.testing.assert_close(gu, ref["mu_unary"] * w[:, None, None])
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        torch.testing.assert_close(mu_u, ref["mu_unary"])
        torch.testing.assert_close(mu_b, ref["mu_binary"])

    @pytest.mark.parametrize("kind", ["full", "shared"])
    def test_weighted_and_retained_backward(self, kind: str, binary_mode: str) -> None:
        """Non-uniform output weights, and a second backward through a retained graph."""
        g = seeded(24)
        B, T, Z = 3, 5, 3
        unary = torch.randn(B, T, Z, generator=g, dtype=F64, requires_grad=True)
        binary = _shaped_binary(kind, B, T, Z, g).requires_grad_(True)
        lengths = torch.tensor([5, 3, 4])
        ref = brute_force(unary.detach(), binary.detach().expand(B, T - 1, Z, Z), lengths)
        w = torch.tensor([0.5, -1.0, 3.0], dtype=F64)
        out = chain.log_partition(unary, binary, lengths)
        (out * w).sum().backward(retain_graph=True)
        (out * w).sum().backward()
        expect_b = ref["mu_binary"] * w[:, None, None, None]
        if kind == "shared":
            expect_b = expect_b.sum((0, 1))
        torch.testing.assert_close(unary.grad, 2 * ref["mu_unary"] * w[:, None, None])
        torch.testing.assert_close(binary.grad, 2 * expect_b)

    def test_extreme_but_safe_values(self) -> None:
        """Potentials of +-500 (float32 exp overflows at 88) are handled by the shifts."""
        unary, binary, lengths = random_chain(3, 5, 3, seed=25, scale=1.0)
        unary = unary + 500.0
        binary = binary - 500.0
        ref_z = brute_force(unary, binary, lengths)["log_z"]
        out = chain.log_partition(unary.float(), binary.float(), lengths)
        torch.testing.assert_close(out.double(), ref_z, rtol=1e-6, atol=1e-3)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_low_precision_computes_in_float32(self, dtype: torch.dtype) -> None:
        unary, binary, lengths = random_chain(2, 5, 3, seed=26)
        ref = brute_force(unary, binary, lengths)
        u = unary.to(dtype).requires_grad_(True)
        out = chain.log_partition(u, binary.to(dtype), lengths)
        assert out.dtype == dtype
        (gu,) = torch.autograd.grad(out.sum(), u)
        assert gu.dtype == dtype
        tol = {"atol": 5e-2, "rtol": 1e-2}
        torch.testing.assert_close(out.double(), ref["log_z"], **tol)
        torch.testing.assert_close(gu.double(), ref["mu_unary"], **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("kind", ["full", "shared"])
def test_cuda_matches_cpu_float32(kind: str) -> None:
    """A moderate float32 problem with padding and -inf gives the same answers on both devices."""
    g = seeded(27)
    B, T, Z = 16, 40, 12
    unary = 3.0 * torch.randn(B, T, Z, generator=g)
    unary[unary < -5.0] = -INF
    binary = _shaped_binary(kind, B, T, Z, g).float()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    outs = []
    for dev in ("cpu", "cuda"):
        u = unary.to(dev).requires_grad_(True)
        b = binary.to(dev).requires_grad_(True)
        log_z = chain.log_partition(u, b, lengths.to(dev))
        gu, gb = torch.autograd.grad(log_z.sum(), (u, b))
        _, best = chain.viterbi(u.detach(), b.detach(), lengths.to(dev))
        outs.append([x.cpu() for x in (log_z.detach(), gu, gb, best)])
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, atol=2e-4, rtol=1e-4)


def test_certificate_guarantee_without_masks() -> None:
    """Transition blocks spanning < 25 nats are always certified in float32, whatever the unary
    span (here up to 400 nats), as the bound in structift/structures/chain/_scaled.py promises."""
    from structift.structures.chain import _log, _scaled

    g = seeded(29)
    B, T, Z = 16, 20, 8
    unary = 200.0 * (2 * torch.rand(B, T, Z, generator=g, dtype=F64) - 1)
    binary = 24.9 * torch.rand(B, T - 1, Z, Z, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    log_z, state = _scaled.forward(unary.float(), binary.float(), lengths)
    assert state.ok.all()
    ref = _log.log_partition(unary, binary, lengths)
    torch.testing.assert_close(log_z.double(), ref, rtol=1e-6, atol=1e-3)
