"""Train a graph-based dependency parser on the Turkish Web Treebank with a tree CRF.

The model (see ``examples/parser/model.py``) is a BiLSTM over word, character and suffix
features with a biaffine arc scorer (Dozat & Manning 2017). ``--model crf`` (the default)
trains it with the negative log-likelihood of the non-projective single-root
`structift.DependencyCRF` and decodes the MST; ``--model projective`` uses the projective CRF
(Eisner), trained on the projective training sentences only (it gives the 256 non-projective
training trees probability 0); ``--model local`` trains a per-word softmax over heads (head
selection) and decodes it both greedily (each word's best head, not always a tree) and by
MST; ``--model all`` runs the three. The results table reports test UAS with and without
punctuation (gold UPOS ``PUNCT``), root accuracy and the share of well-formed trees (one
root, no cycle).

Data: the Kayadelen et al. (LREC 2020) treebank, ``web.conllu`` then ``wiki.conllu``;
sentence i is test if i % 10 == 9, dev if i % 10 == 8, else train (3,881 / 485 / 485; see
`structift.datasets.turkish_treebank_split`). The best dev-UAS epoch is kept and the test set
is scored once, with that model. ``--conllu`` applies the same split to other files.

Examples::

    python examples/dependency_parser.py                    # tree CRF (needs DependencyCRF)
    python examples/dependency_parser.py --model local      # head-selection ablation
    python examples/dependency_parser.py --model all        # the three, one table
    python examples/dependency_parser.py --resume           # continue from --out/<model>.pt
    python examples/dependency_parser.py --parse "Ali okula gitti ." --model local
    python examples/dependency_parser.py --smoke --model local   # seconds, for CI

Data: ``--data PATH`` or ``$STRUCTIFT_DATA/turkish-treebank`` or the user cache or
``pip download turkish-treebanks==1.0.0`` (see `structift.datasets.turkish_treebank_root`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Passive OpenMP waiting: spin-waiting threads slow training several-fold on a busy 2-core
# machine (see crf_tagger.py). Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from parser.features import Vocab, collate, encode
from parser.model import DECODERS, MODELS, Parser, ParserConfig, have_dependency_crf
from parser.report import Row, plot_learning_curves, results_table
from parser.training import (
    History,
    epoch_batches,
    evaluate,
    make_optimizer,
    model_from_checkpoint,
    save_checkpoint,
    train_one_epoch,
)
from tagger.training import Timer, load_checkpoint

from structift.datasets import (
    DependencySentence,
    is_projective,
    read_conllu,
    turkish_treebank_split,
)

DEFAULT_EPOCHS = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", help="treebank folder (unset: $STRUCTIFT_DATA, cache, pip)")
    data.add_argument("--conllu", nargs="+", help="other CoNLL-U files, split the same way")
    model = p.add_argument_group("model")
    model.add_argument("--model", choices=[*MODELS, "all"], default="crf", help="objective")
    model.add_argument("--hidden", type=int, default=128, help="BiLSTM size per direction")
    model.add_argument("--layers", type=int, default=2, help="BiLSTM layers")
    model.add_argument("--word-dim", type=int, default=100, help="word embedding size")
    model.add_argument("--arc-dim", type=int, default=128, help="biaffine MLP size")
    model.add_argument("--dropout", type=float, default=0.33, help="dropout everywhere")
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs", type=int, default=None, help="epochs at most (unset: 15, or 1 with --smoke)"
    )
    train.add_argument("--patience", type=int, default=4, help="stop after this many epochs "
                       "without dev gain")  # fmt: skip
    train.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    train.add_argument("--lr", type=float, default=2e-3, help="Adam step")
    train.add_argument(
        "--decay-steps", type=int, default=2500, help="LR 10x lower every so many steps"
    )
    train.add_argument("--min-count", type=int, default=2, help="keep words/suffixes seen so often")
    train.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument("--out", default="runs/dependency_parser", help="checkpoints and plot")
    train.add_argument("--resume", action="store_true", help="continue from --out/<model>.pt")
    train.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    train.add_argument("--smoke", action="store_true", help="tiny data and model, 1 epoch")
    parse = p.add_argument_group("parsing new text")
    parse.add_argument("--parse", help="parse this sentence (whitespace-tokenized) and exit")
    parse.add_argument("--checkpoint", help="checkpoint for --parse (unset: --out/<model>.pt)")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.parse is not None and args.model == "all":
        p.error("--parse takes one --model (or --checkpoint), not 'all'")
    return args


def load_data(args: argparse.Namespace) -> tuple[list, list, list, str]:
    """``(train, dev, test, name)`` of `DependencySentence` lists."""
    if args.conllu:
        sents = [s for f in args.conllu for s in read_conllu(f)]
        train = [s for i, s in enumerate(sents) if i % 10 < 8]
        dev = [s for i, s in enumerate(sents) if i % 10 == 8]
        test = [s for i, s in enumerate(sents) if i % 10 == 9]
        name = " + ".join(Path(f).name for f in args.conllu)
    else:
        train, dev, test = turkish_treebank_split(args.data)
        name = "the Turkish Web Treebank (web + wiki, i % 10 split)"
    if args.smoke:
        train, dev, test = train[:80], dev[:20], test[:20]
    if not (train and dev and test):
        raise SystemExit(
            f"the split left {len(train)} / {len(dev)} / {len(test)} train / dev / test "
            "sentences; every part needs at least one (give at least 10 sentences)"
        )
    return train, dev, test, name


def check_available(models: list[str]) -> None:
    """Fail early, with what to do, when a model needs the tree CRF and it is missing."""
    needs = [m for m in models if m != "local"]
    if needs and not have_dependency_crf():
        raise SystemExit(
            f"--model {' / '.join(needs)} needs structift.DependencyCRF (issue 12), which the "
            "installed structift does not have yet; run --model local (head selection) instead"
        )


def config_for(model: str, args: argparse.Namespace, vocab: Vocab) -> ParserConfig:
    tiny = args.smoke
    return ParserConfig(
        n_words=len(vocab.words),
        n_chars=len(vocab.chars),
        n_suffixes=len(vocab.suffixes),
        model=model,
        word_dim=8 if tiny else args.word_dim,
        char_dim=8 if tiny else 32,
        char_filters=8 if tiny else 64,
        suffix_dim=8 if tiny else 32,
        hidden=8 if tiny else args.hidden,
        layers=1 if tiny else args.layers,
        arc_dim=8 if tiny else args.arc_dim,
        dropout=args.dropout,
    )


def resume(
    ckpt: Path, model: Parser, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[History, dict[str, torch.Tensor]] | None:
    """Load ``ckpt`` into ``model`` and ``optimizer`` (and the RNG); None when it is absent."""
    name = model.config.model
    if not ckpt.is_file():
        print(f"[{name}] warning: --resume but no checkpoint at {ckpt}; training from scratch",
              file=sys.stderr)  # fmt: skip
        return None
    state = load_checkpoint(ckpt, device)
    model.load_state_dict(state["model"])  # type: ignore[arg-type]
    optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
    torch.set_rng_state(state["rng"])  # type: ignore[arg-type]
    history = History(**state["history"])  # type: ignore[arg-type]
    print(f"[{name}] resumed from {ckpt} after epoch {history.epoch[-1]}")
    return history, state["best_model"]  # type: ignore[return-value]


def train_model(
    config: ParserConfig,
    args: argparse.Namespace,
    vocab: Vocab,
    data: dict[str, list],
    device: torch.device,
) -> tuple[Parser, History]:
    """Train (or resume) one model; return its best-dev-epoch state and its learning curve."""
    name = config.model
    torch.manual_seed(args.seed)
    model = Parser(config).to(device)
    optimizer = make_optimizer(model, args.lr)
    history = History()
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = Path(args.out) / f"{name}.pt"
    if args.resume and (loaded := resume(ckpt, model, optimizer, device)) is not None:
        history, best = loaded
    # The projective CRF gives non-projective gold trees probability 0 (its log_prob rejects
    # them): it trains on the projective training sentences only.
    items = data["train_projective" if name == "projective" else "train"]
    decoder = DECODERS[name][0]
    steps_per_epoch = len(epoch_batches(items, args.batch_size, args.seed, 0))
    for epoch in range(len(history.epoch), args.epochs):
        if history.epoch and epoch - history.best_epoch >= args.patience:
            print(f"[{name}] early stop: no dev improvement in {args.patience} epochs")
            break
        batches = epoch_batches(items, args.batch_size, args.seed, epoch)
        bar = None
        if not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"[{name}] epoch {epoch + 1}/{args.epochs}")
        timer = Timer()
        loss = train_one_epoch(
            model, optimizer, items, batches, device,
            epoch * steps_per_epoch, args.decay_steps, bar,
        )  # fmt: skip
        seconds = timer()
        if bar is not None:
            bar.close()
        dev, _ = evaluate(model, data["dev"], decoder, device)
        history.epoch.append(epoch + 1)
        history.train_loss.append(loss)
        history.dev_uas.append(dev.uas)
        history.train_seconds.append(seconds)
        if history.best_epoch == epoch + 1:
            best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"[{name}] epoch {epoch + 1}: train loss {loss:.4f}, dev UAS ({decoder}) "
              f"{dev.uas:.4f}, {seconds:.1f} s")  # fmt: skip
        save_checkpoint(ckpt, model, optimizer, vocab, history, best)
    model.load_state_dict(best)
    return model, history


def report_rows(
    model: Parser, history: History, data: dict[str, list], device: torch.device
) -> list[Row]:
    """Score dev and test at the selected epoch with each of the model's decoders."""
    rows, name = [], model.config.model
    seconds = sum(history.train_seconds)
    for decoder in DECODERS[name]:
        if decoder != "greedy" and not have_dependency_crf():
            note = "needs structift.DependencyCRF"
            rows.append(Row(name, decoder, None, None, history.best_epoch, seconds, note))
            continue
        dev, _ = evaluate(model, data["dev"], decoder, device)
        test, _ = evaluate(model, data["test"], decoder, device)
        rows.append(Row(name, decoder, dev.uas, test, history.best_epoch, seconds))
    return rows


