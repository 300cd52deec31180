"""The CRF layer against pytorch-crf and AllenNLP's ConditionalRandomField, same inputs.

Two jobs per shape, each with learnable start/end/transition scores and random lengths in
``[T/2, T]`` (a prefix mask):

* NLL: the summed negative log-likelihood of random gold tags, forward + backward (gradients
  of the emissions and of the three score tensors);
* decode: the Viterbi tag lists (``decode`` / ``viterbi_tags``), Python lists out.

The peers get the same parameters (structift's ``state_dict`` loads into pytorch-crf's module
unchanged; AllenNLP's gets the same tensors) and the same emissions, tags and masks. Times are
medians over interleaved rounds (``_peers.median_times``), one thread by default; the machine's
load average is printed with the table, since on a shared machine it moves the numbers.

AllenNLP: the ``allennlp`` package pins torch < 1.13, so it cannot be installed next to this
project's torch. Its modules are measured through the ``allennlp-light`` fork (AllenNLP 2.10's
``modules``/``nn`` packages), installed without dependencies::

    pip install --no-deps allennlp-light==1.0.0 ai2-tango==1.3.2 base58 dill rjsonnet pytz rich

Without it the AllenNLP columns read "-" and the reason is printed.

    python benchmarks/crf_layer.py                      # the full grid (minutes)
    python benchmarks/crf_layer.py -B 32 -T 32 -Z 9     # one point
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import median_times

import structift as st


def allennlp_crf() -> tuple[Any, str]:
    """AllenNLP's ConditionalRandomField class, or ``None`` and why it is unavailable."""
    try:
        from allennlp_light.modules import ConditionalRandomField

        return ConditionalRandomField, "allennlp-light 1.0.0 (AllenNLP 2.10 modules)"
    except Exception as e:
        first = f"{type(e).__name__}: {e}"
    try:
        from allennlp.modules import ConditionalRandomField

        return ConditionalRandomField, "allennlp"
    except Exception as e:
        return None, f"{first}; allennlp: {type(e).__name__}: {e}"


def make_inputs(B: int, T: int, Z: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(T // 2, 1), T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return {
        "emissions": torch.randn(B, T, Z, generator=g),
        "tags": torch.randint(Z, (B, T), generator=g),
        "mask": mask,
    }


def models(Z: int, allennlp_cls: Any) -> dict[str, torch.nn.Module]:
    """The three layers with the same parameters."""
    from torchcrf import CRF as TorchCRF

    torch.manual_seed(0)
    ours = st.CRF(Z, batch_first=True)
    out: dict[str, torch.nn.Module] = {"structift": ours}
    ref = TorchCRF(Z, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    out["pytorch-crf"] = ref
    if allennlp_cls is not None:
        al = allennlp_cls(Z, include_start_end_transitions=True)
        with torch.no_grad():
            al.transitions.copy_(ours.transitions)
            al.start_transitions.copy_(ours.start_transitions)
            al.end_transitions.copy_(ours.end_transitions)
        out["allennlp"] = al
    return out


def nll_runs(mods: dict[str, torch.nn.Module], x: dict[str, torch.Tensor]) -> dict[str, Callable]:
    emissions = x["emissions"].clone().requires_grad_(True)

    def step(name: str, m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            emissions.grad = None
            m.zero_grad(set_to_none=True)
            if name == "allennlp":
                llh = m(emissions, x["tags"], x["mask"])
            else:
                llh = m(emissions, x["tags"], mask=x["mask"], reduction="sum")
            (-llh).backward()

        return run

    return {name: step(name, m) for name, m in mods.items()}


def decode_runs(
    mods: dict[str, torch.nn.Module], x: dict[str, torch.Tensor]
) -> dict[str, Callable]:
    emissions = x["emissions"]

    def step(name: str, m: Any) -> Callable[[], Any]:
        if name == "allennlp":
            return lambda: m.viterbi_tags(emissions, x["mask"])
        return lambda: m.decode(emissions, mask=x["mask"])

    return {name: step(name, m) for name, m in mods.items()}


def check_agreement(mods: dict[str, torch.nn.Module], x: dict[str, torch.Tensor]) -> None:
    """The peers compute the same numbers on these inputs (else the timing is meaningless)."""
    em, tags, mask = x["emissions"].double(), x["tags"], x["mask"]
    ours = mods["structift"].double()
    ref = mods["pytorch-crf"].double()
    a = ours(em, tags, mask=mask, reduction="none")
    b = ref(em, tags, mask=mask, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    paths = ours.decode(em, mask=mask)
    assert paths == ref.decode(em, mask=mask), "Viterbi paths differ from pytorch-crf"
    if "allennlp" in mods:
        al = mods["allennlp"].double()
        torch.testing.assert_close(a.sum(), al(em, tags, mask), rtol=1e-9, atol=1e-9)
        # AllenNLP decodes in float32 whatever the input dtype: compare the scores of its paths
        # (near-ties may resolve differently), not the paths.
        dist = ours.distribution(em, mask=mask)
        T = em.shape[1]
        theirs = torch.tensor([p + [0] * (T - len(p)) for p, _ in al.viterbi_tags(em, mask)])
        torch.testing.assert_close(dist.score(theirs), dist.max_score, rtol=1e-5, atol=1e-5)
        al.float()
    ours.float()
    ref.float()


def load() -> str:
    try:
        return subprocess.run(
            ["uptime"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-B", type=int, nargs="*", default=[32, 128])
    p.add_argument("-T", type=int, nargs="*", default=[32, 128])
    p.add_argument("-Z", type=int, nargs="*", default=[9, 45, 128])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds (median)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    allennlp_cls, why = allennlp_crf()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); AllenNLP: {why}")
    print(f"load before: {load()}")
    head = (
        f"{'B':>4} {'T':>4} {'Z':>4} | {'NLL fwd+bwd ms: ours':>20} {'pytorch-crf':>11} "
        f"{'allennlp':>9} {'x ptc':>6} {'x aln':>6} | {'decode ms: ours':>15} {'pytorch-crf':>11} "
        f"{'allennlp':>9} {'x ptc':>6} {'x aln':>6}"
    )
    print(head)
    print("-" * len(head))
    for B in args.B:
        for T in args.T:
            for Z in args.Z:
                x = make_inputs(B, T, Z)
                mods = models(Z, allennlp_cls)
                check_agreement(mods, x)
                nll = median_times(nll_runs(mods, x), args.repeats, "cpu")
                dec = median_times(decode_runs(mods, x), args.repeats, "cpu")
                cells = []
                for t in (nll, dec):
                    ours = t["structift"]
                    ptc, aln = t["pytorch-crf"], t.get("allennlp")
                    aln_ms = f"{1e3 * aln:>9.2f}" if aln else f"{'-':>9}"
                    aln_x = f"{aln / ours:>5.1f}x" if aln else f"{'-':>6}"
                    width = 20 if t is nll else 15
                    cells.append(
                        f"{1e3 * ours:>{width}.2f} {1e3 * ptc:>11.2f} {aln_ms} "
                        f"{ptc / ours:>5.1f}x {aln_x}"
                    )
                print(f"{B:>4} {T:>4} {Z:>4} | {cells[0]} | {cells[1]}", flush=True)
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
