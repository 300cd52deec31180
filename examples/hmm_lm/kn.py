"""Interpolated modified Kneser-Ney n-gram language model (Chen & Goodman 1998, §4.1.6).

For order ``N`` and a context ``h`` of ``k - 1`` words (``h'`` is ``h`` without its first word),

    p_k(w | h) = (a_k(h w) - d_k(a_k(h w))) / a_k(h) + gamma_k(h) p_{k-1}(w | h'),
    gamma_k(h) = sum_w d_k(a_k(h w)) / a_k(h),        a_k(h) = sum_w a_k(h w),

and ``p_k(w | h) = p_{k-1}(w | h')`` when ``a_k(h) = 0``; ``p_0(w) = 1 / V``. The counts
``a_k`` are the raw counts at the highest order and for n-grams that start with ``<s>``
(nothing can precede them), and otherwise the continuation counts
``a_k(g) = |{v : a_{k+1}(v g) > 0}|`` (as KenLM). The discounts are the modified-KN ones,
per order from the count-of-counts ``n_c`` of ``a_k``:
``Y = n_1 / (n_1 + 2 n_2)``, ``D_c = c - (c + 1) Y n_{c+1} / n_c`` for ``c = 1, 2`` and
``D_3`` for every count ``>= 3``; ``d_k(a) = min(D_c, a)``. Because ``gamma`` sums the
discounts actually taken, every ``p_k(· | h)`` sums to one over the ``V`` predicted symbols.

Each sentence is ``<s> w_1 … w_n </s>`` (one ``<s>``, shorter contexts at the start); ``<s>``
is never predicted. n-grams are packed into Python ints (``base = V + 1`` digits) to keep
the 5-gram tables small.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence


def discounts(counts: Iterable[int]) -> tuple[float, float, float]:
    """Modified-KN discounts ``(D_1, D_2, D_3+)`` from the counts of one order.

    Falls back on ``0.5, 1.0, 1.5`` (clipped into ``[0, c]``) where a count-of-count is zero,
    as happens on tiny data.
    """
    n = Counter(c for c in counts if c <= 4)
    n1, n2, n3, n4 = (n.get(c, 0) for c in (1, 2, 3, 4))
    if min(n1, n2, n3, n4) == 0:
        return 0.5, 1.0, 1.5
    y = n1 / (n1 + 2 * n2)
    out = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    return tuple(min(max(d, 0.0), c) for c, d in zip((1, 2, 3), out))  # type: ignore[return-value]


class KneserNey:
    """An interpolated modified Kneser-Ney model of order ``N`` over ids ``0 .. V-1``.

    Args:
        sentences: training sequences of ids in ``[0, V)``, each ending with the end token.
        vocab_size: V, the number of predicted symbols (``<s>`` is the extra id ``V``).
        order: N >= 1.
    """

    def __init__(self, sentences: Iterable[Sequence[int]], vocab_size: int, order: int) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1; got {order}.")
        self.V, self.order, self.bos, self.base = vocab_size, order, vocab_size, vocab_size + 1
        raw: list[Counter[int]] = [Counter() for _ in range(order + 1)]  # raw[k]: k-grams
        for sent in sentences:
            seq = [self.bos, *sent]
            if any(not 0 <= w < vocab_size for w in sent):
                raise ValueError(f"word ids must be in [0, {vocab_size}); got {list(sent)}.")
            for i in range(1, len(seq)):
                key = 0  # the k-gram ending at i, grown leftwards
                for k in range(1, min(order, i + 1) + 1):
                    key += seq[i - k + 1] * self.base ** (k - 1)
                    raw[k][key] += 1
        self.counts = self._adjusted(raw)
        self.discount = [(0.0, 0.0, 0.0)] + [discounts(c.values()) for c in self.counts[1:]]
        self.context = [self._context_stats(k) for k in range(order + 1)]

    def _pack(self, words: Sequence[int]) -> int:
        key = 0
        for w in words:
            key = key * self.base + w
        return key

    def _starts_with_bos(self, key: int, k: int) -> bool:
        return key // self.base ** (k - 1) == self.bos

    def _adjusted(self, raw: list[Counter[int]]) -> list[Counter[int]]:
        """``a_k``: raw counts at order N and for ``<s>``-initial n-grams, else continuation."""
        out: list[Counter[int]] = [Counter() for _ in range(self.order + 1)]
        out[self.order] = raw[self.order]
        for k in range(1, self.order):
            a = out[k]
            for key, c in raw[k].items():
                if self._starts_with_bos(key, k):
                    a[key] = c
            modulus = self.base**k
            for key in raw[k + 1]:  # each distinct (v g) adds one to a_k(g)
                suffix = key % modulus
                if not self._starts_with_bos(suffix, k):
                    a[suffix] += 1
        return out

    def _context_stats(self, k: int) -> dict[int, tuple[int, float]]:
        """``{h: (a_k(h), sum_w d_k(a_k(h w)))}`` for the contexts of order ``k``."""
        if k == 0:
            return {}
        stats: dict[int, list[float]] = {}
        d1, d2, d3 = self.discount[k]
        for key, c in self.counts[k].items():
            s = stats.setdefault(key // self.base, [0, 0.0])
            s[0] += c
            s[1] += min(d1 if c == 1 else d2 if c == 2 else d3, c)
        return {h: (int(t), m) for h, (t, m) in stats.items()}

    def prob(self, context: Sequence[int], word: int) -> float:
        """``p(word | context)``; ``context`` may start with ``<s>`` (id V); only its last
        ``N - 1`` ids are used."""
        context = list(context)[-(self.order - 1) :] if self.order > 1 else []
        p = 1.0 / self.V
        for k in range(1, len(context) + 2):
            h = self._pack(context[len(context) - k + 1 :]) if k > 1 else 0
            total, mass = self.context[k].get(h, (0, 0.0))
            if total == 0:
                continue
            c = self.counts[k].get(h * self.base + word, 0)
            d1, d2, d3 = self.discount[k]
            d = min(d1 if c == 1 else d2 if c == 2 else d3, c) if c else 0.0
            p = (c - d) / total + mass / total * p
        return p

    def log_prob_sentence(self, sent: Sequence[int]) -> float:
        """Natural-log probability of ``sent`` (ids, ending with ``</s>``) after ``<s>``."""
        seq = [self.bos, *sent]
        return sum(
            math.log(self.prob(seq[max(0, i - self.order + 1) : i], seq[i]))
            for i in range(1, len(seq))
        )

    def perplexity(self, sentences: Iterable[Sequence[int]]) -> float:
        """``exp(-sum log p / tokens)``, every token and ``</s>`` counted."""
        total, tokens = 0.0, 0
        for s in sentences:
            total += self.log_prob_sentence(s)
            tokens += len(s)
        return math.exp(-total / max(tokens, 1))
