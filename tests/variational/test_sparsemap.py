"""SparseMAP: the chain of special cases, KKT certificates by enumeration, Jacobians, errors.

References: on the simplex, ``structift.layers.sparsemax`` and ``qp_solve``; on tiny chains, the
QP over the enumerated vertex set (``qp_solve`` and cvxpy) and an exact optimality certificate
over every structure (``tests/reference/brute_force``). Tolerances: the forward ends at an exact
solution of the restricted KKT system (to float64 rounding), and the solution map is piecewise
linear in θ, so finite differences inside one piece are exact to rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import structift as sf
from structift.implicit import ConvergenceError, ConvergenceWarning
from structift.layers import qp_solve, sparsemax
from structift.variational import L2, Entropy, regularized_argmax, sparsemap
from tests.conftest import DEVICES
from tests.reference import brute_force
from tests.seeding import examples, seeded
from tests.strategies import categorical_params, chain_params

DT = torch.float64
TAUS = [0.25, 1.0, 3.0]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module on one intra-op thread, restoring the setting afterwards.

    The active-set method is thousands of tiny tensor operations; on a loaded machine the
    intra-op thread pool only adds synchronization (measured: 3 s on one thread, 20 s on two
    for the float32 backward test). Results do not depend on the thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _crf(unary, binary, lengths, **kw) -> sf.LinearChainCRF:
    return sf.LinearChainCRF(unary, binary, lengths, **kw)


def _random_crf(B: int, T: int, Z: int, seed: int, scale: float = 1.0, grad: bool = False):
    g = seeded(seed)
    unary = (scale * torch.randn(B, T, Z, generator=g, dtype=DT)).requires_grad_(grad)
    binary = (scale * torch.randn(B, T - 1, Z, Z, generator=g, dtype=DT)).requires_grad_(grad)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    return unary, binary, lengths


def _vertices(crf: sf.LinearChainCRF, b: int):
    """Every structure of element b: scores ``[N]``, φ_U ``[N, T*Z]``, φ_P ``[N, (T-1)*Z*Z]``."""
    unary, binary = (t.detach() for t in crf._natural_params)
    e = brute_force.chain(unary[b], binary[b], int(crf.lengths[b]))
    keep = torch.isfinite(e.scores)
    phi_u, phi_p = (f[keep].flatten(1) for f in e.features)
    return e.scores[keep], phi_u, phi_p


def _objective(alpha, scores, phi_u, tau):
    mu_u = alpha @ phi_u
    return alpha @ scores - 0.5 * tau * mu_u @ mu_u


def _feasible(alpha: torch.Tensor) -> torch.Tensor:
    """A reference solver's weights made exactly feasible (its rounding removed)."""
    alpha = alpha.clamp_min(0)
    return alpha / alpha.sum()


def _certify(mu_u, scores, phi_u, tau, value_eta, rtol=1e-9):
    """The exact optimality certificate over every vertex: max_y ⟨η, φ(y)⟩ <= ⟨η, μ⟩.

    η = θ − τ (μ_U, 0) is the gradient of the objective at μ; the Frank-Wolfe gap
    max_y ⟨η, φ(y) − μ⟩ bounds the suboptimality of μ, so a zero gap proves μ optimal.
    """
    reduced = scores - tau * phi_u @ mu_u  # ⟨η, φ(y)⟩ for every vertex y
    nu = value_eta
    scale = 1 + scores.abs().max() + tau * phi_u.sum(-1).max()
    assert float(reduced.max() - nu) <= rtol * scale


# ---- special cases: the simplex ---------------------------------------------------------------


@pytest.mark.parametrize("tau", TAUS)
def test_categorical_is_sparsemax_is_the_simplex_qp(tau: float) -> None:
    g = seeded(1)
    B, n = 6, 7
    logits = 2 * torch.randn(B, n, generator=g, dtype=DT)
    result = sparsemap(sf.Categorical(logits), tau)
    mu = result.marginals
    expected = sparsemax(logits / tau)
    torch.testing.assert_close(mu, expected, rtol=0, atol=1e-12)
    Q = tau * torch.eye(n, dtype=DT)
    G, h = -torch.eye(n, dtype=DT), torch.zeros(n, dtype=DT)
    A, b = torch.ones(1, n, dtype=DT), torch.ones(1, dtype=DT)
    z = qp_solve(Q, -logits, G, h, A, b)
    # qp_solve stops at a scaled KKT residual of 1e-12 (and polishes): z is exact to ~1e-10.
    torch.testing.assert_close(mu, z, rtol=0, atol=1e-9)
    assert bool(result.status.converged.all())
    support = (mu > 0).sum(-1)
    assert torch.equal(result.active_set.active.sum(-1), support)


