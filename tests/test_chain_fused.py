"""Tests for the fused Triton chain kernel (structift/structures/chain/_fused.py).

On CPU the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``), so CI checks the
very code that a GPU compiles; on CUDA (``gpu`` marker) they are compiled. References: brute-force
enumeration in float64, the log-space autograd path, and the scaled kernel.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given

from structift import LinearChainCRF
from structift._ops import lengths_to_mask
from structift.structures import chain
from structift.structures.chain import (
    Fused,
    Scaled,
    _decode,
    _fused,
    _fused_decode,
    _hvp,
    _log,
    resolve,
    use_backend,
)
from tests.families.cases import CHAIN_CASES
from tests.families.test_sampling import S, _assert_frequencies, _encode
from tests.reference import brute_force
from tests.seeding import seeded
from tests.strategies import chain_params

pytest.importorskip("triton", reason="the fused kernel needs triton (installed by the test extra)")

F64 = torch.float64


@pytest.fixture
def fused(use_chain_backend, device: torch.device) -> torch.device:
    """Force the fused kernel on ``device`` (through the interpreter on CPU)."""
    if device.type == "cpu":
        _need_interpreter()
    use_chain_backend("fused")
    return device


def _need_interpreter() -> None:
    if not _fused.interpreting():
        pytest.skip(
            "CPU runs of the Triton kernels need TRITON_INTERPRET=1 before triton is imported "
            "(tests/conftest.py sets it when there is no CUDA)"
        )


def _reference_grads(unary, binary, lengths, weight):
    """``log Z`` and ``d(sum weight * log Z)`` by autograd through the log-space path."""
    u = unary.detach().clone().requires_grad_()
    w = binary.detach().clone().requires_grad_()
    log_z = _log.log_partition(u, w, lengths)
    gu, gw = torch.autograd.grad((log_z * weight).sum(), (u, w))
    return log_z.detach(), gu, gw


BINARY_SHAPES = {
    "full": lambda B, T, Z: (B, T - 1, Z, Z),
    "shared": lambda B, T, Z: (Z, Z),
    "per-step": lambda B, T, Z: (T - 1, Z, Z),
    "per-sequence": lambda B, T, Z: (B, 1, Z, Z),
    "batch-shared per-step": lambda B, T, Z: (1, T - 1, Z, Z),
}


class TestAgainstLogSpace:
    @pytest.mark.parametrize("layout", list(BINARY_SHAPES))
    @pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
    def test_value_and_gradient(self, fused, layout, dtype):
        B, T, Z = 4, 7, 5
        unary = torch.randn(B, T, Z, dtype=F64) * 3
        binary = torch.randn(*BINARY_SHAPES[layout](B, T, Z), dtype=F64) * 3
        lengths = torch.tensor([7, 1, 4, 2])
        weight = torch.rand(B, dtype=F64) + 0.5
        ref_z, ref_gu, ref_gw = _reference_grads(unary, binary, lengths, weight)

        u = unary.to(fused, dtype).requires_grad_()
        w = binary.to(fused, dtype).requires_grad_()
        log_z = chain.log_partition(u, w, lengths.to(fused))
        gu, gw = torch.autograd.grad((log_z * weight.to(fused, dtype)).sum(), (u, w))

        tol = {"atol": 1e-10, "rtol": 1e-10} if dtype == F64 else {"atol": 2e-5, "rtol": 2e-5}
        assert gw.shape == binary.shape
        torch.testing.assert_close(log_z.double().cpu(), ref_z, **tol)
        torch.testing.assert_close(gu.double().cpu(), ref_gu, **tol)
        torch.testing.assert_close(gw.double().cpu(), ref_gw, **tol)

    @pytest.mark.parametrize("layout", ["full", "shared"])
    def test_large_state_space(self, fused, layout):
        """Z = 70 runs with [128, 128] tiles and without prefetching (the other code path)."""
        B, T, Z = 3, 5, 70
        assert not _fused._prefetch(_fused._launch_args(torch.zeros(B, T, Z), torch.zeros(Z, Z))[2])
        unary = torch.randn(B, T, Z, dtype=F64)
        binary = torch.randn(*BINARY_SHAPES[layout](B, T, Z), dtype=F64)
        lengths = torch.tensor([5, 2, 1])
        weight = torch.rand(B, dtype=F64) + 0.5
        ref_z, ref_gu, ref_gw = _reference_grads(unary, binary, lengths, weight)
        u = unary.to(fused).requires_grad_()
        w = binary.to(fused).requires_grad_()
        log_z = chain.log_partition(u, w, lengths.to(fused))
        gu, gw = torch.autograd.grad((log_z * weight.to(fused)).sum(), (u, w))
        torch.testing.assert_close(log_z.cpu(), ref_z)
        torch.testing.assert_close(gu.cpu(), ref_gu)
        torch.testing.assert_close(gw.cpu(), ref_gw)

    def test_non_contiguous_inputs(self, fused):
        """Strided views (a transposed transition matrix, a sliced emission tensor) are read
        through their strides, with no copy and the same result as contiguous inputs."""
        B, T, Z = 3, 5, 4
        big = torch.randn(B, T, 2 * Z, dtype=F64)
        unary = big[..., ::2]  # stride 2 along Z
        binary_t = torch.randn(B, T - 1, Z, Z, dtype=F64).transpose(-1, -2)
        lengths = torch.tensor([5, 3, 2])
        ref_z, ref_gu, ref_gw = _reference_grads(
            unary.contiguous(), binary_t.contiguous(), lengths, torch.ones(B, dtype=F64)
        )
        u = unary.to(fused).detach().requires_grad_()
        w = binary_t.to(fused).detach().requires_grad_()
        assert not u.is_contiguous() and not w.is_contiguous()
        log_z = chain.log_partition(u, w, lengths.to(fused))
        gu, gw = torch.autograd.grad(log_z.sum(), (u, w))
        torch.testing.assert_close(log_z.cpu(), ref_z)
        torch.testing.assert_close(gu.cpu(), ref_gu)
        torch.testing.assert_close(gw.cpu(), ref_gw)
        tags, _ = chain.viterbi(u.detach(), w.detach(), lengths.to(fused))
        ref_tags = _decode.viterbi(unary, binary_t, lengths)
        assert torch.equal(tags.cpu(), ref_tags)

    def test_padding_never_leaks(self, fused):
        """NaN and inf beyond each length change nothing and get a zero gradient."""
        B, T, Z = 3, 6, 4
        unary = torch.randn(B, T, Z, dtype=F64)
        binary = torch.randn(B, T - 1, Z, Z, dtype=F64)
        lengths = torch.tensor([6, 2, 4])
        dirty_u, dirty_w = unary.clone(), binary.clone()
        dirty_u[1, 2:] = float("nan")
        dirty_u[2, 4:] = float("inf")
        dirty_w[1, 1:] = float("nan")
        dirty_w[2, 3:] = float("-inf")
        out = []
        for u0, w0 in ((unary, binary), (dirty_u, dirty_w)):
            u = u0.to(fused).requires_grad_()
            w = w0.to(fused).requires_grad_()
            log_z = chain.log_partition(u, w, lengths.to(fused))
            out.append((log_z, *torch.autograd.grad(log_z.sum(), (u, w))))
        for clean, dirty in zip(out[0], out[1]):
            torch.testing.assert_close(dirty, clean, atol=0, rtol=0)
        assert (out[1][1][1, 2:] == 0).all() and (out[1][2][1, 1:] == 0).all()

    def test_hard_constraints_and_dead_rows(self, fused):
        """-inf potentials give exact zeros; a row without a finite path: -inf and zero grads."""
        B, T, Z = 3, 5, 4
        unary = torch.randn(B, T, Z, dtype=F64)
        binary = torch.randn(B, T - 1, Z, Z, dtype=F64)
        unary[0, :, :2] = float("-inf")  # states 0, 1 forbidden in row 0
        binary[1, 2] = float("-inf")  # row 1 cannot pass step 2: no finite path
        binary[2, :, 3, :] = float("-inf")  # row 2 never leaves state 3
        lengths = torch.tensor([5, 5, 5])
        u = unary.to(fused).requires_grad_()
        w = binary.to(fused).requires_grad_()
        log_z = chain.log_partition(u, w, lengths.to(fused))
        gu, gw = torch.autograd.grad(log_z.sum(), (u, w))
        ref_z, ref_gu, ref_gw = _reference_grads(unary, binary, lengths, torch.ones(B, dtype=F64))
        assert log_z[1].item() == float("-inf")
        for x in (gu, gw):
            assert torch.isfinite(x).all()
        assert (gu[0, :, :2] == 0).all() and (gu[1] == 0).all() and (gw[1] == 0).all()
        torch.testing.assert_close(log_z.cpu(), ref_z)
        torch.testing.assert_close(gu.cpu(), ref_gu)
        torch.testing.assert_close(gw.cpu(), ref_gw)

    def test_wide_dynamic_range_float32(self, fused):
        """Potentials spanning ~400 nats: log space needs no fallback and stays accurate."""
        B, T, Z = 2, 8, 6
        unary = torch.randn(B, T, Z, dtype=F64) * 100
        binary = torch.randn(B, T - 1, Z, Z, dtype=F64) * 100
        lengths = torch.tensor([8, 5])
        ref_z, ref_gu, _ = _reference_grads(unary, binary, lengths, torch.ones(B, dtype=F64))
        u = unary.to(fused, torch.float32).requires_grad_()
        log_z = chain.log_partition(u, binary.to(fused, torch.float32), lengths.to(fused))
        (gu,) = torch.autograd.grad(log_z.sum(), (u,))
        torch.testing.assert_close(log_z.double().cpu(), ref_z, rtol=1e-6, atol=1e-4)
        torch.testing.assert_close(gu.double().cpu(), ref_gu, rtol=1e-4, atol=1e-4)

    def test_float32_rounding_does_not_grow_with_length(self, fused):
        """Centred messages and locally normalised marginals: T = 300 as accurate as T = 10.

        Without the centring, log Z ~ 1e3 here and each marginal would lose ~1e-4 to rounding.
        """
        B, T, Z = 2, 300, 3
        unary = torch.randn(B, T, Z, dtype=F64) * 2 + 3  # positive drift: log Z grows with T
        binary = torch.randn(T - 1, Z, Z, dtype=F64) * 2
        lengths = torch.tensor([300, 250])
        ref_u, ref_b = chain.marginals(unary.to(fused), binary.to(fused), lengths.to(fused))
        mu_u, mu_b = chain.marginals(
            unary.to(fused, torch.float32), binary.to(fused, torch.float32), lengths.to(fused)
        )
        torch.testing.assert_close(mu_u.double(), ref_u, atol=3e-6, rtol=0)
        torch.testing.assert_close(mu_b.double(), ref_b, atol=3e-6, rtol=0)


@given(params=chain_params())
def test_property_matches_brute_force(params):
    """log Z and marginals equal the float64 enumeration, with -inf masks and lengths."""
    unary, binary, lengths = params["unary"], params["binary"], params["lengths"]
    B, T, Z = unary.shape
    _need_interpreter()
    with use_backend("fused"):  # the fused kernel on CPU, through the interpreter
        assert isinstance(resolve(None, unary), Fused if T > 1 else Scaled)
        log_z = chain.log_partition(unary, binary, lengths)
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
    wide = binary.expand(B, T - 1, Z, Z)
    for b in range(B):
        ref = brute_force.chain(unary[b], wide[b], int(lengths[b]))
        ref_u, ref_b = ref.marginals
        torch.testing.assert_close(log_z[b], ref.log_partition)
        torch.testing.assert_close(mu_u[b], ref_u)
        torch.testing.assert_close(mu_b[b], ref_b)


class TestDerivatives:
    def test_gradcheck_and_gradgradcheck(self, fused):
        """First derivatives come from the fused backward; second from its marginals + HVP."""
        B, T, Z = 2, 3, 3
        unary = torch.randn(B, T, Z, dtype=F64, device=fused, requires_grad=True)
        binary = torch.randn(B, T - 1, Z, Z, dtype=F64, device=fused, requires_grad=True)
        lengths = torch.tensor([3, 2], device=fused)

        def f(u, w):
            return chain.log_partition(u, w, lengths)

        assert torch.autograd.gradcheck(f, (unary, binary))
        assert torch.autograd.gradgradcheck(f, (unary, binary))

    def test_family_api_matches_scaled(self, fused, use_chain_backend):
        """LinearChainCRF's A, marginals and entropy agree between the two kernels."""
        B, T, Z = 3, 6, 4
        unary = torch.randn(B, T, Z, dtype=F64, device=fused)
        binary = torch.randn(Z, Z, dtype=F64, device=fused)
        lengths = torch.tensor([6, 3, 1], device=fused)
        got = LinearChainCRF(unary, binary, lengths)
        got = (got.log_partition, got.marginals.unary, got.marginals.binary, got.entropy())
        use_chain_backend("scaled")
        ref = LinearChainCRF(unary, binary, lengths)
        ref = (ref.log_partition, ref.marginals.unary, ref.marginals.binary, ref.entropy())
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)

    def test_half_precision_is_computed_in_float32(self, fused):
        unary = torch.randn(2, 5, 4, device=fused)
        binary = torch.randn(4, 4, device=fused)
        lengths = torch.tensor([5, 3], device=fused)
        u16 = unary.to(torch.bfloat16).requires_grad_()
        log_z = chain.log_partition(u16, binary.to(torch.bfloat16), lengths)
        (g,) = torch.autograd.grad(log_z.sum(), (u16,))
        u32, w32 = unary.bfloat16().float(), binary.bfloat16().float()
        ref = chain.log_partition(u32, w32, lengths)
        assert log_z.dtype == torch.bfloat16 and g.dtype == torch.bfloat16
        torch.testing.assert_close(log_z.float(), ref, rtol=1e-2, atol=1e-2)


