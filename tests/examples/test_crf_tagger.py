"""The CRF tagger example: units (features, batching, scoring, the CRF head's NLL) and
end-to-end runs in smoke mode (train, resume, tag, CoNLL files, 2-process DDP on CPU)."""

from __future__ import annotations

import itertools
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.seeding import seeded, shift

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "crf_tagger.py"
sys.path.insert(0, str(ROOT / "examples"))

from tagger.features import (  # noqa: E402
    Vocab,
    collate,
    encode,
    length_sorted_batches,
    token_features,
    word_shape,
)
from tagger.model import Tagger, TaggerConfig  # noqa: E402
from tagger.training import Dist, Scores, epoch_batches, evaluate  # noqa: E402

# Absolute: CI may give a path relative to the repository, and end-to-end runs use other cwds.
SHARED = Path(os.environ.get("STRUCTIFT_DATA", "/work/shared/data")).resolve()
HAVE_SHARED = (SHARED / "brown" / "cats.txt").is_file()

TOY = [
    [("The", "at"), ("jury", "nn"), ("said", "vbd"), ("it", "pps"), (".", ".")],
    [("A", "at"), ("dog", "nn"), ("ran", "vbd"), (".", ".")],
    [("It", "pps"), ("said", "vbd"), ("no", "at"), ("dog", "nn"), ("ran", "vbd"), (".", ".")],
]


class TestFeatures:
    def test_word_shape(self) -> None:
        assert word_shape("Atlanta's") == "Xx'x"
        assert word_shape("1,119") == "d,d"
        assert word_shape("over-all") == "x-x"

    def test_token_features_window(self) -> None:
        feats = token_features(["The", "jury", "said"], 0)
        assert "w=the" in feats and "w[-1]=<s>" in feats and "w[-2]=<s>" in feats
        assert "w[1]=jury" in feats and "w[2]=said" in feats and "suf3=the" in feats
        last = token_features(["The", "jury", "said"], 2)
        assert "w[1]=</s>" in last and "w[-2]=the" in last and "title=0" in last

    def test_encode_marks_unknown_words_and_tags(self) -> None:
        vocab = Vocab.build(TOY)
        e = encode(vocab, [("The", "at"), ("cat", "nn"), ("sat", "xx")])
        assert e.known == [True, False, False]
        assert e.tags[:2] == [vocab.tags.index("at"), vocab.tags.index("nn")] and e.tags[2] == -1
        assert all(len(f) > 0 for f in e.feats) and all(i > 0 for f in e.feats for i in f)

    def test_collate_pads(self) -> None:
        vocab = Vocab.build(TOY)
        b = collate([encode(vocab, s) for s in TOY])
        assert b.words.shape == (3, 6) and b.lengths.tolist() == [5, 4, 6]
        assert (b.tags[1, 4:] == -1).all() and (b.words[1, 4:] == 0).all()
        assert (b.feats[1, 4:] == 0).all() and not b.known[1, 4:].any()

    def test_batches_cover_everything_once_and_share_out_across_ranks(self) -> None:
        vocab = Vocab.build(TOY)
        items = [encode(vocab, s) for s in TOY * 7]
        batches = length_sorted_batches(items, 4, seeded(1))
        assert sorted(i for b in batches for i in b) == list(range(21))
        for b in batches:  # sorted by length inside a batch: little padding
            lengths = [len(items[i].words) for i in b]
            assert max(lengths) - min(lengths) <= 2
        shares = [epoch_batches(items, 4, 0, 3, Dist(rank=r, world=2)) for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == 3
        assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}


