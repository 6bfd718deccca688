"""Draw the figure of a GeometryMonitor MNIST run from its TensorBoard events (matplotlib: the ``examples`` extra).

    python scripts/plot_run.py lightning_logs/mnist/version_0 docs/mnist_protocol.png [--steps-per-epoch 3]

Four panels, every value read back with tensorboard's ``EventAccumulator``:
(a) training probe: the exact batch functional dimension, the numerical rank of the logit differences and of the
    softmax probabilities (``train_softmax``), and the upper bound; (b) the exact dimension / bound on every probe;
(c) the CFFD curves logged by ``examples/cffd_curve.py``, as the shortfall of the exact dimension on n Gaussian
inputs below min(rows, P − hidden) and below P − hidden; (d) training and test loss.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def series(acc: EventAccumulator, tag: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a scalar tag; empty lists when absent."""
    if tag not in acc.Tags()["scalars"]:
        return [], []
    events = acc.Scalars(tag)
    return [float(e.step) for e in events], [float(e.value) for e in events]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="a run's folder, e.g. lightning_logs/mnist/version_0")
    parser.add_argument("output", help="PNG file to write")
    parser.add_argument("--steps-per-epoch", type=float, default=3.0, help="x axes in epochs (600 / 256 → 3)")
    args = parser.parse_args()
    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    acc.Reload()

    def epochs(tag: str) -> tuple[list[float], list[float]]:
        steps, values = series(acc, tag)
        return [s / args.steps_per_epoch for s in steps], values

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    a, b, c, d = axes.flat
    a.plot(*epochs("geometry/train/upper_bound"), "k--", label="upper bound N·(K−1)")
    a.plot(*epochs("geometry/train/batch_functional_dimension"), "o-", lw=2, label="exact BFD (logit differences)")
    a.plot(*epochs("geometry/train/numerical_rank"), "s:", label="numerical rank, logit differences")
    a.plot(*epochs("geometry/train_softmax/numerical_rank"), "^-", label="numerical rank, softmax probabilities")
    a.set(title="(a) training probe (600 images)", xlabel="epoch", ylabel="rank")
    a.legend(fontsize=8)
    for probe, style in (("train", "o-"), ("test", "s-"), ("random", "^-")):
        x, bfd = epochs(f"geometry/{probe}/batch_functional_dimension")
        _, bound = epochs(f"geometry/{probe}/upper_bound")
        if bfd:
            b.plot(x, [v / w for v, w in zip(bfd, bound, strict=True)], style, label=f"{probe}: exact BFD / bound")
    b.set(title="(b) exact BFD relative to its bound min(rows, P − hidden)", xlabel="epoch", ylabel="BFD / bound")
    b.legend(fontsize=8)
    for when, style in (("start", "o-"), ("end", "s-")):
        n, bfd = series(acc, f"cffd/{when}/batch_functional_dimension")
        _, bound = series(acc, f"cffd/{when}/upper_bound")
        _, limit = series(acc, f"cffd/{when}/parameter_bound")
        if n:
            c.plot(n, [b - d for b, d in zip(bound, bfd, strict=True)], style,
                   label=f"{when}: min(rows, P − hidden) − exact BFD on n Gaussian inputs")
            c.plot(n, [p - d for p, d in zip(limit, bfd, strict=True)], style[0] + ":",
                   label=f"{when}: P − hidden − exact BFD (CFFD shortfall)")
    c.set(title="(c) CFFD: shortfall below the bounds against the number of random inputs", xlabel="n inputs",
          ylabel="rank deficit", yscale="symlog")
    c.legend(fontsize=8)
    for tag, style in (("train/loss", "-"), ("test/loss", "--")):
        x, loss = epochs(tag)
        if loss:
            d.plot(x, loss, style, label=tag)
    d.set(title="(d) loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
    d.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