class TestViterbi:
    @pytest.mark.parametrize("layout", ["full", "shared", "per-sequence"])
    def test_matches_log_space_path(self, fused, layout, use_chain_backend):
        """Same tags and score as the log-space loop (continuous scores: no ties), 0 on padding."""
        B, T, Z = 4, 7, 5
        unary = torch.randn(B, T, Z, dtype=F64, device=fused)
        binary = torch.randn(*BINARY_SHAPES[layout](B, T, Z), dtype=F64, device=fused)
        unary[0, :, 1] = float("-inf")
        lengths = torch.tensor([7, 1, 4, 6], device=fused)
        tags, best = chain.viterbi(unary, binary, lengths)
        use_chain_backend("scaled")
        ref_tags, ref_best = chain.viterbi(unary, binary, lengths)
        assert torch.equal(tags, ref_tags)
        torch.testing.assert_close(best, ref_best)
        assert (tags[1, 1:] == 0).all() and (tags[2, 4:] == 0).all() and (tags[0] != 1).all()

    def test_ties_go_to_the_lowest_state(self, fused):
        unary = torch.zeros(2, 4, 3, device=fused)
        binary = torch.zeros(3, 3, device=fused)
        tags, _ = chain.viterbi(unary, binary, torch.tensor([4, 2], device=fused))
        assert tags.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]
        unary[0, 2, 2] = 1.0
        tags, _ = chain.viterbi(unary, binary, torch.tensor([4, 2], device=fused))
        assert tags.tolist() == [[0, 0, 2, 0], [0, 0, 0, 0]]

    @given(params=chain_params())
    def test_property_score_of_argmax_is_the_max(self, params):
        """score(argmax) equals the brute-force maximum, with -inf masks and lengths."""
        _need_interpreter()
        unary, binary, lengths = params["unary"], params["binary"], params["lengths"]
        B, T, Z = unary.shape
        with use_backend("fused"):
            tags, best = chain.viterbi(unary, binary, lengths)
        torch.testing.assert_close(best, chain.score(unary, binary, lengths, tags))
        wide = binary.expand(B, T - 1, Z, Z) if T > 1 else binary
        for b in range(B):
            L = int(lengths[b])
            ref = brute_force.chain(unary[b], wide[b] if T > 1 else unary.new_zeros(0, Z, Z), L)
            torch.testing.assert_close(best[b], ref.max_score)
            assert (tags[b, L:] == 0).all()


