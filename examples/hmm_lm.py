"""Train an HMM language model (or a Kneser-Ney n-gram baseline) on the Brown corpus.

Data: word level, lower-cased, one sentence per sequence with the end token ``</s>``; the
vocabulary is the 10,000 most frequent training words plus ``<unk>`` (and ``</s>``: V =
10,002 predicted symbols). Split by file in corpus order (the 500 files ``ca01`` … ``cr09``
sorted by id, index ``i`` from 0): **test** ``i % 10 == 9`` (every 10th file), **valid**
``i % 10 == 0 and i > 0`` (the file after each test file), **train** the rest — 46,234 /
5,464 / 5,642 sentences, 978,485 / 118,602 / 121,445 tokens with ``</s>``.

Models (``--model``): ``kn3`` / ``kn5`` interpolated modified Kneser-Ney (``hmm_lm.kn``);
``dense`` (``st.HMM`` with ``[Z, Z]`` transition logits), ``lowrank``
(``st.LowRankTransition``, ``--rank``), ``blocked`` (``st.BlockedEmission`` with ``--clusters``
frequency round-robin word clusters, see ``hmm_lm.data.frequency_clusters``),
``blocked-lowrank`` (both: ``O(S^2 r)`` a step, the kind that reaches ``Z = 2^14``); ``--neural``
switches the HMMs to the neural parameterization of Chiu & Rush 2020, ``--state-dropout`` to
state dropout. HMMs train by minibatched marginal likelihood (log p(x) is the HMM's
``log_partition``) with Adam; validation perplexity is computed after every epoch and the test
perplexity is reported for the best validation epoch. Each run appends a row to
``--out/results.jsonl`` and rewrites the markdown table ``--out/results.md``; ``--plot``
draws perplexity vs Z from the saved rows, n-gram models as horizontal lines.

Examples::

    python examples/hmm_lm.py                                   # default: low-rank Z=1024
    python examples/hmm_lm.py --model kn5
    python examples/hmm_lm.py --model dense --states 256
    python examples/hmm_lm.py --model blocked --states 4096 --clusters 64 --state-dropout 0.5
    python examples/hmm_lm.py --model blocked-lowrank --states 16384 --clusters 128
    python examples/hmm_lm.py --plot                            # figure from saved results
    python examples/hmm_lm.py --smoke                           # seconds, for tests

Corpus: ``--data PATH`` or ``$STRUCTIFT_DATA`` or NLTK's data folders (see
`structift.datasets.brown_root`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see examples/crf_tagger.py

import torch
from hmm_lm.data import SPLIT_RULE, Vocab, frequency_clusters, read_brown_files, split_files
from hmm_lm.kn import KneserNey
from hmm_lm.model import HMMLM, KINDS, ModelConfig
from hmm_lm.report import append_result, plot_results, results_table
from hmm_lm.training import config_name, fit, perplexity

SMOKE = {"files": 40, "vocab": 300, "states": 16, "rank": 8, "clusters": 4, "dim": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=["kn3", "kn5", *KINDS], default="lowrank",
                   help="model family")  # fmt: skip
    p.add_argument("--states", type=int, default=1024, help="hidden states Z")
    p.add_argument("--rank", type=int, default=128, help="rank r of lowrank transitions")
    p.add_argument("--clusters", type=int, default=32, help="word clusters M of blocked")
    p.add_argument("--neural", action="store_true", help="neural parameterization (Chiu & Rush)")
    p.add_argument("--dim", type=int, default=256, help="embedding size of --neural")
    p.add_argument("--state-dropout", type=float, default=0.0, help="share of states dropped")
    p.add_argument("--epochs", type=int, default=3, help="training epochs")
    p.add_argument("--lr", type=float, default=0.01, help="Adam step size")
    p.add_argument("--max-tokens", type=int, default=2048, help="padded tokens per batch")
    p.add_argument("--vocab-size", type=int, default=10000, help="words kept (+ <unk>, </s>)")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--data", help="Brown corpus folder (unset: $STRUCTIFT_DATA, NLTK, npm)")
    p.add_argument("--out", default="runs/hmm_lm", help="results, checkpoints, plot")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--plot", action="store_true", help="only plot the saved results")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--smoke", action="store_true", help="40 files, V=302, tiny model, 1 epoch")
    args = p.parse_args(argv)
    if not 0.0 <= args.state_dropout < 1.0:
        p.error(f"--state-dropout must be in [0, 1), got {args.state_dropout}")
    if args.smoke:
        args.epochs, args.vocab_size = 1, SMOKE["vocab"]
        args.states, args.rank = SMOKE["states"], SMOKE["rank"]
        args.clusters, args.dim = SMOKE["clusters"], SMOKE["dim"]
    return args


def load(args: argparse.Namespace) -> tuple[Vocab, dict[str, list[list[int]]], str]:
    """Vocabulary, encoded splits and a one-line description of the data."""
    files = read_brown_files(args.data, SMOKE["files"] if args.smoke else None)
    splits = split_files(files)
    vocab = Vocab.build(splits["train"], args.vocab_size)
    data = {k: [vocab.encode(s) for s in v] for k, v in splits.items()}
    sizes = ", ".join(f"{k} {len(v)} sents / {sum(map(len, v))} tokens" for k, v in data.items())
    desc = f"{len(files)} files, V = {len(vocab)} (top {args.vocab_size} + <unk>, </s>): {sizes}"
    return vocab, data, desc


def run_ngram(args: argparse.Namespace, vocab: Vocab, data: dict, desc: str) -> dict:
    """Count, then score valid and test with interpolated modified Kneser-Ney."""
    order = int(args.model[2:])
    start = time.perf_counter()
    lm = KneserNey(data["train"], len(vocab), order)
    seconds = time.perf_counter() - start
    return {
        "name": args.model, "model": f"KN{order} (interpolated modified)", "family": "ngram",
        "states": None, "rank": None, "parameters": sum(len(c) for c in lm.counts),
        "valid ppl": lm.perplexity(data["valid"]), "test ppl": lm.perplexity(data["test"]),
        "time/epoch": seconds, "data": desc,
    }  # fmt: skip


def run_hmm(args: argparse.Namespace, vocab: Vocab, data: dict, desc: str) -> dict:
    """Train the HMM, select the epoch on validation perplexity, score test there."""
    torch.manual_seed(args.seed)
    config = ModelConfig(
        kind=args.model, states=args.states, vocab_size=len(vocab), rank=args.rank,
        clusters=args.clusters, neural=args.neural, dim=args.dim, dropout=args.state_dropout,
    )  # fmt: skip
    counts = torch.bincount(
        torch.tensor([w for s in data["train"] for w in s]), minlength=len(vocab)
    )
    log_unigram = (counts.double() + 0.5).log() - (counts.double() + 0.5).sum().log()
    blocked, low_rank = args.model.startswith("blocked"), args.model.endswith("lowrank")
    clusters = frequency_clusters(len(vocab), args.clusters) if blocked else None
    model = HMMLM(config, log_unigram, clusters)
    name = config_name(config)
    print(f"{name}: {model.parameter_count():,} parameters", flush=True)
    out = Path(args.out)
    result = fit(
        model, data, args.epochs, args.lr, args.max_tokens, args.seed,
        out / f"{name}.pt", progress=not args.no_progress, resume=args.resume,
    )  # fmt: skip
    h = result.history
    test = perplexity(result.model, data["test"], args.max_tokens * 2)
    family = args.model + (f" r={args.rank}" if low_rank else "")
    family += f" M={args.clusters}" if blocked else ""
    family += " neural" if args.neural else ""
    family += f" drop={args.state_dropout:g}" if args.state_dropout else ""
    label = f"{name} (best ep. {h.best_epoch}/{len(h.valid_ppl)})"
    return {
        "name": name, "model": label, "family": family, "states": args.states,
        "rank": args.rank if low_rank else None,
        "parameters": model.parameter_count(), "valid ppl": h.valid_ppl[h.best_epoch - 1],
        "test ppl": test, "time/epoch": sum(h.seconds) / len(h.seconds), "data": desc,
        "epochs": len(h.valid_ppl),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.plot:
        print(f"plot: {plot_results(out)}")
        return
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    vocab, data, desc = load(args)
    print(f"Brown, split {SPLIT_RULE}: {desc}", flush=True)
    runner = run_ngram if args.model.startswith("kn") else run_hmm
    row = runner(args, vocab, data, desc)
    if not (math.isfinite(row["valid ppl"]) and math.isfinite(row["test ppl"])):
        print(f"warning: non-finite perplexity in {row}", file=sys.stderr)
    rows = append_result(out, row)
    print()
    print(results_table(rows))
    print(f"\nresults: {out / 'results.md'}; total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