class TestModel:
    def test_crf_loss_is_brute_force_nll(self) -> None:
        torch.manual_seed(shift(0))
        vocab = Vocab.build(TOY)
        sents = [TOY[1][:3], TOY[0][:2]]
        batch = collate([encode(vocab, s) for s in sents])
        config = TaggerConfig(
            len(vocab.words),
            len(vocab.chars),
            len(vocab.feats),
            len(vocab.tags),
            word_dim=4,
            char_filters=4,
            hidden=3,
            dropout=0.0,
            word_dropout=0.0,
        )
        model = Tagger(config).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        loss = model(batch)
        emissions = model.emissions(batch)
        Z = len(vocab.tags)
        nll = 0.0
        for b, length in enumerate(batch.lengths.tolist()):

            def score(tags: tuple[int, ...], b: int = b) -> torch.Tensor:
                crf = model.crf
                s = crf.start_transitions[tags[0]] + crf.end_transitions[tags[-1]]
                s = s + sum(emissions[b, t, z] for t, z in enumerate(tags))
                return s + sum(crf.transitions[i, j] for i, j in itertools.pairwise(tags))

            all_scores = torch.stack([score(y) for y in itertools.product(range(Z), repeat=length)])
            gold = tuple(batch.tags[b, :length].tolist())
            nll = nll + torch.logsumexp(all_scores, 0) - score(gold)
            # Viterbi = brute-force argmax.
            best = max(
                itertools.product(range(Z), repeat=length), key=lambda y: float(score(y).detach())
            )
            assert model.predict(batch)[b, :length].tolist() == list(best)
        torch.testing.assert_close(loss, nll / batch.lengths.sum())

    def test_sparsemap_loss_head_is_the_fenchel_young_loss_of_the_layer_distribution(self) -> None:
        from structift.variational import sparsemap, sparsemap_loss

        torch.manual_seed(shift(1))
        vocab = Vocab.build(TOY)
        batch = collate([encode(vocab, s) for s in [TOY[1][:3], TOY[0][:2]]])
        sizes = (len(vocab.words), len(vocab.chars), len(vocab.feats), len(vocab.tags))
        config = TaggerConfig(*sizes, loss="sparsemap", word_dim=4, char_filters=4, hidden=3)
        model = Tagger(config).double().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
        loss = model(batch)
        dist = model.distribution(batch)
        tags = batch.tags.clamp(min=0)
        ref = sparsemap_loss(dist, tags, tol=1e-12).sum() / batch.lengths.sum()
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-9)
        # Its gradient through the emissions is (μ* − φ(y)) / tokens (Danskin).
        emissions = model.emissions(batch).detach().requires_grad_()
        dist = model.crf.distribution(emissions, lengths=batch.lengths)
        (grad,) = torch.autograd.grad(sparsemap_loss(dist, tags, tol=1e-12).sum(), emissions)
        mu = sparsemap(dist, tol=1e-12).marginals.unary.detach()
        torch.testing.assert_close(grad, mu - dist.sufficient_statistics(tags).unary)

    def test_scores_known_unknown(self) -> None:
        vocab = Vocab.build(TOY[:2])
        model = Tagger(
            TaggerConfig(
                len(vocab.words),
                len(vocab.chars),
                len(vocab.feats),
                len(vocab.tags),
                head="softmax",
                neural=False,
            )
        )
        with torch.no_grad():  # tag every token "nn"
            model.feat_weights.weight.zero_()
            model.feat_weights.weight[:, vocab.tags.index("nn")] = 1.0
        items = [encode(vocab, s) for s in TOY]
        scores, preds = evaluate(model, items, 2, torch.device("cpu"))
        gold = [t for s in TOY for _, t in s]
        known = [w.lower() in vocab.words for s in TOY for w, _ in s]
        assert scores.total == len(gold) and scores.known_total == sum(known)
        assert all(t == vocab.tags.index("nn") for p in preds for t in p)
        assert scores.correct == gold.count("nn")
        unknown_nn = sum(1 for g, k in zip(gold, known) if g == "nn" and not k)
        assert scores.unknown == pytest.approx(unknown_nn / (len(gold) - sum(known)))
        assert Scores().accuracy == 0.0

    def _toy_model(self, sents: list | None = None, **kw: object) -> tuple[Tagger, list]:
        sents = TOY if sents is None else sents
        vocab = Vocab.build(sents, min_feature_count=1)
        items = [encode(vocab, s) for s in sents]
        config = TaggerConfig(
            len(vocab.words), len(vocab.chars), len(vocab.feats), len(vocab.tags),
            word_dim=4, char_filters=4, hidden=3, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        return Tagger(config).double(), items

    def test_sparse_lbfgs_reaches_the_penalised_optimum_and_starts_the_joint_model(self) -> None:
        from tagger.training import fit_sparse_lbfgs, sparse_parameters

        torch.manual_seed(shift(1))
        model, items = self._toy_model()
        l2 = 0.5
        fit = fit_sparse_lbfgs(model, items, l2, 200, torch.device("cpu"))
        batch = collate(items)
        tokens = int(batch.lengths.sum())
        params = sparse_parameters(model)
        model.sparse_only = True
        objective = model(batch) + l2 / tokens * sum((p * p).sum() for p in params)
        grads = torch.autograd.grad(objective, params)
        model.sparse_only = False
        value = float(objective.detach())
        torch.testing.assert_close(value, fit["objective"], rtol=1e-9, atol=1e-12)
        assert max(float(g.abs().max()) for g in grads) < 1e-5  # stationary: the optimum
        assert value < math.log(len(model.crf.start_transitions))  # below uniform
        # The joint model begins as the sparse CRF: the neural output layer is zero.
        assert not model.proj.weight.detach().any() and not model.proj.bias.detach().any()
        model.eval()
        sparse_only = model.emissions(batch)
        model.sparse_only = True
        torch.testing.assert_close(model.emissions(batch), sparse_only)

    def test_sparse_lbfgs_l1_reaches_the_exact_l1_optimum_within_the_smoothing(self) -> None:
        """``l1 > 0``: L-BFGS on the smoothed penalty lands within ``l1 * eps`` per weight of
        the exact L1 + L2 optimum, found independently by proximal gradient (FISTA)."""
        from tagger.training import fit_sparse_lbfgs, sparse_parameters

        torch.manual_seed(shift(3))
        model, items = self._toy_model(neural=False)
        l1, l2, eps = 0.3, 0.01, 1e-3
        fit = fit_sparse_lbfgs(model, items, l2, 500, torch.device("cpu"), l1=l1, l1_smoothing=eps)
        batch = collate(items)
        tokens = int(batch.lengths.sum())
        params = sparse_parameters(model)
        n_weights = sum(p.numel() for p in params)

        def smooth_part() -> torch.Tensor:  # mean NLL per token + the L2 term
            return model(batch) + l2 / tokens * sum((p * p).sum() for p in params)

        def exact(ws: list[torch.Tensor]) -> float:
            with torch.no_grad():
                saved = [p.detach().clone() for p in params]
                for p, w in zip(params, ws):
                    p.copy_(w)
                value = float(smooth_part()) + l1 / tokens * sum(float(w.abs().sum()) for w in ws)
                for p, w in zip(params, saved):
                    p.copy_(w)
            return value

        smoothed = smooth_part() + l1 / tokens * sum(
            ((p * p + eps * eps).sqrt() - eps).sum() for p in params
        )
        torch.testing.assert_close(
            float(smoothed.detach()), fit["objective"], rtol=1e-9, atol=1e-12
        )
        grads = torch.autograd.grad(smoothed, params)
        assert max(float(g.abs().max()) for g in grads) < 1e-5  # stationary
        lbfgs = [p.detach().clone() for p in params]

        # The reference: FISTA with backtracking on the exact (non-smooth) objective, from 0.
        with torch.no_grad():
            for p in params:
                p.zero_()
        x = [p.detach().clone() for p in params]
        y, t, step = [w.clone() for w in x], 1.0, 1.0
        for _ in range(1000):
            with torch.no_grad():
                for p, w in zip(params, y):
                    p.copy_(w)
            f_y = smooth_part()
            g_y = torch.autograd.grad(f_y, params)
            while True:
                z = [
                    torch.sign(w - step * g)
                    * (w - step * g).abs().sub(step * l1 / tokens).clamp(min=0)
                    for w, g in zip(y, g_y)
                ]
                with torch.no_grad():
                    for p, w in zip(params, z):
                        p.copy_(w)
                    f_z = float(smooth_part())
                d = [a - b for a, b in zip(z, y)]
                bound = float(f_y.detach()) + sum(float((g * e).sum()) for g, e in zip(g_y, d))
                bound += sum(float((e * e).sum()) for e in d) / (2 * step)
                if f_z <= bound + 1e-15:
                    break
                step /= 2
            t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
            y = [a + (t - 1) / t_next * (a - b) for a, b in zip(z, x)]
            x, t = z, t_next
        best = exact(x)
        # Smoothing changes each |w| by at most eps: the L-BFGS point is near-optimal for the
        # exact objective, and the FISTA point is no better than that margin allows.
        assert exact(lbfgs) <= best + l1 * eps * n_weights / tokens + 1e-9
        assert best <= exact(lbfgs) + 1e-9
        # L1 shrinks: most weights of the exact optimum are exactly 0, and the smoothed
        # solution has them within a few eps of 0.
        zeros = torch.cat([w.flatten() == 0 for w in x])
        assert zeros.float().mean() > 0.5
        near = torch.cat([w.flatten() for w in lbfgs])[zeros].abs()
        assert float(near.max()) < 0.05

    def test_sparse_lbfgs_warm_start_beats_a_cold_start_on_the_same_budget(self) -> None:
        """The refit's stage 1: started from the fit on part of the data, L-BFGS gets further
        on all of it than from zero with the same number of iterations."""
        from tagger.training import fit_sparse_lbfgs, sparse_parameters

        torch.manual_seed(shift(4))
        cpu = torch.device("cpu")
        sents = toy_corpus(40, 4) + TOY
        part, items = self._toy_model(neural=False, sents=sents)
        fit_sparse_lbfgs(part, items[:36], 0.01, 100, cpu, l1=0.1)
        cold, _ = self._toy_model(neural=False, sents=sents)
        from_zero = fit_sparse_lbfgs(cold, items, 0.01, 30, cpu, l1=0.1)
        warm, _ = self._toy_model(neural=False, sents=sents)
        start = sparse_parameters(part)
        from_part = fit_sparse_lbfgs(warm, items, 0.01, 30, cpu, l1=0.1, start=start)
        assert from_part["objective"] < from_zero["objective"]

    def test_observed_pairs_keep_unseen_feature_tag_weights_at_zero(self) -> None:
        torch.manual_seed(shift(2))
        model, items = self._toy_model(observed_pairs=True)
        model.observe_pairs(items)
        seen = {(f, t) for it in items for fs, t in zip(it.feats, it.tags) for f in fs}
        mask = model.pair_mask
        assert {(int(f), int(t)) for f, t in mask[1:].nonzero() + torch.tensor([1, 0])} == {
            (f, t) for f, t in seen if f > 0
        }
        with torch.no_grad():
            model.feat_weights.weight.normal_()
        model.eval()
        batch = collate(items[:1])
        loss = model(batch)
        (grad,) = torch.autograd.grad(loss, model.feat_weights.weight)
        assert float(grad[~mask].abs().max()) == 0.0 and float(grad[mask].abs().max()) > 0
        # Emissions use the masked weights only.
        masked = model.feat_weights.weight * mask
        flat = batch.feats.reshape(-1, batch.feats.shape[-1])
        expected = torch.nn.functional.embedding_bag(flat, masked, mode="sum", padding_idx=0)
        model.sparse_only = True
        torch.testing.assert_close(model.emissions(batch).reshape(expected.shape), expected)

    def test_bad_head(self) -> None:
        with pytest.raises(ValueError, match="head="):
            Tagger(TaggerConfig(3, 3, 3, 2, head="hmm"))


def run(*args: str, cwd: Path, timeout: float = 300, env_extra: dict | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRUCTIFT_DATA": str(SHARED), **(env_extra or {})}
    proc = subprocess.run(
        [*args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def write_conll(path: Path, sents: list) -> None:
    path.write_text("".join("".join(f"{w} X {t}\n" for w, t in s) + "\n" for s in sents))


def toy_corpus(n: int, seed: int) -> list:
    g = seeded(seed)
    dets, nouns, verbs = ["the", "a", "no"], ["dog", "cat", "jury", "city"], ["ran", "said", "sat"]
    sents = []
    for _ in range(n):
        pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
        sents.append(
            [(pick(dets), "DET"), (pick(nouns), "NOUN"), (pick(verbs), "VERB"), (".", ".")]
        )
    return sents


class TestEndToEnd:
    @pytest.mark.skipif(not HAVE_SHARED, reason="the shared Brown corpus folder is not present")
    def test_brown_smoke_train_resume_tag(self, tmp_path: Path) -> None:
        py = sys.executable
        out = run(
            py,
            str(SCRIPT),
            "--smoke",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path),
            cwd=tmp_path,
        )
        assert "180 training / 20 dev (end of the training data) / 40 test sentences" in out
        assert "structift layers.CRF (this run" in out and "softmax ablation (this run" in out
        assert "0.9476" in out and "(reference)" in out
        for name in ("crf.pt", "softmax.pt", "learning_curve.png"):
            assert (tmp_path / name).stat().st_size > 0
        assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
        out = run(
            py,
            str(SCRIPT),
            "--smoke",
            "--epochs",
            "2",
            "--head",
            "crf",
            "--resume",
            "--no-progress",
            "--out",
            str(tmp_path),
            cwd=tmp_path,
        )
        assert "resumed from" in out and "after epoch 1" in out
        assert "[crf] epoch 2:" in out and "[crf] epoch 1:" not in out
        state = torch.load(tmp_path / "crf.pt", weights_only=True)
        assert state["history"]["epoch"] == [0, 1, 2]  # epoch 0: the L-BFGS sparse CRF
        out = run(
            py,
            str(SCRIPT),
            "--tag",
            "The jury said it .",
            "--checkpoint",
            str(tmp_path / "crf.pt"),
            cwd=tmp_path,
        )
        tokens = out.split()
        assert [t.rsplit("/", 1)[0] for t in tokens] == ["The", "jury", "said", "it", "."]
        assert all(t.rsplit("/", 1)[1] in state["vocab"]["tags"] for t in tokens)
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), "--tag", "hi", "--checkpoint", str(tmp_path / "x.pt")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode != 0 and "does not exist" in proc.stderr

    def test_conll_files_learn_a_toy_language(self, tmp_path: Path) -> None:
        write_conll(tmp_path / "train.conll", toy_corpus(200, 0))
        write_conll(tmp_path / "test.conll", toy_corpus(40, 1))
        out = run(
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--head",
            "crf",
            "--no-progress",
            "--lr",
            "0.05",
            "--train",
            str(tmp_path / "train.conll"),
            "--test",
            str(tmp_path / "test.conll"),
            "--out",
            str(tmp_path / "run"),
            cwd=tmp_path,
        )
        assert "train.conll / test.conll" in out and "(reference)" not in out
        row = next(line for line in out.splitlines() if line.startswith("structift"))
        assert float(row.split()[-5]) > 0.95  # overall accuracy

    def test_sparse_init_lbfgs_with_observed_pairs_runs_end_to_end(self, tmp_path: Path) -> None:
        write_conll(tmp_path / "train.conll", toy_corpus(200, 0))
        write_conll(tmp_path / "test.conll", toy_corpus(40, 1))
        out = run(
            sys.executable, str(SCRIPT), "--smoke", "--head", "crf", "--no-progress",
            "--sparse-init", "lbfgs", "--observed-pairs", "--l2", "0.1",
            "--lbfgs-iterations", "30", "--train", str(tmp_path / "train.conll"),
            "--test", str(tmp_path / "test.conll"), "--out", str(tmp_path / "run"), cwd=tmp_path,
        )  # fmt: skip
        assert "sparse CRF by L-BFGS" in out and "refit: sparse CRF by L-BFGS" in out
        row = next(line for line in out.splitlines() if line.startswith("structift"))
        assert float(row.split()[-5]) > 0.95

    def test_torchrun_two_processes_gloo(self, tmp_path: Path) -> None:
        write_conll(tmp_path / "train.conll", toy_corpus(120, 0))
        write_conll(tmp_path / "test.conll", toy_corpus(20, 1))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = run(
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(SCRIPT),
            "--smoke",
            "--epochs",
            "1",
            "--head",
            "crf",
            "--threads",
            "1",
            "--no-progress",
            "--train",
            str(tmp_path / "train.conll"),
            "--test",
            str(tmp_path / "test.conll"),
            "--out",
            str(tmp_path / "run"),
            cwd=tmp_path,
        )
        assert "2 process(es) on cpu" in out
        assert out.count("structift layers.CRF (this run") == 1  # rank 0 reports alone
        assert (tmp_path / "run" / "crf.pt").is_file()


class TestSpans:
    def test_conlleval_chunks(self) -> None:
        from tagger.spans import chunks

        assert chunks(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
        # conlleval: an I after O (or after another type) starts a chunk; B splits same types.
        assert chunks(["I-PER", "I-PER", "B-PER", "I-LOC"]) == {
            ("PER", 0, 1),
            ("PER", 2, 2),
            ("LOC", 3, 3),
        }
        assert chunks(["B-X", "L-X", "U-Y", "O", "U-X"]) == {("X", 0, 1), ("Y", 2, 2), ("X", 4, 4)}
        assert chunks(["B-X", "M-X", "E-X", "S-Y"]) == {("X", 0, 2), ("Y", 3, 3)}
        assert chunks(["O", "O"]) == set()

    def test_span_scores(self) -> None:
        from tagger.spans import SpanScores

        s = SpanScores()
        s.add(["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-ORG"])
        s.add(["O"], ["B-LOC"])
        assert (s.correct, s.guessed, s.gold) == (1, 3, 2)
        assert s.precision == pytest.approx(1 / 3) and s.recall == pytest.approx(1 / 2)
        assert s.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
        assert SpanScores().f1 == 0.0

    def test_detect_scheme(self) -> None:
        from tagger.spans import detect_scheme

        tags = ["B-PER", "I-PER", "O"]
        assert detect_scheme(tags, [["B-PER", "I-PER", "O"], ["O"]]) == "BIO"
        assert detect_scheme(tags, [["I-PER", "I-PER", "B-PER"]]) == "IOB1"
        assert detect_scheme(["B-X", "I-X", "L-X", "U-X", "O"], [["U-X", "B-X", "L-X"]]) == "BIOUL"
        assert detect_scheme(["B-X", "E-X", "S-X"], [["S-X", "B-X", "E-X"]]) == "BMES"
        assert detect_scheme(["nn", "vb"], [["nn", "vb"]]) is None  # part-of-speech tags
        assert detect_scheme(["B-PER", "O", "PER"], [["O"]]) is None  # a bare label
        # BIO letters but sequences well formed under neither BIO nor IOB1: no constraints.
        assert detect_scheme(tags, [["O", "I-PER"], ["I-PER", "I-PER", "B-PER", "B-PER"]]) == (
            "IOB1"
        )
        # A B at the start is IOB1-illegal, an I after O BIO-illegal: plain labels then.
        assert detect_scheme(tags, [["B-PER", "O"], ["O", "O", "I-PER"]]) is None


def _bio_corpus(n: int, seed: int) -> list:
    """Toy named entities: 'mr X' is a PER span, 'in Y city' a LOC span (BIO)."""
    g = seeded(seed)
    names, places = ["smith", "jones", "brown"], ["paris", "rome", "oslo"]
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    sents = []
    for _ in range(n):
        person = [("mr", "B-PER"), (pick(names), "I-PER")]
        place = [(pick(places), "B-LOC"), ("city", "I-LOC")]
        sents.append([*person, ("went", "O"), ("to", "O"), *place, (".", "O")])
    return sents


class TestCommandLine:
    def test_help_shows_defaults(self) -> None:
        out = " ".join(run(sys.executable, str(SCRIPT), "--help", cwd=ROOT).split())
        assert "(default: 32)" in out and "(default: 0.1)" in out and "(default: 650)" in out

    def test_span_tags_get_constraints_and_span_scores(self, tmp_path: Path) -> None:
        write_conll(tmp_path / "train.conll", _bio_corpus(150, 0))
        write_conll(tmp_path / "test.conll", _bio_corpus(30, 1))
        out = run(
            sys.executable, str(SCRIPT), "--smoke", "--head", "crf", "--no-progress",
            "--lr", "0.05", "--train", str(tmp_path / "train.conll"),
            "--test", str(tmp_path / "test.conll"), "--out", str(tmp_path / "run"), cwd=tmp_path,
        )  # fmt: skip
        assert "(BIO spans)" in out and "gold BIO spans (conlleval), constraints applied" in out
        assert "dev span F1" in out and "span F1" in out
        header = next(line for line in out.splitlines() if line.startswith("model"))
        row = next(line for line in out.splitlines() if line.startswith("structift"))
        cells = row.split()
        assert header.split()[-4:] == ["P", "span", "F1", "time"] or "span F1" in header
        assert float(cells[-3]) > 0.9  # span F1 on the toy language
        assert cells[-6] == "-"  # no unknown words in the test file: "-", not 0.0000
        state = torch.load(tmp_path / "run" / "crf.pt", weights_only=True)
        assert state["config"]["constraints"]  # the checkpoint keeps them for --tag

    def test_resume_without_checkpoint_warns(self, tmp_path: Path) -> None:
        write_conll(tmp_path / "train.conll", toy_corpus(60, 0))
        write_conll(tmp_path / "test.conll", toy_corpus(10, 1))
        proc = subprocess.run(
            [
                sys.executable, str(SCRIPT), "--smoke", "--epochs", "1", "--head", "crf",
                "--resume", "--no-progress", "--train", str(tmp_path / "train.conll"),
                "--test", str(tmp_path / "test.conll"), "--out", str(tmp_path / "run"),
            ],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "no checkpoint at" in proc.stderr and "training from scratch" in proc.stderr

    def test_resume_continues_the_schedule(self, tmp_path: Path) -> None:
        """2 epochs, then 1 more on resume, equals 3 epochs in one go (schedule, data, RNG)."""
        write_conll(tmp_path / "train.conll", toy_corpus(80, 0))
        write_conll(tmp_path / "test.conll", toy_corpus(10, 1))
        common = [
            "--head", "crf", "--no-progress", "--min-count", "1", "--hidden", "4",
            "--word-dim", "4", "--train", str(tmp_path / "train.conll"),
            "--test", str(tmp_path / "test.conll"), "--threads", "1", "--patience", "9",
        ]  # fmt: skip
        run(sys.executable, str(SCRIPT), *common, "--epochs", "3", "--out", "a", cwd=tmp_path)
        run(sys.executable, str(SCRIPT), *common, "--epochs", "2", "--out", "b", cwd=tmp_path)
        out = run(
            sys.executable, str(SCRIPT), *common, "--epochs", "3", "--resume", "--out", "b",
            cwd=tmp_path,
        )  # fmt: skip
        assert "after epoch 2" in out
        a = torch.load(tmp_path / "a" / "crf.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "crf.pt", weights_only=True)
        assert a["history"]["epoch"] == b["history"]["epoch"] == [0, 1, 2, 3]  # 0: L-BFGS
        assert a["history"]["train_loss"] == pytest.approx(b["history"]["train_loss"], rel=1e-6)
        for k, v in a["model"].items():
            torch.testing.assert_close(v, b["model"][k], rtol=1e-5, atol=1e-6)

    def test_learning_rate_is_a_function_of_the_step(self) -> None:
        from tagger.training import learning_rate

        assert learning_rate(1.0, 0, 100) == 1.0
        assert learning_rate(1.0, 100, 100) == pytest.approx(0.1)
        assert learning_rate(2.0, 50, 100) == pytest.approx(2.0 * 0.1**0.5)
