"""The HMM language-model example: Kneser-Ney normalization and a hand-computed case, the
file split rule, the models' log p(x) against brute force, and a --smoke run end to end."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "hmm_lm.py"
sys.path.insert(0, str(ROOT / "examples"))

from hmm_lm.data import Vocab, batches, frequency_clusters, split_of  # noqa: E402
from hmm_lm.kn import KneserNey, discounts  # noqa: E402
from hmm_lm.model import HMMLM, ModelConfig  # noqa: E402

# Absolute: CI may give a path relative to the repository, and end-to-end runs use other cwds.
SHARED = Path(os.environ.get("STRUCTIFT_DATA", "/work/shared/data")).resolve()
HAVE_SHARED = (SHARED / "brown" / "cats.txt").is_file()


def toy_corpus(n: int, V: int, seed: int) -> list[list[int]]:
    """Random sentences over ids ``0 .. V-2``, each ending with ``</s> = V - 1``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 7, (1,), generator=g))
        # A skewed distribution so that counts 1..4 all occur (real discounts).
        words = torch.multinomial(torch.arange(V - 1, 0, -1.0) ** 2, length, True, generator=g)
        out.append([*words.tolist(), V - 1])
    return out


class TestKneserNey:
    def test_hand_computed_bigram(self) -> None:
        # a = 0, b = 1, </s> = 2; "<s> a b </s>", "<s> a </s>"; tiny data: D = 0.5, 1, 1.5.
        lm = KneserNey([[0, 1, 2], [0, 2]], vocab_size=3, order=2)
        assert lm.discount[1] == lm.discount[2] == (0.5, 1.0, 1.5)
        # Continuation counts: a <- {<s>}, b <- {a}, </s> <- {a, b}: total 4, mass 2.
        p1 = {0: 0.5 / 4 + 2 / 4 / 3, 1: 0.5 / 4 + 2 / 4 / 3, 2: 1 / 4 + 2 / 4 / 3}
        assert sum(p1.values()) == pytest.approx(1.0)
        bos = lm.bos
        assert lm.prob([bos], 0) == pytest.approx(1 / 2 + 1 / 2 * p1[0])  # a(<s> a) = 2, d = 1
        assert lm.prob([0], 1) == pytest.approx(0.5 / 2 + 0.5 * p1[1])
        assert lm.prob([0], 0) == pytest.approx(0.5 * p1[0])
        assert lm.prob([1], 2) == pytest.approx(0.5 / 1 + 0.5 * p1[2])
        assert lm.prob([2], 1) == pytest.approx(p1[1])  # unseen context: back off fully
        expected = math.log(lm.prob([bos], 0)) + math.log(lm.prob([0], 2))
        assert lm.log_prob_sentence([0, 2]) == pytest.approx(expected)

    def test_discounts_formula(self) -> None:
        counts = [1] * 10 + [2] * 5 + [3] * 3 + [4] * 2 + [7]
        d1, d2, d3 = discounts(counts)  # Y = 10 / 20
        assert (d1, d2, d3) == pytest.approx((1 - 0.5, 2 - 1.5 * 3 / 5, 3 - 2 * 2 / 3))
        assert discounts([1, 1, 2]) == (0.5, 1.0, 1.5)  # missing count-of-counts

    @pytest.mark.parametrize("order", [1, 2, 3, 5])
    def test_sums_to_one_over_the_vocabulary(self, order: int) -> None:
        V = 12
        train = toy_corpus(300, V, seed=0)
        lm = KneserNey(train, V, order)
        bos = lm.bos
        seen = train[0][:4]
        contexts = [[bos], [bos, *seen[:2]], seen, [5, 5, 5, 5], [bos, 11], []]
        for context in contexts:
            total = sum(lm.prob(context, w) for w in range(V))
            assert total == pytest.approx(1.0, abs=1e-12), (order, context)
            assert all(lm.prob(context, w) > 0 for w in range(V))

    def test_higher_order_fits_training_data_better(self) -> None:
        train = toy_corpus(200, 8, seed=1)
        ppl = [KneserNey(train, 8, n).perplexity(train) for n in (1, 2, 3)]
        assert ppl[0] > ppl[1] > ppl[2]

    def test_bad_input(self) -> None:
        with pytest.raises(ValueError, match="order"):
            KneserNey([[0]], 2, 0)
        with pytest.raises(ValueError, match="word ids"):
            KneserNey([[0, 5]], 2, 2)


class TestData:
    def test_split_rule(self) -> None:
        names = [split_of(i) for i in range(500)]
        assert [i for i, s in enumerate(names) if s == "test"] == list(range(9, 500, 10))
        assert [i for i, s in enumerate(names) if s == "valid"] == list(range(10, 500, 10))
        assert names[0] == "train" and names.count("train") == 401
        assert names[8:12] == ["train", "test", "valid", "train"]

    def test_vocab_and_encoding(self) -> None:
        vocab = Vocab.build([["b", "a", "a"], ["c", "b", "a"]], size=2)
        assert vocab.words == ["a", "b", "<unk>", "</s>"]
        assert vocab.encode(["a", "zzz", "b"]) == [0, 2, 1, 3]

    def test_batches_cover_every_sequence_once(self) -> None:
        seqs = [[1] * n for n in (3, 1, 4, 1, 5, 9, 2, 6)]
        out = batches(seqs, max_tokens=10, shuffle=True, generator=torch.Generator().manual_seed(0))
        lengths = sorted(int(n) for _, lens in out for n in lens)
        assert lengths == sorted(map(len, seqs))
        for x, lens in out:
            assert x.numel() <= max(10, x.shape[1])
            assert ((x == -100) == (torch.arange(x.shape[1]) >= lens[:, None])).all()

    def test_frequency_clusters(self) -> None:
        assert frequency_clusters(7, 3).tolist() == [0, 1, 2, 0, 1, 2, 0]
        with pytest.raises(ValueError, match="num_clusters"):
            frequency_clusters(3, 4)