@pytest.mark.parametrize("tau", TAUS)
def test_categorical_jacobian_is_the_sparsemax_jacobian(tau: float) -> None:
    g = seeded(2)
    logits = 2 * torch.randn(4, 6, generator=g, dtype=DT)
    v = torch.randn(4, 6, generator=g, dtype=DT)
    a = logits.clone().requires_grad_(True)
    (grad_ours,) = torch.autograd.grad((sparsemap(sf.Categorical(a), tau).marginals * v).sum(), a)
    b = logits.clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad((sparsemax(b / tau) * v).sum(), b)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


# ---- special cases: tiny chains against the enumerated QP ------------------------------------


def _chain_case(seed: int, tau: float):
    unary, binary, lengths = _random_crf(3, 3, 3, seed)
    crf = _crf(unary, binary, lengths)
    return crf, sparsemap(crf, tau)


def _check_against_reference(crf, result, tau, b, alpha_ref):
    """Ours is optimal (certificate); the reference is no better and close by strong concavity.

    For any feasible μ, f(μ*) − f(μ) >= (τ/2)‖μ_U − μ*_U‖²: the reference's distance to ours is
    bounded by its own suboptimality, measured here, not guessed.
    """
    scores, phi_u, _ = _vertices(crf, b)
    mu = result.marginals
    mu_u = mu.unary[b].detach().flatten()
    linear = (mu.unary[b] * crf.unary[b]).sum() + (mu.binary[b] * crf.binary[b]).sum()
    linear = linear.detach()  # ⟨θ, μ⟩
    f_ours = linear - 0.5 * tau * mu_u @ mu_u
    _certify(mu_u, scores, phi_u, tau, linear - tau * mu_u @ mu_u)
    alpha_ref = _feasible(alpha_ref)
    f_ref = _objective(alpha_ref, scores, phi_u, tau)
    scale = 1 + scores.abs().max()
    assert float(f_ref - f_ours) <= 1e-10 * scale  # ours is optimal
    rounding = 64 * torch.finfo(DT).eps * float(scale)  # of the two objective values
    bound = 2 * (abs(float(f_ours - f_ref)) + rounding) / tau
    assert float((alpha_ref @ phi_u - mu_u).square().sum()) <= bound
    return float(f_ours - f_ref)


@pytest.mark.parametrize("tau", TAUS)
def test_tiny_chain_is_the_qp_over_enumerated_vertices(tau: float) -> None:
    crf, result = _chain_case(3, tau)
    for b in range(crf.lengths.shape[0]):
        scores, phi_u, _ = _vertices(crf, b)
        N = scores.shape[0]
        # The QP in the weights has Q = τ Φ_U Φ_Uᵀ, singular (the pairwise part is linear):
        # a ridge ε makes it definite and moves the optimal value by at most ε/2.
        ridge = 1e-9
        alpha = qp_solve(
            tau * phi_u @ phi_u.T,
            -scores,
            -torch.eye(N, dtype=DT),
            torch.zeros(N, dtype=DT),
            torch.ones(1, N, dtype=DT),
            torch.ones(1, dtype=DT),
            ridge=ridge,
        )
        gap = _check_against_reference(crf, result, tau, b, alpha)
        assert gap <= ridge + 1e-8 * (1 + float(scores.abs().max()))


