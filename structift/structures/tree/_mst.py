"""Maximum spanning arborescences: Chu–Liu–Edmonds with the single-root constraint (numpy).

``mst(scores, n, single_root)`` returns the heads of a best tree over the words 1..n of one
dense score matrix ``scores[h, m]`` (h -> m; node 0 the root). The recursion is the textbook
Chu–Liu–Edmonds (Chu & Liu 1965; Edmonds 1967): every word takes its best head; if that graph
has a cycle, contract it into one node (arcs into the cycle re-scored by what they displace),
solve the smaller problem and expand. Dense and naive: O(n²) per level, at most n levels, so
O(n³) per tree (Tarjan's O(n²) version is not implemented).

One root (Zmigrod, Vieira & Cotterell 2020, arXiv:2010.02550, §3): the MST of the scores with
every root arc lowered by a penalty larger than the spread of tree scores has exactly one root
arc and is the best such tree (``_single_root``), so the constraint costs nothing extra.

Ties: each word takes its lowest-index best head (of the penalized scores for one root).
``-inf`` scores are treated as a finite ``-1e200``, so a tree is
always returned (of score ``-inf`` when every tree is forbidden).
"""

from __future__ import annotations

import numpy as np

__all__ = ["mst"]

_FORBIDDEN = -1e200


def _find_cycle(heads: np.ndarray) -> list[int] | None:
    """A cycle of the functional graph ``m -> heads[m]`` (words 1..), or None."""
    n1 = heads.shape[0]
    state = np.zeros(n1, dtype=np.int8)  # 0 new, 1 on the current path, 2 done
    state[0] = 2
    for start in range(1, n1):
        path, node = [], start
        while state[node] == 0:
            state[node] = 1
            path.append(node)
            node = int(heads[node])
        if state[node] == 1:
            return path[path.index(node) :]
        for v in path:
            state[v] = 2
    return None


def _greedy(s: np.ndarray) -> np.ndarray:
    heads = np.argmax(s, axis=0)  # lowest index among ties
    heads[0] = -1
    return heads


def _solve(s: np.ndarray, single_root: bool) -> np.ndarray:
    """Heads ``[n+1]`` of a best arborescence of ``s [n+1, n+1]`` (column 0 / diagonal unused)."""
    heads = _greedy(s)
    cycle = _find_cycle(heads)
    if cycle is not None:
        return _contract(s, heads, cycle, single_root)
    return heads


def _tree_score(s: np.ndarray, heads: np.ndarray) -> float:
    return float(s[heads[1:], np.arange(1, heads.shape[0])].sum())


def _single_root(s: np.ndarray) -> np.ndarray:
    """The best tree with one word on ROOT: one MST with every root arc penalized by M.

    A tree with r root arcs scores ``S − r M``. With M larger than the spread of tree scores
    (n times the spread of the finite arc scores, plus 1), every single-root tree beats every
    tree with r >= 2, so the unconstrained MST of the penalized scores is the best single-root
    tree (Gabow & Tarjan 1984; Zmigrod et al. 2020, §3). One O(n³) MST instead of n + 1.
    """
    finite = s[s > _FORBIDDEN / 2]
    spread = float(finite.max() - finite.min()) if finite.size else 0.0
    penalty = (s.shape[0] - 1) * spread + 1.0
    t = s.copy()
    t[0, 1:] = np.where(s[0, 1:] > _FORBIDDEN / 2, s[0, 1:] - penalty, s[0, 1:])
    return _solve(t, False)


def _contract(s: np.ndarray, heads: np.ndarray, cycle: list[int], single_root: bool):
    n1 = s.shape[0]
    in_cycle = np.zeros(n1, dtype=bool)
    in_cycle[cycle] = True
    outside = np.flatnonzero(~in_cycle)  # includes the root, node 0 first
    cyc = np.array(cycle)
    k = outside.size  # the contracted node's index
    t = np.full((k + 1, k + 1), _FORBIDDEN * 8)
    t[:k, :k] = s[np.ix_(outside, outside)]
    # Arcs into the cycle: gain over the cycle arc they displace; keep the best entry point.
    into = s[np.ix_(outside, cyc)] - s[heads[cyc], cyc][None, :]  # shape: (k, |C|)
    enter = np.argmax(into, axis=1)
    t[:k, k] = into[np.arange(k), enter]
    # Arcs out of the cycle: the best source inside it.
    out = s[np.ix_(cyc, outside)]  # shape: (|C|, k)
    leave = np.argmax(out, axis=0)
    t[k, :k] = out[leave, np.arange(k)]
    t[:, 0] = _FORBIDDEN * 8
    np.fill_diagonal(t, _FORBIDDEN * 8)
    sub = _solve(t, single_root)
    result = heads.copy()
    for j in range(1, k):  # outside words
        h = sub[j]
        result[outside[j]] = cyc[leave[j]] if h == k else outside[h]
    h = sub[k]  # the arc entering the cycle
    result[cyc[enter[h]]] = outside[h]
    return result


def mst(scores: np.ndarray, n: int, single_root: bool) -> np.ndarray:
    """Heads ``[n+1]`` (``heads[0] = -1``) of a best tree over words 1..n (module docstring)."""
    s = np.where(np.isneginf(scores[: n + 1, : n + 1]), _FORBIDDEN, scores[: n + 1, : n + 1])
    s = s.astype(np.float64, copy=True)
    s[:, 0] = _FORBIDDEN * 8
    np.fill_diagonal(s, _FORBIDDEN * 8)
    return _single_root(s) if single_root else _solve(s, False)
