"""The structift tagger against python-crfsuite on the same tagging files.

crfsuite gets the standard feature recipe (the lower-cased word, 1-4-letter suffixes and 1-3-letter
prefixes, shape, case and digit flags, and words and suffixes in a ±2 window: the tagger's own
sparse features, ``examples/tagger/features.py``) and L-BFGS (100 iterations, c1 = 0.1,
c2 = 0.01). The structift tagger (``examples/crf_tagger.py --head crf``) runs with its defaults
and selects its epoch on its own dev split (the last 10% of the training file); crfsuite trains
on the whole training file. The tagger's defaults start from crfsuite's own model (stage 1:
the sparse CRF on the same features by L-BFGS on crfsuite's L1 + L2 objective, the L1 term
smoothed) and then train the sparse + neural model from it, so the comparison measures what
the neural stage and the dev selection add to crfsuite's model. Both are scored on the test
file: token accuracy, and span precision/recall/F1 (conlleval rules) when the tags are span
tags.

    python benchmarks/tagger_vs_crfsuite.py --train a.conll --test b.conll
    python benchmarks/tagger_vs_crfsuite.py --brown-genre humor      # a Brown genre, 90/10
    python benchmarks/tagger_vs_crfsuite.py --brown-genre news --spans   # proper-name spans

``--dev`` replaces the test file by the training file's own dev split (its last 10%, the split
the tagger selects its epoch on; both models then train on the first 90%): for comparing
settings without looking at the test file.

``--brown-genre G`` writes the genre's sentences (base tags; first 90% train, last 10% test) to
two files first; with ``--spans`` the tags become BIO spans of proper names (runs of ``np``
tags) instead of part-of-speech tags. ``--conllu F`` takes a CoNLL-U file (UPOS tags), 90/10.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from tagger.features import token_features  # noqa: E402
from tagger.spans import SpanScores, detect_scheme  # noqa: E402

from structift.datasets import brown_tagged_sents, read_conll, write_conll  # noqa: E402


def brown_files(genre: str, spans: bool, folder: Path) -> tuple[Path, Path]:
    sents = brown_tagged_sents(categories=genre, simplify=True)
    if spans:
        sents = [_name_spans(s) for s in sents]
    cut = int(0.9 * len(sents))
    train, test = folder / f"brown-{genre}-train.conll", folder / f"brown-{genre}-test.conll"
    write_conll(sents[:cut], train)
    write_conll(sents[cut:], test)
    return train, test


def _name_spans(sent: list[tuple[str, str]]) -> list[tuple[str, str]]:
    out, inside = [], False
    for word, tag in sent:
        name = tag == "np"
        out.append((word, ("I-NAME" if inside else "B-NAME") if name else "O"))
        inside = name
    return out


def conllu_files(path: Path, folder: Path) -> tuple[Path, Path]:
    sents = read_conll(path, word_column=1, tag_column=3)
    sents = [[(w, t) for w, t in s] for s in sents]
    cut = int(0.9 * len(sents))
    train, test = folder / f"{path.stem}-train.conll", folder / f"{path.stem}-test.conll"
    write_conll(sents[:cut], train)
    write_conll(sents[cut:], test)
    return train, test


def dev_files(train: Path, folder: Path) -> tuple[Path, Path]:
    """The training file cut as the tagger cuts its dev split: the last 10% of sentences."""
    sents = read_conll(train)
    n_dev = max(1, round(0.1 * len(sents)))
    head, dev = folder / f"{train.stem}-head.conll", folder / f"{train.stem}-dev.conll"
    write_conll(sents[:-n_dev], head)
    write_conll(sents[-n_dev:], dev)
    return head, dev


def run_crfsuite(train: list, test: list, scheme: str | None) -> dict[str, float]:
    import pycrfsuite

    def feats(sent: list) -> list[list[str]]:
        words = [w for w, _ in sent]
        return [token_features(words, i) for i in range(len(words))]

    trainer = pycrfsuite.Trainer(algorithm="lbfgs", verbose=False)
    for s in train:
        trainer.append(feats(s), [t for _, t in s])
    trainer.set_params({"c1": 0.1, "c2": 0.01, "max_iterations": 100})
    with tempfile.TemporaryDirectory() as d:
        model = str(Path(d) / "model.crfsuite")
        t0 = time.perf_counter()
        trainer.train(model)
        seconds = time.perf_counter() - t0
        tagger = pycrfsuite.Tagger()
        tagger.open(model)
        preds = [tagger.tag(feats(s)) for s in test]
    gold = [[t for _, t in s] for s in test]
    correct = sum(p == g for ps, gs in zip(preds, gold) for p, g in zip(ps, gs))
    out = {"accuracy": correct / sum(map(len, gold)), "seconds": seconds}
    if scheme is not None:
        spans = SpanScores()
        for g, p in zip(gold, preds):
            spans.add(g, p)
        out["f1"] = spans.f1
    return out


def run_structift(train: Path, test: Path, extra: list[str]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, str(ROOT / "examples" / "crf_tagger.py"), "--head", "crf"]
        cmd += ["--no-progress", "--train", str(train), "--test", str(test), "--out", d, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    row = next(line for line in lines if line.startswith("structift"))
    cells = row.split()
    out = {"accuracy": float(cells[-8 if "span F1" in header else -5]), "seconds": float(cells[-2])}
    if "span F1" in header:
        out["f1"] = float(cells[-3])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train", type=Path)
    p.add_argument("--test", type=Path)
    p.add_argument("--brown-genre", help="a Brown category (news, humor, fiction, ...)")
    p.add_argument("--spans", action="store_true", help="with --brown-genre: proper-name BIO spans")
    p.add_argument("--conllu", type=Path, help="a CoNLL-U file (UPOS tags), split 90/10")
    p.add_argument("--tagger-args", default="", help="extra arguments for crf_tagger.py")
    p.add_argument(
        "--dev", action="store_true",
        help="score on the training file's last 10%% (both train on the rest), not on --test",
    )  # fmt: skip
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        if args.brown_genre:
            train, test = brown_files(args.brown_genre, args.spans, Path(d))
            name = f"Brown {args.brown_genre}" + (" name spans" if args.spans else " POS")
        elif args.conllu:
            train, test = conllu_files(args.conllu, Path(d))
            name = f"{args.conllu.name} UPOS"
        elif args.train and args.test:
            train, test = args.train, args.test
            name = f"{train.name} / {test.name}"
        else:
            p.error("give --train and --test, --brown-genre or --conllu")
        if args.dev:
            train, test = dev_files(train, Path(d))
            name += " (dev split of the training file)"
        tr, te = read_conll(train), read_conll(test)
        tags = sorted({t for s in tr for _, t in s})
        scheme = detect_scheme(tags, [[t for _, t in s] for s in tr])
        print(
            f"{name}: {len(tr)} training / {len(te)} test sentences, {len(tags)} tags"
            f"{f', {scheme} spans' if scheme else ''}"
        )
        crfsuite = run_crfsuite(tr, te, scheme)
        ours = run_structift(train, test, args.tagger_args.split())
    head = (
        f"{'model':<36} {'accuracy':>9}"
        + (f" {'span F1':>8}" if scheme else "")
        + f" {'train s':>8}"
    )
    print(head)
    print("-" * len(head))
    for label, r in (
        ("python-crfsuite (L-BFGS, 100 it.)", crfsuite),
        ("structift tagger (crf head)", ours),
    ):
        f1 = f" {r['f1']:>8.4f}" if scheme else ""
        print(f"{label:<36} {r['accuracy']:>9.4f}{f1} {r['seconds']:>8.0f}")


if __name__ == "__main__":
    main()