@pytest.mark.reference
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_tiny_chain_matches_cvxpy(tau: float) -> None:
    cp = pytest.importorskip("cvxpy")
    crf, result = _chain_case(4, tau)
    for b in range(crf.lengths.shape[0]):
        scores, phi_u, _ = _vertices(crf, b)
        a = cp.Variable(scores.shape[0], nonneg=True)
        objective = scores.numpy() @ a - 0.5 * tau * cp.sum_squares(phi_u.numpy().T @ a)
        problem = cp.Problem(cp.Maximize(objective), [cp.sum(a) == 1])
        problem.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        gap = _check_against_reference(crf, result, tau, b, torch.tensor(a.value, dtype=DT))
        assert gap <= 1e-7 * (1 + float(scores.abs().max()))


# ---- Jacobians -------------------------------------------------------------------------------


def _directional_fd(fn, theta, direction, h):
    """Central differences of ``fn`` along ``direction`` (exact on one linear piece)."""
    with torch.no_grad():
        plus = fn(tuple(t + h * d for t, d in zip(theta, direction)))
        minus = fn(tuple(t - h * d for t, d in zip(theta, direction)))
    return [(p - m) / (2 * h) for p, m in zip(plus, minus)]


def _chain_marginals(lengths, tau):
    return lambda th: tuple(sparsemap(_crf(th[0], th[1], lengths), tau).marginals)


@pytest.mark.parametrize("tau", TAUS)
def test_chain_jacobian_matches_finite_differences(tau: float) -> None:
    unary, binary, lengths = _random_crf(3, 6, 4, 5, scale=2.0)
    g = seeded(6)
    direction = (torch.randn(unary.shape, generator=g, dtype=DT),)
    direction += (torch.randn(binary.shape, generator=g, dtype=DT),)
    cot = (torch.randn(unary.shape, generator=g, dtype=DT),)
    cot += (torch.randn(binary.shape, generator=g, dtype=DT),)
    theta = (unary.requires_grad_(True), binary.requires_grad_(True))
    mu = sparsemap(_crf(*theta, lengths), tau).marginals
    grads = torch.autograd.grad(sum((m * c).sum() for m, c in zip(mu, cot)), theta)
    ours = sum((gr * d).sum() for gr, d in zip(grads, direction))
    fd = _directional_fd(_chain_marginals(lengths, tau), theta, direction, 1e-6)
    reference = sum((f * c).sum() for f, c in zip(fd, cot))
    # Rounding of the difference quotient: ~eps·|μ|/h per entry, summed over the cotangent.
    assert abs(float(ours - reference)) <= 1e-7 * (1 + abs(float(reference)))


def test_gradcheck_chain_and_categorical() -> None:
    unary, binary, lengths = _random_crf(2, 3, 2, 7, grad=True)

    def chain(u, w):
        result = sparsemap(_crf(u, w, lengths), 0.7)
        return (*result.marginals, result.active_set.weights)

    assert torch.autograd.gradcheck(chain, (unary, binary), atol=1e-7)
    logits = torch.randn(3, 5, generator=seeded(8), dtype=DT).requires_grad_(True)
    fn = lambda x: sparsemap(sf.Categorical(x), 0.4).marginals  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logits,), atol=1e-7)


def test_shared_binary_gets_the_summed_gradient() -> None:
    unary, binary, lengths = _random_crf(3, 4, 3, 9)
    shared = binary[0, 0].clone().requires_grad_(True)
    full = shared.expand(binary.shape).clone().detach().requires_grad_(True)
    cot = torch.randn(3, 3, 3, 3, generator=seeded(10), dtype=DT)
    (g_shared,) = torch.autograd.grad(
        (sparsemap(_crf(unary, shared, lengths), 1.0)[0].binary * cot).sum(), shared
    )
    (g_full,) = torch.autograd.grad(
        (sparsemap(_crf(unary, full, lengths), 1.0)[0].binary * cot).sum(), full
    )
    torch.testing.assert_close(g_shared, g_full.sum((0, 1)), rtol=0, atol=1e-12)


