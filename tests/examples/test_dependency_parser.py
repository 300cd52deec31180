"""The dependency-parser example: metrics on hand-made trees, features, the arc scorer and the
head-selection loss, the tree-CRF path (against a stand-in while structift has no
DependencyCRF), and end-to-end ``--smoke`` runs (train, resume, parse)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import structift
from tests.seeding import seeded, shift

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "dependency_parser.py"
sys.path.insert(0, str(ROOT / "examples"))

from parser.features import Vocab, collate, encode  # noqa: E402
from parser.metrics import AttachmentScores, has_cycle, is_well_formed, n_roots  # noqa: E402
from parser.model import Parser, ParserConfig, word_mask  # noqa: E402

# Absolute: CI may give a path relative to the repository, and end-to-end runs use other cwds.
SHARED = Path(os.environ.get("STRUCTIFT_DATA", "/work/shared/data")).resolve()
HAVE_SHARED = all(
    (SHARED / "turkish-treebank" / f).is_file() for f in ("web.conllu", "wiki.conllu")
)
HAVE_CRF = hasattr(structift, "DependencyCRF")

SENTS = [
    (["Ali", "okula", "gitti", "."], [3, 3, 0, 3], ["PROPN", "NOUN", "VERB", "PUNCT"]),
    (["Ben", "geldim"], [2, 0], ["PRON", "VERB"]),
    (["Bu", "kitap", "çok", "güzel", "!"], [2, 4, 4, 0, 4], ["DET", "NOUN", "ADV", "ADJ", "PUNCT"]),
]


class TestMetrics:
    def test_uas_with_and_without_punctuation(self) -> None:
        s = AttachmentScores()
        # gold 3 3 0 3; predicted: word 1 wrong, the punctuation mark wrong.
        s.add([3, 3, 0, 3], [2, 3, 0, 1], [False, False, False, True])
        assert (s.words, s.correct, s.words_no_punct, s.correct_no_punct) == (4, 2, 3, 2)
        assert s.uas == pytest.approx(0.5) and s.uas_no_punct == pytest.approx(2 / 3)
        s.add([2, 0], [2, 0], [False, False])
        assert s.uas == pytest.approx(4 / 6) and s.uas_no_punct == pytest.approx(4 / 5)

    def test_root_accuracy_and_well_formed_share(self) -> None:
        s = AttachmentScores()
        s.add([2, 0, 2], [2, 0, 2], [False] * 3)  # right tree
        s.add([2, 0, 2], [0, 0, 2], [False] * 3)  # two roots: gold root found, not a tree
        s.add([2, 0, 2], [2, 3, 0], [False] * 3)  # wrong root word, a tree
        s.add([2, 0, 2], [3, 1, 2], [False] * 3)  # no root, a cycle 1 -> 3 -> 2 -> 1
        assert s.sentences == 4
        assert s.root_accuracy == pytest.approx(2 / 4)
        assert s.well_formed_share == pytest.approx(2 / 4)

    @pytest.mark.parametrize(
        ("heads", "roots", "cycle", "ok"),
        [
            ([0], 1, False, True),
            ([2, 0, 2, 3], 1, False, True),
            ([0, 0], 2, False, False),  # two roots
            ([2, 1], 0, True, False),  # 1 <-> 2
            ([0, 3, 2], 1, True, False),  # a root, and a cycle beside it
            ([0, 3, 4, 2], 1, True, False),  # a 3-cycle
            ([2, 3, 1, 0], 1, True, False),  # the root word does not save the cycle
            ([3, 3, 0, 3, 4], 1, False, True),
        ],
    )
    def test_roots_cycles_well_formed(
        self, heads: list[int], roots: int, cycle: bool, ok: bool
    ) -> None:
        assert n_roots(heads) == roots
        assert has_cycle(heads) is cycle
        assert is_well_formed(heads) is ok

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match=r"heads\[1\]=5 \(head of word 2\) is outside 0..2"):
            has_cycle([0, 5])
        with pytest.raises(ValueError, match="lengths 2, 1 and 2"):
            AttachmentScores().add([0, 1], [0], [False, False])


def tiny_model(model: str = "local") -> tuple[Parser, Vocab]:
    vocab = Vocab.build([w for w, _, _ in SENTS], min_count=1)
    config = ParserConfig(
        len(vocab.words), len(vocab.chars), len(vocab.suffixes), model=model,
        word_dim=4, char_dim=3, char_filters=4, suffix_dim=3, hidden=5, layers=1, arc_dim=4,
        dropout=0.0, word_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(shift(0))
    parser = Parser(config).double().eval()
    with torch.no_grad():
        for p in parser.parameters():  # U = u = 0 at init: random values test the scorer
            p.normal_()
    return parser, vocab


def tiny_batch(vocab: Vocab, sents: list = SENTS):
    return collate([encode(vocab, w, h, u) for w, h, u in sents])


class TestFeaturesAndModel:
    def test_encode_puts_root_first(self) -> None:
        vocab = Vocab.build([w for w, _, _ in SENTS], min_count=1)
        e = encode(vocab, *SENTS[0])
        assert e.words[0] == vocab.words["<root>"] and len(e.words) == 5
        assert e.heads == [-1, 3, 3, 0, 3] and e.punct == [False, False, False, False, True]
        assert "3:ula" in vocab.suffixes and vocab.suffixes["3:ula"] in e.suffixes[2]
        new = encode(vocab, ["Zzz"])
        assert new.words[1] == vocab.words["<unk>"] and new.heads == [-1, -1]
        b = tiny_batch(vocab)
        assert b.words.shape == (3, 6) and b.lengths.tolist() == [4, 2, 5]
        assert b.heads[1].tolist() == [-1, 2, 0, -1, -1, -1]
        assert word_mask(b.lengths, 6)[1].tolist() == [False, True, True, False, False, False]

    def test_arc_scores_are_biaffine_and_padding_invariant(self) -> None:
        parser, vocab = tiny_model()
        batch = tiny_batch(vocab)
        scores = parser.arc_scores(batch)
        assert scores.shape == (3, 6, 6)
        h = parser.encode(batch)
        a, d = parser.head_mlp(h), parser.dep_mlp(h)
        b, i, j = 2, 4, 1  # head 4 -> modifier 1
        expected = a[b, i] @ parser.U @ d[b, j] + a[b, i] @ parser.u
        torch.testing.assert_close(scores[b, i, j], expected)
        alone = parser.arc_scores(tiny_batch(vocab, [SENTS[1]]))
        torch.testing.assert_close(scores[1, :3, :3], alone[0])

    def test_local_loss_and_greedy_decode_by_hand(self) -> None:
        parser, vocab = tiny_model()
        batch = tiny_batch(vocab)
        scores = parser.arc_scores(batch)
        nll, best = torch.zeros((), dtype=torch.float64), []
        for b, (_, heads, _) in enumerate(SENTS):
            n = len(heads)
            for m in range(1, n + 1):
                cand = [h for h in range(n + 1) if h != m]  # ROOT or another word
                logits = scores[b, cand, m]
                nll = nll - (logits[cand.index(heads[m - 1])] - torch.logsumexp(logits, 0))
                best.append(cand[int(logits.argmax())])
        torch.testing.assert_close(parser(batch), nll / 11)
        pred = parser.decode(batch, "greedy")
        mask = word_mask(batch.lengths, pred.shape[1])
        assert pred[mask].tolist() == best and (pred[~mask] == -1).all()
        with pytest.raises(ValueError, match="decoder='viterbi'"):
            parser.decode(batch, "viterbi")

    def test_crf_without_dependency_crf_says_what_to_do(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(structift, "DependencyCRF", raising=False)
        parser, vocab = tiny_model("crf")
        with pytest.raises(RuntimeError, match=r"structift.DependencyCRF.*--model local"):
            parser(tiny_batch(vocab))
        with pytest.raises(RuntimeError, match="DependencyCRF"):
            tiny_model("local")[0].decode(tiny_batch(vocab), "mst")
        with pytest.raises(ValueError, match="model='tree'"):
            tiny_model("tree")


class StandInDependencyCRF:
    """A stand-in with `structift.DependencyCRF`'s API for the example's CRF path.

    ``log_partition`` is the single-root matrix-tree theorem (Koo et al. 2007) in float64;
    ``argmax`` is each word's best head (not a tree: this only checks the plumbing). The
    projective flag is accepted and ignored.
    """

    def __init__(self, arc_scores, lengths=None, projective=False, multi_root=False) -> None:
        self.scores, self.lengths = arc_scores, lengths

    @property
    def log_partition(self) -> torch.Tensor:
        out = []
        for b, n in enumerate(self.lengths.tolist()):
            s = self.scores[b, : n + 1, : n + 1].double()
            shift_ = s.max().detach()
            w = torch.exp(s - shift_) * (1 - torch.eye(n + 1, dtype=s.dtype))
            lap = torch.diag(w[1:, 1:].sum(0)) - w[1:, 1:]
            lap = torch.cat([w[0:1, 1:], lap[1:]], dim=0)  # the root row (single root)
            out.append(torch.logdet(lap) + n * shift_)
        return torch.stack(out).to(self.scores.dtype)

    def log_prob(self, heads: torch.Tensor) -> torch.Tensor:
        mask = word_mask(self.lengths, heads.shape[1])
        gathered = self.scores.gather(1, heads.clamp(min=0).unsqueeze(1)).squeeze(1)
        return (gathered * mask).sum(-1) - self.log_partition

    @property
    def argmax(self) -> torch.Tensor:
        T = self.scores.shape[-1]
        s = self.scores.masked_fill(torch.eye(T, dtype=torch.bool), float("-inf"))
        heads_ok = torch.arange(T) <= self.lengths.unsqueeze(1)
        s = s.masked_fill(~heads_ok.unsqueeze(-1), float("-inf"))
        return torch.where(word_mask(self.lengths, T), s.argmax(1), -1)


class TestCrfPath:
    def test_stand_in_is_the_tree_distribution(self) -> None:
        """The stand-in's log Z sums exp(score) over every single-root tree (n = 3)."""
        import itertools

        g = seeded(1)
        scores = torch.randn(1, 4, 4, generator=g, dtype=torch.float64)
        dist = StandInDependencyCRF(scores, torch.tensor([3]))
        total = []
        for heads in itertools.product(range(4), repeat=3):
            hs = [-1, *heads]
            if is_well_formed(list(heads)) and all(h != m for m, h in enumerate(hs) if m):
                total.append(dist.log_prob(torch.tensor([hs])))
        assert len(total) == 9  # 3 * 3: single-root trees over 3 words (root word, then 3)
        torch.testing.assert_close(
            torch.logsumexp(torch.cat(total), 0), torch.zeros((), dtype=torch.float64)
        )

    def test_crf_loss_and_mst_decode_go_through_dependency_crf(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(structift, "DependencyCRF", StandInDependencyCRF, raising=False)
        parser, vocab = tiny_model("crf")
        batch = tiny_batch(vocab)
        scores = parser.arc_scores(batch)
        dist = StandInDependencyCRF(scores, batch.lengths)
        torch.testing.assert_close(parser(batch), -dist.log_prob(batch.heads).sum() / 11)
        assert parser.decode(batch, "mst").tolist() == dist.argmax.tolist()

    @pytest.mark.skipif(not HAVE_SHARED, reason="the shared Turkish treebank is not present")
    def test_smoke_crf_and_all_models(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
    ) -> None:
        if not HAVE_CRF:
            monkeypatch.setattr(structift, "DependencyCRF", StandInDependencyCRF, raising=False)
        monkeypatch.setenv("STRUCTIFT_DATA", str(SHARED))
        import dependency_parser

        argv = ["--smoke", "--no-progress", "--threads", "1", "--out", str(tmp_path)]
        dependency_parser.main(argv)  # the default: --model crf
        out = capsys.readouterr().out
        assert "| non-projective tree CRF | mst |" in out and "| local" not in out
        dependency_parser.main([*argv, "--model", "all"])
        out = capsys.readouterr().out
        for row in ("non-projective tree CRF | mst", "projective tree CRF | eisner",
                    "local head selection | greedy", "local head selection | mst"):  # fmt: skip
            assert f"| {row} | 0." in out  # scored, not "-"
        for name in ("crf.pt", "projective.pt", "local.pt", "results.md", "learning_curve.png"):
            assert (tmp_path / name).is_file()


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STRUCTIFT_DATA": str(SHARED)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.skipif(not HAVE_SHARED, reason="the shared Turkish treebank is not present")
class TestEndToEnd:
    def test_smoke_train_resume_parse(self, tmp_path: Path) -> None:
        common = ["--smoke", "--model", "local", "--no-progress", "--threads", "1"]
        out = run(*common, "--out", str(tmp_path), cwd=tmp_path).stdout
        assert "80 train / 20 dev / 20 test sentences" in out
        assert "| local head selection | greedy |" in out
        assert "| model | decoder | dev UAS | test UAS | UAS w/o punct | root acc." in out
        table = (tmp_path / "results.md").read_text()
        assert table.strip() in out and "|---|" in table
        assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "local.pt").stat().st_size > 0
        row = next(line for line in out.splitlines() if "| greedy |" in line)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(0.0 <= float(c) <= 1.0 for c in cells[2:7])
        out = run(*common, "--epochs", "2", "--resume", "--out", str(tmp_path), cwd=tmp_path)
        assert "resumed from" in out.stdout and "after epoch 1" in out.stdout
        assert "[local] epoch 2:" in out.stdout and "[local] epoch 1:" not in out.stdout
        state = torch.load(tmp_path / "local.pt", weights_only=True)
        assert state["history"]["epoch"] == [1, 2]
        out = run("--parse", "Ali okula gitti .", "--model", "local", "--out", str(tmp_path),
                  cwd=tmp_path).stdout  # fmt: skip
        lines = [line.split("\t") for line in out.strip().splitlines()]
        assert [c[1] for c in lines] == ["Ali", "okula", "gitti", "."]
        assert all(0 <= int(c[2]) <= 4 and int(c[2]) != i for i, c in enumerate(lines, 1))

    def test_missing_checkpoint_and_missing_crf(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import dependency_parser

        with pytest.raises(FileNotFoundError, match="does not exist"):
            dependency_parser.main(["--parse", "hi", "--checkpoint", str(tmp_path / "x.pt")])
        monkeypatch.delattr(structift, "DependencyCRF", raising=False)
        monkeypatch.setenv("STRUCTIFT_DATA", str(SHARED))
        for model in ("crf", "all"):
            with pytest.raises(SystemExit, match=r"needs structift.DependencyCRF.*--model local"):
                dependency_parser.main(["--smoke", "--model", model, "--out", str(tmp_path)])


def toy_treebank(path: Path, n: int, seed: int) -> Path:
    """Sentences ``det noun verb .`` or ``noun verb`` with their (fixed) trees, as CoNLL-U."""
    g = seeded(seed)
    dets, nouns, verbs = ["bir", "bu", "şu"], ["kedi", "köpek", "ev", "su"], ["geldi", "gitti"]

    def pick(xs: list[str]) -> str:
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    lines = []
    for _ in range(n):
        if bool(torch.rand((), generator=g) < 0.5):
            sent = [(pick(dets), "DET", 2), (pick(nouns), "NOUN", 3), (pick(verbs), "VERB", 0),
                    (".", "PUNCT", 3)]  # fmt: skip
        else:
            sent = [(pick(nouns), "NOUN", 2), (pick(verbs), "VERB", 0)]
        for i, (form, upos, head) in enumerate(sent, start=1):
            lines.append(f"{i}\t{form}\t_\t{upos}\t_\t_\t{head}\tdep\t_\t_")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_conllu_files_learn_a_toy_language(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import dependency_parser

    files = [
        str(toy_treebank(tmp_path / "a.conllu", 60, 0)),
        str(toy_treebank(tmp_path / "b.conllu", 40, 1)),
    ]
    argv = ["--smoke", "--model", "local", "--conllu", *files, "--epochs", "20"]
    argv += ["--patience", "20", "--lr", "0.03", "--no-progress", "--threads", "1"]
    dependency_parser.main([*argv, "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "a.conllu + b.conllu: 80 train / 10 dev / 10 test sentences" in out
    row = next(line for line in out.splitlines() if "| greedy |" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[3]) > 0.95 and float(cells[5]) == 1.0  # test UAS, root accuracy