class TestHessianVectorProduct:
    @pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
    @pytest.mark.parametrize("with_binary_direction", [True, False])
    def test_fused_sweeps_match_the_loops(self, fused, dtype, with_binary_direction):
        """Same H v from the fused tangent sweeps as from the per-step loops."""
        B, T, Z = 3, 7, 5
        unary = torch.randn(B, T, Z, dtype=dtype, device=fused) * 2
        binary = torch.randn(B, T - 1, Z, Z, dtype=dtype, device=fused) * 2
        unary[0, 2, :2] = float("-inf")
        lengths = torch.tensor([7, 2, 5], device=fused)
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        mask = lengths_to_mask(lengths, T)
        vu = torch.randn_like(unary)
        vb = torch.randn_like(binary) if with_binary_direction else None
        ref = _hvp.hvp(mu_u, mu_b, mask, vu, vb)
        got = _hvp.hvp(mu_u, mu_b, mask, vu, vb, sweeps=Fused().sweeps)
        tol = {} if dtype == F64 else {"atol": 1e-6, "rtol": 1e-5}
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **tol)

    def test_variational_covariance_product_uses_the_fused_sweeps(self, fused, use_chain_backend):
        """structift.variational's Cov v: fused path = its own loops (float64, with padding)."""
        from structift.variational.covariance import chain_covariance_vector_product as cov

        B, T, Z = 3, 6, 4
        unary = torch.randn(B, T, Z, dtype=F64, device=fused)
        binary = torch.randn(B, T - 1, Z, Z, dtype=F64, device=fused)
        lengths = torch.tensor([6, 3, 1], device=fused)
        mu_u, mu_b = chain.marginals(unary, binary, lengths)
        vu, vb = torch.randn_like(unary), torch.randn_like(binary)
        got = cov(mu_u, mu_b, lengths, vu, vb, scale=-0.5)
        use_chain_backend("scaled")
        ref = cov(mu_u, mu_b, lengths, vu, vb, scale=-0.5)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)

    def test_second_derivative_through_the_api(self, fused):
        """d/dtheta <mu(theta), v> through marginals(create_graph=True) equals float64 autograd."""
        B, T, Z = 2, 5, 4
        unary = torch.randn(B, T, Z, dtype=F64, device=fused, requires_grad=True)
        binary = torch.randn(Z, Z, dtype=F64, device=fused, requires_grad=True)
        lengths = torch.tensor([5, 3], device=fused)
        vu = torch.randn(B, T, Z, dtype=F64, device=fused)
        mu_u, _ = chain.marginals(unary, binary, lengths, create_graph=True)
        got = torch.autograd.grad((mu_u * vu).sum(), (unary, binary))
        u, w = unary.detach().cpu().requires_grad_(), binary.detach().cpu().requires_grad_()
        _, ref_mu, _ = _log.forward_backward(u, w, lengths.cpu())
        ref = torch.autograd.grad((ref_mu * vu.cpu()).sum(), (u, w))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a.cpu(), b)