def test_degenerate_simplex_gives_the_one_sided_derivative_that_keeps_ties_out() -> None:
    g = seeded(11)
    tau = 0.8
    top = torch.sort(torch.rand(2, generator=g, dtype=DT) + 1.0, descending=True).values
    # On support {0, 1}: p_i = (θ_i − t)/τ with t = (θ_0 + θ_1 − τ)/2; put θ_2 exactly at t.
    # (θ_0 − θ_1 < τ keeps both in the support.)
    top[1] = top[0] - 0.5 * tau * float(torch.rand((), generator=g))
    t = (top[0] + top[1] - tau) / 2
    logits = torch.cat([top, t[None], t[None] - 2.0])[None]
    d = torch.randn(1, 4, generator=g, dtype=DT)
    d[0, 2] = -(d[0, :2].mean().abs() + 1.0)  # θ_2 falls below the moving threshold: stays out
    x = logits.clone().requires_grad_(True)
    result = sparsemap(sf.Categorical(x), tau)
    assert int(result.active_set.active.sum()) == 2
    cot = torch.randn(1, 4, generator=g, dtype=DT)
    (grad,) = torch.autograd.grad((result.marginals * cot).sum(), x)
    ours = float((grad * d).sum())
    h = 1e-6

    def f(th):
        with torch.no_grad():
            return float((sparsemap(sf.Categorical(th), tau).marginals * cot).sum())

    base = f(logits)
    right = (f(logits + h * d) - base) / h  # the side where the support stays {0, 1}
    left = (base - f(logits - h * d)) / h  # the side where θ_2 enters
    assert abs(ours - right) <= 1e-7 * (1 + abs(right))
    assert abs(left - right) > 1e-3  # the point is degenerate: the two sides differ


def test_degenerate_chain_vertex_is_kept_with_a_zero_jacobian() -> None:
    unary, binary, lengths = _random_crf(1, 3, 2, 12)
    crf = _crf(unary, binary, lengths)
    scores, phi_u, phi_p = _vertices(crf, 0)
    best = int(scores.argmax())
    ham = (phi_u[best] - phi_u).abs().sum(-1) / 2
    other = ham > 0
    ratios = (scores[best] - scores[other]) / ham[other]
    tau = float(ratios.min())  # the largest τ at which the MAP alone is optimal: a tie
    theta = (unary.clone().requires_grad_(True), binary.clone().requires_grad_(True))
    result = sparsemap(_crf(*theta, lengths), tau)
    assert int(result.active_set.active.sum()) == 1
    d = (phi_u[best].reshape(unary.shape), phi_p[best].reshape(binary.shape))  # favours the MAP
    cot = torch.randn(unary.shape, generator=seeded(13), dtype=DT)
    (g_u,) = torch.autograd.grad((result.marginals.unary * cot).sum(), theta[0])
    assert float(g_u.abs().max()) <= 1e-12  # dα = 0 for one structure, to rounding

    def f(th):
        with torch.no_grad():
            return (sparsemap(_crf(th[0], th[1], lengths), tau).marginals.unary * cot).sum()

    h = 1e-6
    base = f(theta)
    right = (f(tuple(t + h * e for t, e in zip(theta, d))) - base) / h
    left = (base - f(tuple(t - h * e for t, e in zip(theta, d)))) / h
    assert abs(float(right)) <= 1e-8
    assert abs(float(left)) > 1e-3  # the tied structure enters on the other side


# ---- τ → 0: the MAP ---------------------------------------------------------------------------


def test_small_temperature_gives_the_map_exactly_and_only_below_the_critical_one() -> None:
    unary, binary, lengths = _random_crf(3, 4, 3, 14)
    crf = _crf(unary, binary, lengths)
    stats = crf.sufficient_statistics(crf.argmax)
    for b in range(3):
        scores, phi_u, _ = _vertices(crf, b)
        best = int(scores.argmax())
        ham = (phi_u[best] - phi_u).abs().sum(-1) / 2
        other = ham > 0
        if not bool(other.any()):
            continue
        critical = float(((scores[best] - scores[other]) / ham[other]).min())
        single = _crf(unary[b : b + 1], binary[b : b + 1], lengths[b : b + 1])
        below = sparsemap(single, critical / 2).marginals
        torch.testing.assert_close(below.unary[0], stats.unary[b], rtol=0, atol=1e-12)
        torch.testing.assert_close(below.binary[0], stats.binary[b], rtol=0, atol=1e-12)
        above = sparsemap(single, critical * 2).marginals
        assert float((above.unary[0] - stats.unary[b]).abs().max()) > 1e-6