def parse_sentence(args: argparse.Namespace, device: torch.device) -> None:
    """Print ``index word head head-word`` lines for ``--parse``."""
    path = Path(args.checkpoint or Path(args.out) / f"{args.model}.pt")
    model, vocab = model_from_checkpoint(load_checkpoint(path, device), device)
    words = args.parse.split()
    if not words:
        raise SystemExit("--parse needs at least one word")
    decoder = DECODERS[model.config.model][0]
    if model.config.model == "local" and have_dependency_crf():
        decoder = "mst"  # a well-formed tree when the MST decoder is available
    heads = model.decode(collate([encode(vocab, words)]).to(device), decoder)[0, 1:].tolist()
    for m, (word, h) in enumerate(zip(words, heads), start=1):
        print(f"{m}\t{word}\t{h}\t{words[h - 1] if h > 0 else 'ROOT'}")


def encode_all(vocab: Vocab, sents: list[DependencySentence]) -> list:
    return [encode(vocab, s.words, s.heads, s.upos) for s in sents]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but CUDA is not available")
    if args.parse is not None:
        parse_sentence(args, device)
        return
    models = list(MODELS) if args.model == "all" else [args.model]
    check_available(models)
    if args.epochs is None:
        args.epochs = 1 if args.smoke else DEFAULT_EPOCHS
    total = Timer()
    train, dev, test, name = load_data(args)
    vocab = Vocab.build((s.words for s in train), min_count=1 if args.smoke else args.min_count)
    data = {"train": encode_all(vocab, train), "dev": encode_all(vocab, dev),
            "test": encode_all(vocab, test)}  # fmt: skip
    data["train_projective"] = [e for e in data["train"] if is_projective(e.heads[1:])]
    print(
        f"{name}: {len(train)} train / {len(dev)} dev / {len(test)} test sentences "
        f"({len(train) - len(data['train_projective'])} non-projective training trees, which "
        "--model projective leaves out), "
        f"{sum(map(len, train))} training words, {len(vocab.words) - 3} word types kept; "
        f"{device}, {torch.get_num_threads()} thread(s)"
    )
    rows, curves = [], {}
    for model_name in models:
        model, history = train_model(config_for(model_name, args, vocab), args, vocab, data, device)
        rows += report_rows(model, history, data, device)
        curves[model_name] = history
    out = Path(args.out)
    png = plot_learning_curves(curves, out / "learning_curve.png")
    table = results_table(name, rows)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    print()
    print(table)
    ckpts = ", ".join(str(out / f"{m}.pt") for m in models)
    print(f"\nlearning curve: {png}; table: {out / 'results.md'}; checkpoints: {ckpts}")
    print(f"total wall time {total():.0f} s (data, training and evaluation)")


if __name__ == "__main__":
    sys.exit(main())