class TestSample:
    @pytest.mark.parametrize("case", CHAIN_CASES, ids=repr)
    def test_frequencies_match_enumeration(self, fused, case):
        """Every structure's frequency within Bernstein bounds (false failure < 1e-7)."""
        params = case.fixed()
        dist = case.build(params, fused)
        generator = seeded(0, device=fused)
        samples = dist.sample((S,), generator=generator).cpu()
        assert samples.shape == (S, *dist.batch_shape, *dist.event_shape)
        base = dist._natural_params[0].shape[-1]
        for b, enum in enumerate(case.brute(params)):
            column = samples[:, b]
            assert bool((column[:, int(params["lengths"][b]) :] == 0).all())
            _assert_frequencies(_encode(column, base), _encode(enum.structures, base), enum.probs)

    def test_block_size_does_not_change_samples(self, fused, monkeypatch):
        """Samples depend on the uniforms only: 16 samples per program or 1024, same draws."""
        unary = torch.randn(3, 6, 5, device=fused)
        binary = torch.randn(3, 5, 5, 5, device=fused)
        lengths = torch.tensor([6, 2, 4], device=fused)
        draws = []
        for block in (16, 1024):
            monkeypatch.setattr(_fused_decode, "_sample_block", lambda n, bz, block=block: block)
            generator = seeded(3, device=fused)
            draws.append(chain.sample(unary, binary, lengths, (5, 20), generator=generator))
        assert draws[0].shape == (5, 20, 3, 6)
        assert torch.equal(draws[0], draws[1])

    def test_hard_constraints_and_dead_rows(self, fused):
        """-inf states are never drawn; a row without a finite path gets some valid sequence."""
        unary = torch.randn(2, 5, 4, device=fused)
        binary = torch.randn(4, 4, device=fused)
        unary[0, :, 3] = float("-inf")
        unary[1, 2] = float("-inf")  # row 1 has no finite path
        out = chain.sample(unary, binary, torch.tensor([5, 5], device=fused), (500,))
        assert (out[:, 0] != 3).all()
        assert ((out[:, 1] >= 0) & (out[:, 1] < 4)).all()


