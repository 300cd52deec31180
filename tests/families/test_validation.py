"""Bad input raises ValueError/TypeError naming the argument, what was given and what was expected."""
# ruff: noqa: E501  (long regexes in the tables of bad inputs)

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import structift as st

NAN, INF = float("nan"), float("inf")


def _crf(**overrides) -> Callable[[], object]:
    def build() -> object:
        args = {
            "unary": torch.zeros(2, 4, 3),
            "binary": torch.zeros(3, 3),
            "lengths": torch.tensor([4, 2]),
        }
        args.update(overrides)
        return st.LinearChainCRF(args["unary"], args["binary"], args["lengths"])

    return build


def _hmm(**overrides) -> Callable[[], object]:
    def build() -> object:
        args = {
            "init_logits": torch.zeros(3),
            "transition_logits": torch.zeros(3, 3),
            "emission_logits": torch.zeros(3, 5),
            "observations": torch.zeros(2, 4, dtype=torch.long),
            "lengths": torch.tensor([4, 2]),
        }
        args.update(overrides)
        return st.HMM(*args.values())

    return build


def _with(x: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    x = x.clone()
    x[index] = value
    return x


CONSTRUCTION = [
    # Categorical
    (
        "cat-not-tensor",
        lambda: st.Categorical([0.0, 1.0]),
        TypeError,
        r"logits must be a torch\.Tensor.*got list",
    ),
    (
        "cat-int",
        lambda: st.Categorical(torch.tensor([1, 2])),
        TypeError,
        r"logits must be a floating-point tensor.*torch\.int64",
    ),
    (
        "cat-0d",
        lambda: st.Categorical(torch.tensor(1.0)),
        ValueError,
        r"logits must have shape \[\*batch, n\].*got \(\)",
    ),
    (
        "cat-nan",
        lambda: st.Categorical(torch.tensor([0.0, NAN])),
        ValueError,
        r"logits must be real or -inf.*nan at index \(1,\)",
    ),
    (
        "cat-posinf",
        lambda: st.Categorical(torch.tensor([0.0, INF])),
        ValueError,
        r"logits must be real or -inf.*inf at index \(1,\)",
    ),
    (
        "cat-empty",
        lambda: st.Categorical(torch.tensor([[0.0, 1.0], [-INF, -INF]])),
        ValueError,
        r"at least one finite.*logits\[\(1,\)\] is all -inf",
    ),
    # LinearChainCRF
    (
        "crf-unary-2d",
        _crf(unary=torch.zeros(4, 3)),
        ValueError,
        r"unary must have shape \[B, T, Z\]; got shape \(4, 3\)",
    ),
    (
        "crf-unary-int",
        _crf(unary=torch.zeros(2, 4, 3, dtype=torch.long)),
        TypeError,
        r"unary must be a floating-point tensor.*torch\.int64",
    ),
    (
        "crf-binary-shape",
        _crf(binary=torch.zeros(3, 2)),
        ValueError,
        r"binary must be broadcastable to \[B, T-1, Z, Z\] = \[2, 3, 3, 3\].*got shape \(3, 2\)",
    ),
    (
        "crf-binary-time",
        _crf(binary=torch.zeros(2, 4, 3, 3)),
        ValueError,
        r"binary must be broadcastable.*got shape \(2, 4, 3, 3\)",
    ),
    (
        "crf-dtype",
        _crf(binary=torch.zeros(3, 3, dtype=torch.float64)),
        TypeError,
        r"binary must have the dtype of unary \(torch\.float32\); got torch\.float64",
    ),
    (
        "crf-nan-unary",
        _crf(unary=_with(torch.zeros(2, 4, 3), (1, 3, 0), NAN)),
        ValueError,
        r"unary must be real or -inf.*nan at index \(1, 3, 0\)",
    ),
    (
        "crf-posinf-binary",
        _crf(binary=_with(torch.zeros(3, 3), (0, 1), INF)),
        ValueError,
        r"binary must be real or -inf.*inf at index \(0, 1\)",
    ),
    (
        "crf-lengths-zero",
        _crf(lengths=torch.tensor([4, 0])),
        ValueError,
        r"lengths must lie in \[1, T\] = \[1, 4\]; got lengths\[1\] = 0",
    ),
    (
        "crf-lengths-long",
        _crf(lengths=torch.tensor([5, 2])),
        ValueError,
        r"lengths must lie in \[1, T\] = \[1, 4\]; got lengths\[0\] = 5",
    ),
    (
        "crf-lengths-shape",
        _crf(lengths=torch.tensor([4, 2, 1])),
        ValueError,
        r"lengths must have shape \[B\] = \(2,\); got \(3,\)",
    ),
    (
        "crf-lengths-float",
        _crf(lengths=torch.tensor([4.0, 2.0])),
        TypeError,
        r"lengths must have an integer dtype.*torch\.float32",
    ),
    (
        "crf-lengths-list",
        _crf(lengths=[4, 2]),
        TypeError,
        r"lengths must be an integer torch\.Tensor; got list",
    ),
    ("crf-T0", _crf(unary=torch.zeros(2, 0, 3)), ValueError, r"T >= 1 and Z >= 1; got \(2, 0, 3\)"),
    # HMM
    (
        "hmm-init-shape",
        _hmm(init_logits=torch.zeros(4)),
        ValueError,
        r"init_logits must have shape \[3\] or \[B, \*\[3\]\] with B = 2; got \(4,\)",
    ),
    (
        "hmm-transition-shape",
        _hmm(transition_logits=torch.zeros(3, 4)),
        ValueError,
        r"transition_logits must have shape \[3, 3\].*got \(3, 4\)",
    ),
    (
        "hmm-batch-mismatch",
        _hmm(emission_logits=torch.zeros(5, 3, 5)),
        ValueError,
        r"emission_logits must have shape \[3, 5\] or \[B, \*\[3, 5\]\] with B = 2; got \(5, 3, 5\)",
    ),
    (
        "hmm-nan",
        _hmm(emission_logits=_with(torch.zeros(3, 5), (2, 4), NAN)),
        ValueError,
        r"emission_logits must be real or -inf.*nan at index \(2, 4\)",
    ),
    (
        "hmm-empty-row",
        _hmm(transition_logits=_with(torch.zeros(3, 3), (1,), -INF)),
        ValueError,
        r"transition_logits must have at least one finite logit in every row.*\[\(1,\)\]",
    ),
    (
        "hmm-dtype",
        _hmm(init_logits=torch.zeros(3, dtype=torch.float64)),
        TypeError,
        r"transition_logits must have the dtype of init_logits \(torch\.float64\); got torch\.float32",
    ),
    (
        "hmm-obs-float",
        _hmm(observations=torch.zeros(2, 4)),
        TypeError,
        r"observations must have an integer dtype.*torch\.float32",
    ),
    (
        "hmm-obs-range",
        _hmm(observations=torch.tensor([[0, 1, 5, 0], [0, 0, 0, 0]])),
        ValueError,
        r"observations must lie in \[0, 4\]; got 5 at \(0, 2\)",
    ),
    (
        "hmm-obs-negative",
        _hmm(observations=torch.tensor([[0, 1, 2, 0], [-1, 0, 0, 0]])),
        ValueError,
        r"observations must lie in \[0, 4\]; got -1 at \(1, 0\)",
    ),
    (
        "hmm-obs-1d",
        _hmm(observations=torch.zeros(4, dtype=torch.long)),
        ValueError,
        r"observations must be a LongTensor of shape \[B, T\].*\(4,\)",
    ),
    (
        "hmm-lengths",
        _hmm(lengths=torch.tensor([4, 9])),
        ValueError,
        r"lengths must lie in \[1, T\] = \[1, 4\]; got lengths\[1\] = 9",
    ),
    (
        "hmm-float-init",
        _hmm(init_logits=torch.zeros(3, dtype=torch.long)),
        TypeError,
        r"init_logits must be a floating-point tensor",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "message"), [c[1:] for c in CONSTRUCTION], ids=[c[0] for c in CONSTRUCTION]
)
def test_bad_construction_raises_with_a_useful_message(build, error, message) -> None:
    with pytest.raises(error, match=message):
        build()


def test_padding_observations_may_hold_anything() -> None:
    hmm = _hmm(observations=torch.tensor([[0, 1, 2, 3], [4, 0, -100, 99]]))()
    assert torch.isfinite(hmm.log_partition).all()


def _infeasible_crf() -> st.LinearChainCRF:
    binary = torch.full((2, 2), -INF)
    return st.LinearChainCRF(torch.zeros(1, 3, 2), binary)  # no pair is allowed


@pytest.mark.parametrize(
    "access",
    [
        lambda d: d.log_partition,
        lambda d: d.marginals,
        lambda d: d.argmax,
        lambda d: d.entropy(),
        lambda d: d.sample((2,)),
    ],
    ids=["log_partition", "marginals", "argmax", "entropy", "sample"],
)
def test_distribution_with_empty_support_raises(access) -> None:
    with pytest.raises(ValueError, match=r"no structure has finite score at batch index \(0,\)"):
        access(_infeasible_crf())


def test_empty_support_without_validation_gives_minus_inf_not_nan() -> None:
    crf = st.LinearChainCRF(torch.zeros(1, 3, 2), torch.full((2, 2), -INF), validate_args=False)
    assert crf.log_partition.item() == -INF
    assert not torch.isnan(crf.marginals.unary).any()


VALUES = [
    (
        "tags-float",
        lambda d: d.log_prob(torch.zeros(2, 4)),
        TypeError,
        r"tags must have an integer dtype.*torch\.float32",
    ),
    (
        "tags-shape",
        lambda d: d.log_prob(torch.zeros(2, 5, dtype=torch.long)),
        ValueError,
        r"tags must have trailing shape \(2, 4\); got shape \(2, 5\)",
    ),
    (
        "tags-range",
        lambda d: d.log_prob(torch.tensor([[0, 1, 3, 0], [0, 0, 0, 0]])),
        ValueError,
        r"tags must lie in \[0, 2\]; got 3 at \(0, 2\)",
    ),
    (
        "tags-negative",
        lambda d: d.log_prob(torch.tensor([[0, 1, 2, 0], [0, -1, 0, 0]])),
        ValueError,
        r"tags must lie in \[0, 2\]; got -1 at \(1, 1\)",
    ),
    (
        "stats-range",
        lambda d: d.sufficient_statistics(torch.full((2, 4), 7)),
        ValueError,
        r"tags must lie in \[0, 2\]",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"), [c[1:] for c in VALUES], ids=[c[0] for c in VALUES]
)
def test_bad_values_raise_with_a_useful_message(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call(_crf()())


def test_padding_tags_are_ignored() -> None:
    crf = _crf()()
    tags = torch.tensor([[0, 1, 2, 0], [1, 2, 0, 0]])
    junk = torch.tensor([[0, 1, 2, 0], [1, 2, -100, 55]])
    assert torch.equal(crf.log_prob(tags), crf.log_prob(junk))


def test_categorical_bad_values() -> None:
    cat = st.Categorical(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"value must lie in \[0, 2\]; got 3 at \(1,\)"):
        cat.log_prob(torch.tensor([0, 3]))
    with pytest.raises(TypeError, match=r"value must have an integer dtype"):
        cat.log_prob(torch.tensor([0.0, 1.0]))
    with pytest.raises(
        ValueError, match=r"value must have trailing shape \(2,\); got shape \(3,\)"
    ):
        cat.log_prob(torch.tensor([0, 1, 2]))


def test_kl_between_incompatible_distributions_raises() -> None:
    p = _crf()()
    other_lengths = _crf(lengths=torch.tensor([4, 3]))()
    with pytest.raises(ValueError, match=r"not defined on the same structures"):
        torch.distributions.kl_divergence(p, other_lengths)
    with pytest.raises(ValueError, match=r"not defined on the same structures"):
        p.cross_entropy(st.LinearChainCRF(torch.zeros(2, 4, 2), torch.zeros(2, 2)))
    with pytest.raises(TypeError, match=r"share dtype and device; got torch\.float32"):
        p.kl(_crf(unary=torch.zeros(2, 4, 3).double(), binary=torch.zeros(3, 3).double())())
    with pytest.raises(ValueError, match=r"batch shapes must match; got \(3,\) and \(2,\)"):
        st.Categorical(torch.zeros(3, 4)).kl(st.Categorical(torch.zeros(2, 4)))
    with pytest.raises(TypeError, match=r"needs another structift ExpFamily; got Normal"):
        st.Categorical(torch.zeros(3)).cross_entropy(torch.distributions.Normal(0.0, 1.0))


def test_device_mismatch_names_the_argument() -> None:
    """A tensor on the 'meta' device stands in for a second device on a CPU-only machine."""
    with pytest.raises(
        ValueError, match=r"binary must be on the device of unary \(cpu\); got meta"
    ):
        st.LinearChainCRF(torch.zeros(2, 4, 3), torch.zeros(3, 3, device="meta"))
    with pytest.raises(ValueError, match=r"lengths must be on device cpu.*got meta"):
        st.LinearChainCRF(
            torch.zeros(2, 4, 3), torch.zeros(3, 3), torch.ones(2, dtype=torch.long, device="meta")
        )


def test_inputs_are_never_mutated() -> None:
    unary = torch.randn(2, 4, 3)
    binary = torch.randn(3, 3)
    lengths = torch.tensor([4, 2], dtype=torch.int32)
    copies = [unary.clone(), binary.clone(), lengths.clone()]
    crf = st.LinearChainCRF(unary, binary, lengths)
    crf.entropy(), crf.marginals, crf.sample((3,)), crf.log_prob(crf.argmax)
    for x, c in zip((unary, binary, lengths), copies):
        assert torch.equal(x, c) and x.dtype == c.dtype and not x.requires_grad


def test_validate_args_false_skips_every_check() -> None:
    """No check runs: bad input is accepted without error (the caller asked for speed)."""
    unary = torch.zeros(1, 3, 2)
    unary[0, 1, 0] = NAN
    crf = st.LinearChainCRF(unary, torch.zeros(2, 2), torch.tensor([9]), validate_args=False)
    assert not crf._validate_args
    st.Categorical(torch.tensor([NAN, 0.0]), validate_args=False)
    st.HMM(
        torch.zeros(3),
        torch.zeros(3, 3),
        torch.zeros(3, 2),
        torch.full((1, 2), 7),
        validate_args=False,
    )


def test_nan_check_is_not_fooled_by_infinities_or_overflow() -> None:
    """The one-reduction fast path: -inf next to +inf or NaN is still caught; overflow is not an error."""
    unary = torch.zeros(1, 3, 2)
    unary[0, 0, 0] = -INF
    unary[0, 2, 1] = INF
    with pytest.raises(ValueError, match=r"unary must be real or -inf.*inf at index \(0, 2, 1\)"):
        st.LinearChainCRF(unary, torch.zeros(2, 2))
    unary[0, 2, 1] = NAN
    with pytest.raises(ValueError, match=r"unary must be real or -inf.*nan at index \(0, 2, 1\)"):
        st.LinearChainCRF(unary, torch.zeros(2, 2))
    huge = torch.full((1, 3, 2), 3e38)  # float32: the sum overflows to +inf, the entries are fine
    st.LinearChainCRF(huge, torch.zeros(2, 2))


@pytest.mark.parametrize(
    "dist",
    [
        lambda: st.Categorical(torch.zeros(2, 3)),
        lambda: st.LinearChainCRF(torch.zeros(2, 4, 3), torch.zeros(3, 3)),
        lambda: st.HMM(
            torch.zeros(3), torch.zeros(3, 3), torch.zeros(3, 2), torch.zeros(2, 4).long()
        ),
    ],
    ids=["categorical", "crf", "hmm"],
)
def test_sample_shape_is_checked(dist) -> None:
    d = dist()
    with pytest.raises(ValueError, match=r"sample_shape must have non-negative sizes.*\(-1,\)"):
        d.sample((-1,))
    with pytest.raises(TypeError, match="sample_shape must be a tuple of non-negative ints"):
        d.sample((1.5,))
    assert d.sample((0,)).shape[0] == 0
    assert d.sample(3).shape[0] == 3
