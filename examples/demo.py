"""A tour of structift's linear-chain CRF: log Z, marginals, Viterbi, sampling, entropy.

Run: ``python examples/demo.py`` (``make run``). It builds a small CRF with a hard constraint,
prints what exact inference gives, and checks the marginals two ways: against autograd's
gradient of log Z and against brute-force enumeration of every tag sequence.
"""

from __future__ import annotations

import argparse
import itertools

import torch

import structift as st

TAGS = ["DET", "NOUN", "VERB"]


def build_crf() -> st.LinearChainCRF:
    """Two sentences (lengths 5 and 3) over three tags; a DET is never followed by a VERB."""
    g = torch.Generator().manual_seed(0)
    B, T, Z = 2, 5, len(TAGS)
    unary = torch.randn(B, T, Z, generator=g, dtype=torch.float64)  # shape: (B, T, Z)
    transitions = torch.randn(Z, Z, generator=g, dtype=torch.float64)  # [from, to]
    transitions[0, 2] = float("-inf")  # hard constraint: DET -> VERB is impossible
    unary.requires_grad_(True)
    transitions.requires_grad_(True)
    return st.LinearChainCRF(unary, transitions, lengths=torch.tensor([5, 3]))


@torch.no_grad()
def enumerate_sentence(crf: st.LinearChainCRF, b: int) -> tuple[float, torch.Tensor]:
    """log Z and the tag marginals [L, Z] of sentence b, by scoring all Z^L tag sequences."""
    L, Z = int(crf.lengths[b]), crf.num_states
    paths = torch.tensor(list(itertools.product(range(Z), repeat=L)))  # shape: (Z^L, L)
    tags = torch.zeros(len(paths), *crf.batch_shape, crf.event_shape[0], dtype=torch.long)
    tags[:, b, :L] = paths
    scores = crf.score(tags)[:, b]  # <theta, phi(y)> for every sequence y
    probs = torch.softmax(scores, 0)
    marginals = torch.einsum("n,nlz->lz", probs, torch.nn.functional.one_hot(paths, Z).double())
    return float(torch.logsumexp(scores, 0)), marginals


def words(tags: torch.Tensor, length: int) -> str:
    return " ".join(TAGS[int(i)] for i in tags[:length])


def main(smoke: bool = False) -> None:
    torch.set_printoptions(precision=3, sci_mode=False)
    crf = build_crf()
    lengths = crf.lengths.tolist()
    print(
        f"LinearChainCRF: batch {tuple(crf.batch_shape)}, T = {crf.event_shape[0]}, "
        f"tags {TAGS}, lengths {lengths}"
    )

    log_z = crf.log_partition
    brute = [enumerate_sentence(crf, b) for b in range(2)]
    print(f"\nlog Z (forward algorithm):   {log_z.detach().numpy().round(6)}")
    print(f"log Z (enumerating 3^L):     {torch.tensor([z for z, _ in brute]).numpy().round(6)}")

    mu = crf.marginals
    print("\nmarginals p(y_t = tag) for sentence 0 (rows t, columns " + ", ".join(TAGS) + "):")
    print(mu.unary[0].detach())
    print(f"p(DET -> VERB) anywhere: {float(mu.binary[..., 0, 2].detach().sum()):.1f}  (forbidden)")

    with torch.no_grad():
        best = crf.argmax
        best_lp = crf.log_prob(best)
        sample = crf.sample((1,), generator=torch.Generator().manual_seed(1))[0]
        sample_lp = crf.log_prob(sample)
    print("\nViterbi path:")
    for b, n in enumerate(lengths):
        print(f"  sentence {b}: {words(best[b], n):<28} log p = {float(best_lp[b]):.3f}")
    print("a sample:")
    for b, n in enumerate(lengths):
        print(f"  sentence {b}: {words(sample[b], n):<28} log p = {float(sample_lp[b]):.3f}")

    print(f"\nentropy H = log Z - <theta, mu>: {crf.entropy().detach().numpy().round(4)} nats")

    # The marginals are the gradient of log Z. Check forward-backward against autograd's
    # gradient, a central finite difference along a random direction, and enumeration.
    grad_unary, _ = torch.autograd.grad(log_z.sum(), [crf.unary, crf.binary])
    direction = torch.randn(crf.unary.shape, generator=torch.Generator().manual_seed(2)).double()
    with torch.no_grad():
        eps = 1e-5
        plus = st.LinearChainCRF(crf.unary + eps * direction, crf.binary, crf.lengths)
        minus = st.LinearChainCRF(crf.unary - eps * direction, crf.binary, crf.lengths)
        finite_diff = float((plus.log_partition - minus.log_partition).sum() / (2 * eps))
    errors = {
        "autograd d logZ/d unary vs marginals": float((grad_unary - mu.unary).detach().abs().max()),
        "finite difference vs <marginals, v>": abs(
            finite_diff - float((mu.unary.detach() * direction).sum())
        ),
        "enumerated marginals vs marginals": max(
            float((m - mu.unary.detach()[b, : m.shape[0]]).abs().max())
            for b, (_, m) in enumerate(brute)
        ),
        "enumerated log Z vs log Z": max(
            abs(float(log_z.detach()[b]) - z) for b, (z, _) in enumerate(brute)
        ),
    }
    print()
    for name, err in errors.items():
        print(f"max |{name}| = {err:.1e}")
    ok = max(errors.values()) < 1e-8
    print("checks passed" if ok else "CHECKS FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="same run (the demo is tiny)")
    main(parser.parse_args().smoke)