class TestDispatch:
    def test_auto_uses_scaled_on_cpu(self, monkeypatch):
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter is never picked by auto
        assert isinstance(resolve("auto", torch.zeros(2, 5, 3)), Scaled)

    @pytest.mark.gpu
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
    def test_auto_uses_fused_on_cuda(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert isinstance(resolve("auto", torch.zeros(2, 5, 3, device="cuda")), Fused)
        big = torch.zeros(2, 5, _fused.MAX_Z + 1, device="cuda")
        assert isinstance(resolve("auto", big), Scaled)

    def test_self_check_passes_where_the_kernel_works(self):
        _need_interpreter()
        _fused.works_on.cache_clear()
        try:
            assert _fused.works_on(torch.device("cpu"))
        finally:
            _fused.works_on.cache_clear()

    @pytest.mark.parametrize("failure", ["raises", "wrong"])
    # pytest.warns re-emits the interpreter's numpy log(0) warning from this module.
    @pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
    def test_self_check_warns_and_declines_a_broken_kernel(self, monkeypatch, failure):
        """A kernel that fails to build, or computes wrong marginals, is not used by auto."""
        _need_interpreter()
        if failure == "raises":

            def broken(*args, **kwargs):
                raise RuntimeError("PassManager::run failed")

            monkeypatch.setattr(_fused, "forward", broken)
            expected = "RuntimeError: PassManager::run failed"
        else:
            real = _fused.backward
            monkeypatch.setattr(_fused, "backward", lambda *a: tuple(1.01 * x for x in real(*a)))
            expected = "differ from the log-space path"
        _fused.works_on.cache_clear()
        try:
            with pytest.warns(RuntimeWarning, match=expected):
                assert not _fused.works_on(torch.device("cpu"))
        finally:
            _fused.works_on.cache_clear()

    def test_length_one_chains_use_scaled(self, use_chain_backend):
        use_chain_backend("fused")
        assert isinstance(resolve(None, torch.zeros(2, 1, 3)), Scaled)

    def test_forced_fused_where_it_cannot_run_raises(self, monkeypatch):
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*cpu tensor with Z = 3"):
            resolve(Fused(), torch.zeros(2, 5, 3))
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(ValueError, match=f"Z <= {_fused.MAX_Z}"):
            resolve("fused", torch.zeros(2, 5, _fused.MAX_Z + 1))

    def test_environment_sets_only_the_default(self, monkeypatch):
        """STRUCTIFT_CHAIN_KERNEL is the default (read in structift.config); code overrides it."""
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setenv("STRUCTIFT_CHAIN_KERNEL", "log")
        assert isinstance(resolve(None, torch.zeros(2, 5, 3)), chain.Log)
        with use_backend("scaled"):
            assert isinstance(resolve(None, torch.zeros(2, 5, 3)), Scaled)
        assert isinstance(resolve(Fused(warps=2), torch.zeros(2, 5, 3)), Fused)

    def test_unknown_choice_raises(self, monkeypatch):
        monkeypatch.setenv("STRUCTIFT_CHAIN_KERNEL", "cuda-graph")
        with pytest.raises(ValueError, match="STRUCTIFT_CHAIN_KERNEL must be one of"):
            resolve(None, torch.zeros(2, 5, 3))
        with pytest.raises(ValueError, match="backend must be a chain backend object"):
            resolve("cuda-graph", torch.zeros(2, 5, 3))
        with pytest.raises(TypeError, match="backend must be a chain backend object"):
            use_backend(3).__enter__()

    def test_backend_is_chosen_once_per_distribution(self, use_chain_backend):
        """A CRF keeps the backend in effect when it was built."""
        use_chain_backend("log")
        crf = LinearChainCRF(torch.randn(2, 4, 3), torch.randn(3, 3))
        with use_backend("scaled"):
            assert isinstance(crf.structure.backend, chain.Log)
