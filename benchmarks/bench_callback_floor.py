"""Where the monitor's overhead goes: runs without a callback, with an empty ``Callback``, with a
``GeometryMonitor`` that is never due, and with the default monitor, interleaved in one process.

Trains the example of ``bench_callback.py`` (the MNIST example, or ``--model lstm``) from seed 0 in rounds; each
round runs the four kinds in a random order (seeded by the round), so that a drift of the machine's load hits all
alike. Prints, per kind, the median wall time of ``fit`` and its ratio to the median without a callback, and the
default monitor's own account (measuring seconds, other seconds). The empty callback is Lightning's cost of
calling one more callback's hooks; the never-due monitor adds its own hook (a counter update per batch, in its
account); the default monitor adds its measurements.

Examples::

    python benchmarks/bench_callback_floor.py --rounds 5                          # MNIST, 680 epochs: ~3 minutes
    python benchmarks/bench_callback_floor.py --model lstm --epochs 200 --rounds 3  # ~4 minutes
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import warnings

import lightning as L
import torch
from bench_callback import softmax_cross_entropy, train

from lightning_geomdim import GeometryMonitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mnist", "lstm"], default="mnist")
    parser.add_argument("--epochs", type=int, default=680)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    extra = {"loss_fn": softmax_cross_entropy} if args.model == "mnist" else {}
    kinds = {
        "without": lambda: None,
        "empty Callback": lambda: L.Callback(),
        "monitor never due": lambda: GeometryMonitor(every_n_epochs=10**9, at_start=False, **extra),
        "default monitor": lambda: GeometryMonitor(**extra),
    }
    print(f"{args.model}, {args.epochs} epochs, {args.rounds} rounds; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    accounts = []
    with tempfile.TemporaryDirectory() as root:
        for make in kinds.values():  # warm-up: imports, first calls
            train(1, root, make(), args.model)
        for r in range(args.rounds):
            order = list(kinds)
            random.Random(r).shuffle(order)
            for kind in order:
                callback = kinds[kind]()
                seconds, _, _ = train(args.epochs, root, callback, args.model)
                times[kind].append(seconds)
                if isinstance(callback, GeometryMonitor) and kind == "default monitor":
                    acc = callback.state_dict()["overhead"]
                    accounts.append((acc["measuring_s"], acc["other_s"]))
    base = statistics.median(times["without"])
    for kind, runs in times.items():
        print(f"{kind:18s} median {statistics.median(runs):7.3f} s  ratio {statistics.median(runs) / base:.4f}  "
              f"runs {[round(t, 2) for t in runs]}")
    print("default monitor's account: measuring " + ", ".join(f"{m:.3f}" for m, _ in accounts) + " s; other "
          + ", ".join(f"{o:.2f}" for _, o in accounts) + " s; share "
          + ", ".join(f"{m / o:.1%}" for m, o in accounts))


if __name__ == "__main__":
    main()