# ---- properties (hypothesis) -------------------------------------------------------------------


def _restricted_residual(result, crf, tau):
    """KKT on the active set: τ M α + ν = c on S, from the returned weights and structures."""
    values, alpha, active = result.active_set
    phi = crf.structure.statistics(values, DT)
    phi_u = phi[0].flatten(2).transpose(0, 1)  # shape: (B, K, D_U)
    scores = crf.structure.score(tuple(t.detach() for t in crf._natural_params), values).T
    alpha = alpha.detach()
    reduced = scores - tau * ((phi_u @ phi_u.mT) @ alpha[..., None])[..., 0]
    nu = (alpha * reduced).sum(-1, keepdim=True)
    return torch.where(active, reduced - nu, 0.0), scores


@settings(max_examples=examples(25))
@given(params=chain_params(), tau=st.sampled_from(TAUS))
def test_properties_on_chains(params, tau: float) -> None:
    crf = _crf(params["unary"], params["binary"], params["lengths"])
    result = sparsemap(crf, tau)
    F, scores = _restricted_residual(result, crf, tau)
    scale = 1 + scores.abs().amax(-1)
    assert bool((F.abs().amax(-1) <= 1e-9 * scale).all())  # restricted KKT residual ~ 0
    weights, active = result.active_set.weights.detach(), result.active_set.active
    assert bool((weights >= 0).all()) and bool((weights[~active] == 0).all())
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[:, 0]), rtol=0, atol=1e-12)
    Z = crf.num_states
    # Affinely independent in φ_U, whose affine hull has dimension L (Z − 1).
    assert bool((active.sum(-1) <= crf.lengths * (Z - 1) + 1).all())
    mu = result.marginals
    for b in range(crf.lengths.shape[0]):  # global optimality over every structure
        s, phi_u, _ = _vertices(crf, b)
        mu_u = mu.unary[b].detach().flatten()
        linear = (weights[b] * scores[b]).sum()  # ⟨θ, μ⟩ = Σ α_s c_s
        _certify(mu_u, s, phi_u, tau, linear - tau * mu_u @ mu_u)


@settings(max_examples=examples(15))
@given(params=chain_params(neg_inf=False), tau=st.sampled_from(TAUS))
def test_batch_equals_stacked_singles_and_padding_is_ignored(params, tau: float) -> None:
    unary, binary, lengths = params["unary"], params["binary"], params["lengths"]
    B, T, Z = unary.shape
    binary = binary.expand(B, T - 1, Z, Z)
    batched = sparsemap(_crf(unary, binary, lengths), tau).marginals
    g = seeded(15)
    for b in range(B):
        single = sparsemap(_crf(unary[b : b + 1], binary[b : b + 1], lengths[b : b + 1]), tau)
        torch.testing.assert_close(single.marginals.unary[0], batched.unary[b], rtol=0, atol=1e-10)
        torch.testing.assert_close(
            single.marginals.binary[0], batched.binary[b], rtol=0, atol=1e-10
        )
    # Two more padded steps with arbitrary potentials: the same marginals, zero on padding.
    pad_u = torch.cat([unary, 5 * torch.randn(B, 2, Z, generator=g, dtype=DT)], 1)
    pad_b = torch.cat([binary, 5 * torch.randn(B, 2, Z, Z, generator=g, dtype=DT)], 1)
    padded = sparsemap(_crf(pad_u, pad_b, lengths), tau).marginals
    torch.testing.assert_close(padded.unary[:, :T], batched.unary, rtol=0, atol=1e-10)
    assert float(padded.unary[:, T:].abs().max()) == 0.0
    assert float(padded.binary[:, T - 1 :].abs().max()) == 0.0


@settings(max_examples=examples(25))
@given(params=categorical_params(), tau=st.sampled_from(TAUS))
def test_categorical_property_with_masks(params, tau: float) -> None:
    logits = params["logits"]
    result = sparsemap(sf.Categorical(logits), tau)
    torch.testing.assert_close(result.marginals, sparsemax(logits / tau), rtol=0, atol=1e-10)
    assert bool((result.active_set.active.sum(-1) <= logits.shape[-1]).all())


