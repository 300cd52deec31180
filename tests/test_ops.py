"""Tests for structift._ops: NaN-safe logsumexp and lengths_to_mask."""

from __future__ import annotations

import pytest
import torch

from structift._ops import lengths_to_mask, logsumexp
from tests.seeding import seeded

INF = float("inf")


class TestLogsumexp:
    def test_matches_torch_on_finite(self, device: torch.device) -> None:
        x = torch.randn(4, 5, 6, dtype=torch.float64, device=device)
        for dim in (0, 1, -1, (1, 2)):
            torch.testing.assert_close(logsumexp(x, dim), torch.logsumexp(x, dim))
            torch.testing.assert_close(
                logsumexp(x, dim, keepdim=True), torch.logsumexp(x, dim, keepdim=True)
            )

    def test_large_values_do_not_overflow(self) -> None:
        x = torch.tensor([1000.0, 1000.0, -INF])
        torch.testing.assert_close(logsumexp(x, 0), torch.tensor(1000.0 + 0.6931471805599453))

    def test_all_neg_inf_value_and_gradients_are_safe(self) -> None:
        x = torch.tensor([[-INF, -INF, -INF], [0.0, -INF, 1.0]], dtype=torch.float64)
        x.requires_grad_(True)
        out = logsumexp(x, -1)
        assert out[0].item() == -INF
        assert torch.isfinite(out[1])
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g[0], torch.zeros(3, dtype=torch.float64))
        torch.testing.assert_close(g[1], torch.softmax(x[1].detach(), -1))
        (h,) = torch.autograd.grad((g * torch.arange(3.0, dtype=torch.float64)).sum(), x)
        assert not torch.isnan(h).any()
        torch.testing.assert_close(h[0], torch.zeros(3, dtype=torch.float64))

    def test_gradcheck_and_gradgradcheck(self) -> None:
        x = torch.randn(3, 4, dtype=torch.float64)
        x[0, 1] = -INF
        x[2, :3] = -INF  # all--inf rows have a -inf output, which finite differences cannot handle
        x.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda y: logsumexp(y, -1), (x,))
        assert torch.autograd.gradgradcheck(lambda y: logsumexp(y, -1), (x,))


class TestLengthsToMask:
    def test_mask(self, device: torch.device) -> None:
        lengths = torch.tensor([3, 1, 0], device=device)
        expected = torch.tensor(
            [[True, True, True, False], [True, False, False, False], [False] * 4], device=device
        )
        assert torch.equal(lengths_to_mask(lengths, 4), expected)

    @pytest.mark.parametrize("T", [1, 5])
    def test_full_lengths_give_all_true(self, T: int) -> None:
        assert lengths_to_mask(torch.full((2,), T), T).all()


class TestSemirings:
    def test_matvec(self) -> None:
        from structift.semiring import Log, Max

        alpha = torch.randn(2, 3, dtype=torch.float64)
        w = torch.randn(2, 3, 4, dtype=torch.float64)
        w[0, :, 1] = -INF
        scores = alpha[:, :, None] + w
        torch.testing.assert_close(Log.matvec(alpha, w), torch.logsumexp(scores, dim=1))
        torch.testing.assert_close(Max.matvec(alpha, w), scores.amax(dim=1))
        assert Log.zero == Max.zero == -INF and Log.one == Max.one == 0.0

    def test_max_semiring_forward_gives_viterbi_score(self) -> None:
        from structift.semiring import Max
        from structift.structures import chain
        from structift.structures.chain import _log

        g = seeded(3)
        unary = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
        binary = torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64)
        lengths = torch.tensor([5, 3, 1])
        alpha = _log.forward(unary, binary, lengths_to_mask(lengths, 5), Max)
        _, best = chain.viterbi(unary, binary, lengths)
        torch.testing.assert_close(alpha[:, -1].amax(-1), best)