def brute_log_px(init: torch.Tensor, trans: torch.Tensor, emit: torch.Tensor, x: list[int]):
    """log p(x) by enumerating every hidden path (float64)."""
    li, lt, le = (torch.log_softmax(t.double(), -1) for t in (init, trans, emit))
    Z = li.shape[0]
    scores = []
    for z in itertools.product(range(Z), repeat=len(x)):
        s = li[z[0]] + sum(lt[a, b] for a, b in itertools.pairwise(z))
        scores.append(s + sum(le[zt, xt] for zt, xt in zip(z, x)))
    return torch.logsumexp(torch.stack(scores), 0)


class TestModel:
    @pytest.mark.parametrize("kind", ["dense", "lowrank", "blocked", "blocked-lowrank"])
    @pytest.mark.parametrize("neural", [False, True])
    def test_log_px_matches_brute_force(self, kind: str, neural: bool) -> None:
        torch.manual_seed(0)
        V, Z = 6, 4
        config = ModelConfig(kind, Z, V, rank=2, clusters=2, neural=neural, dim=8)
        clusters = frequency_clusters(V, 2)
        model = HMMLM(config, torch.log_softmax(torch.randn(V), 0), clusters).double().eval()
        x = torch.tensor([[0, 3, 5], [2, 1, -100]])
        lengths = torch.tensor([3, 2])
        got = model(x, lengths)
        init, trans, emit = model.hmm_parameters()
        import structift as st

        if kind.endswith("lowrank"):
            trans = st.LowRankTransition(*trans).log_probs()
        if kind.startswith("blocked"):  # blocks [M, S, W] -> [Z, V] with -inf off-cluster
            emit = st.BlockedEmission.from_blocks(emit, clusters).log_probs()
        for b, n in enumerate(lengths.tolist()):
            expected = brute_log_px(init, trans, emit, x[b, :n].tolist())
            torch.testing.assert_close(got[b], expected.to(got.dtype))

    def test_state_dropout_trains_on_fewer_states(self) -> None:
        torch.manual_seed(0)
        config = ModelConfig("lowrank", 8, 5, rank=2, dropout=0.5)
        model = HMMLM(config, torch.zeros(5))
        x, lengths = torch.tensor([[0, 1, 4]]), torch.tensor([3])
        g = torch.Generator().manual_seed(0)
        train = model(x, lengths, g)
        model.eval()
        assert not torch.allclose(train, model(x, lengths))  # eval uses every state
        model.train()
        (-train.sum()).backward()
        assert torch.isfinite(model.u.grad).all() and (model.u.grad == 0).any()

    def test_bad_config(self) -> None:
        with pytest.raises(ValueError, match="rank"):
            HMMLM(ModelConfig("lowrank", 4, 3, rank=8), torch.zeros(3))
        with pytest.raises(ValueError, match="blocked"):
            HMMLM(ModelConfig("blocked", 4, 3, clusters=3), torch.zeros(3), torch.zeros(3).long())
        with pytest.raises(ValueError, match="blocked-lowrank needs 1 <= rank"):
            HMMLM(ModelConfig("blocked-lowrank", 4, 3, clusters=2), torch.zeros(3))

    def test_blocked_low_rank_dropout_keeps_states_per_cluster(self) -> None:
        torch.manual_seed(0)
        config = ModelConfig("blocked-lowrank", 8, 6, rank=2, clusters=2, dropout=0.5)
        model = HMMLM(config, torch.zeros(6), frequency_clusters(6, 2))
        x, lengths = torch.tensor([[0, 1, 4]]), torch.tensor([3])
        train = model(x, lengths, torch.Generator().manual_seed(0))
        model.eval()
        assert not torch.allclose(train, model(x, lengths))  # eval uses every state
        model.train()
        (-train.sum()).backward()
        assert torch.isfinite(model.u.grad).all() and (model.u.grad == 0).any()
        assert model.emission.shape == (2, 4, 3)  # [M, S, W]: no [Z, V] parameter


@pytest.mark.skipif(not HAVE_SHARED, reason="the shared Brown corpus folder is not present")
class TestEndToEnd:
    def run(self, *args: str, cwd: Path) -> str:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STRUCTIFT_DATA": str(SHARED)}
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True,
            text=True, timeout=300, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    def test_smoke_kn_hmm_table_and_plot(self, tmp_path: Path) -> None:
        common = ["--smoke", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
        self.run("--model", "kn3", *common, cwd=tmp_path)
        out = self.run("--model", "lowrank", *common, cwd=tmp_path)
        assert "test i % 10 == 9, valid i % 10 == 0 and i > 0, train the rest" in out
        assert "epoch 1/1: train ppl" in out
        table = (tmp_path / "results.md").read_text()
        assert "| model | states | rank | parameters | valid ppl | test ppl |" in table
        rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert [r["name"] for r in rows] == ["kn3", "lowrank-Z16-r8"]
        for r in rows:
            assert math.isfinite(r["valid ppl"]) and math.isfinite(r["test ppl"])
            assert 1 < r["test ppl"] < 302  # better than uniform over V = 302
        assert (tmp_path / "lowrank-Z16-r8.pt").stat().st_size > 0
        self.run("--plot", "--out", str(tmp_path), cwd=tmp_path)
        assert (tmp_path / "ppl_vs_states.png").read_bytes()[:4] == b"\x89PNG"