# ---- the family-generic API and other families ------------------------------------------------


def test_regularized_argmax_dispatches_on_the_regularizer() -> None:
    unary, binary, lengths = _random_crf(2, 4, 3, 16)
    crf = _crf(unary, binary, lengths)
    l2 = regularized_argmax(crf, 0.5, regularizer=L2())
    direct = sparsemap(crf, 0.5).marginals
    torch.testing.assert_close(l2.unary, direct.unary, rtol=0, atol=0)
    entropy = regularized_argmax(crf, 0.5, regularizer=Entropy())
    default = regularized_argmax(crf, 0.5)
    torch.testing.assert_close(entropy.unary, default.unary, rtol=0, atol=0)
    assert float((entropy.unary - l2.unary).abs().max()) > 1e-3  # dense vs sparse
    with pytest.raises(TypeError, match="regularizer must be Entropy"):
        regularized_argmax(crf, 0.5, regularizer="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="L2's fields"):
        regularized_argmax(crf, 0.5, solver="iterative", regularizer=L2())


@pytest.mark.parametrize("shape", [(5,), (2, 3, 5)], ids=["scalar-batch", "2d-batch"])
def test_categorical_batch_shapes(shape: tuple[int, ...]) -> None:
    logits = torch.randn(shape, generator=seeded(22), dtype=DT).requires_grad_(True)
    result = sparsemap(sf.Categorical(logits), 0.5)
    torch.testing.assert_close(result.marginals, sparsemax(logits / 0.5), rtol=0, atol=1e-12)
    K = result.active_set.values.shape[0]
    assert result.active_set.weights.shape == (*shape[:-1], K)
    assert result.status.gap.shape == shape[:-1]
    cot = torch.randn(shape, generator=seeded(23), dtype=DT)
    (ours,) = torch.autograd.grad((result.marginals * cot).sum(), logits)
    (ref,) = torch.autograd.grad((sparsemax(logits / 0.5) * cot).sum(), logits)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_hmm_posterior_gradients_reach_the_hmm_logits() -> None:
    g = seeded(17)
    Z, V, T = 2, 3, 3
    init = torch.randn(Z, generator=g, dtype=DT, requires_grad=True)
    trans = torch.randn(Z, Z, generator=g, dtype=DT, requires_grad=True)
    emit = torch.randn(Z, V, generator=g, dtype=DT, requires_grad=True)
    obs = torch.randint(0, V, (2, T), generator=g)
    lengths = torch.tensor([T, 2])

    def fn(a, b, c):
        return sparsemap(sf.HMM(a, b, c, obs, lengths), 0.6).marginals.unary

    assert torch.autograd.gradcheck(fn, (init, trans, emit), atol=1e-7)


def test_float32_matches_float64_within_the_oracles_rounding() -> None:
    unary, binary, lengths = _random_crf(2, 30, 5, 18, scale=2.0)
    tau = 0.5
    mu64 = sparsemap(_crf(unary, binary, lengths), tau).marginals.unary
    mu32 = sparsemap(_crf(unary.float(), binary.float(), lengths), tau).marginals.unary
    assert mu32.dtype == torch.float32
    # The float32 oracle may misrank structures whose linearized scores differ by its rounding,
    # δ ≈ T eps32 max|η|; then f(μ*) − f(μ) <= δ and ‖μ_U − μ*_U‖ <= sqrt(2δ/τ).
    eta = unary.abs().max() + binary.abs().max() + tau
    delta = 30 * 2 * torch.finfo(torch.float32).eps * float(eta)
    error = float((mu32.double() - mu64).square().sum(-1).sum(-1).sqrt().max())
    assert error <= (2 * delta / tau) ** 0.5 + 1e-6


def test_float32_backward_is_solved_in_float64() -> None:
    # The condition number of the active set's KKT matrix grows with T and |S| (measured
    # 1e5-1e6 at T = 100), where a float32 factorization may be rejected as singular (Dense's
    # rcond = 10 eps32); the backward factorizes it in float64 for every dtype.
    unary, binary, lengths = _random_crf(2, 60, 4, 24)
    u = unary.float().requires_grad_(True)
    crf = _crf(u, binary.float(), lengths)
    result = sparsemap(crf, 1.0)
    cot = torch.randn(unary.shape, generator=seeded(25))
    (grad,) = torch.autograd.grad((result.marginals.unary * cot).sum(), u)
    # The same IFT formula in float64 on the returned active set: K [a; ν] = [Φ_S v; 0],
    # ∇ = Σ_s a_s φ_U(y_s), with K = [[τ M_S, 1], [1ᵀ, 0]].
    values, _, active = result.active_set
    phi_u = crf.structure.statistics(values, DT)[0].flatten(2).transpose(0, 1)  # (B, K, D_U)
    for b in range(2):
        rows = phi_u[b, active[b]]
        n = rows.shape[0]
        K = torch.zeros(n + 1, n + 1, dtype=DT)
        K[:n, :n] = rows @ rows.T
        K[:n, n] = K[n, :n] = 1.0
        rhs = torch.cat([rows @ cot[b].double().flatten(), torch.zeros(1, dtype=DT)])
        expected = (torch.linalg.solve(K, rhs)[:n] @ rows).reshape(grad[b].shape)
        # float32 inputs and outputs around a float64 solve: errors of κ(K) eps32 relative.
        bound = float(torch.linalg.cond(K)) * torch.finfo(torch.float32).eps
        scale = float(expected.abs().max()) + 1.0
        assert float((grad[b].double() - expected).abs().max()) <= bound * scale


@pytest.mark.parametrize("device", DEVICES)
def test_devices_agree(device: str) -> None:
    unary, binary, lengths = _random_crf(3, 5, 3, 19)
    cpu = sparsemap(_crf(unary, binary, lengths), 0.5).marginals
    moved = sparsemap(_crf(unary.to(device), binary.to(device), lengths.to(device)), 0.5)
    torch.testing.assert_close(moved.marginals.unary.cpu(), cpu.unary, rtol=0, atol=1e-10)


# ---- errors and edge cases ---------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_is_rejected(tau: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        sparsemap(sf.Categorical(torch.zeros(2, 3, dtype=DT)), tau)


def test_bad_inputs_are_rejected_with_the_argument_named() -> None:
    unary, binary, lengths = _random_crf(2, 3, 2, 20)
    bad = unary.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sparsemap(_crf(bad, binary, lengths, validate_args=False))
    with pytest.raises(TypeError, match="dist"):
        sparsemap(unary)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_iter"):
        sparsemap(_crf(unary, binary, lengths), max_iter=0)
    with pytest.raises(ValueError, match="tol"):
        sparsemap(_crf(unary, binary, lengths), tol=-1.0)
    with pytest.raises(ValueError, match="on_failure"):
        sparsemap(_crf(unary, binary, lengths), on_failure="ignore")  # type: ignore[arg-type]
    forbidden = torch.full((2, 3), float("-inf"), dtype=DT)
    forbidden[0, 1] = 0.0
    with pytest.raises(ValueError, match="batch index"):
        sparsemap(sf.Categorical(forbidden, validate_args=False))


def test_non_convergence_raises_or_warns() -> None:
    unary, binary, lengths = _random_crf(2, 5, 3, 21)
    crf = _crf(unary, binary, lengths)
    with pytest.raises(ConvergenceError, match="max_iter=1") as info:
        sparsemap(crf, 10.0, max_iter=1)
    assert info.value.systems is not None and bool(info.value.systems.any())
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        result = sparsemap(crf, 10.0, max_iter=1, on_failure="warn")
    assert not bool(result.status.converged.all())


def test_empty_batch() -> None:
    unary = torch.zeros(0, 3, 2, dtype=DT, requires_grad=True)
    binary = torch.zeros(0, 2, 2, 2, dtype=DT, requires_grad=True)
    result = sparsemap(_crf(unary, binary, torch.zeros(0, dtype=torch.long)))
    assert result.marginals.unary.shape == (0, 3, 2)
    assert result.active_set.weights.shape == (0, 0)
    result.marginals.unary.sum().backward()
    assert unary.grad is not None and unary.grad.shape == unary.shape
