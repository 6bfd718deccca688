"""Does a measurement slow the training that follows it? (The monitored LSTM runs of ``bench_callback.py`` spend
0.5–1.7 s more outside the measurements than the runs without the monitor.)

A plain torch loop trains ``bench_callback.py``'s LSTM classifier (Adam, batches of 64); each round, for each action
in turn (order rotated per round): time 300 training steps, do the action, time 300 more. Prints, per action, the
median ratio after / before over the rounds. Actions: nothing; a thread-count change (1, then back); a dimension
point (``batch_functional_dimension(spectrum=True)`` on 64 sequences); a flatness point (``flatness`` on the
same). A ratio above "nothing"'s beyond the spread means the action leaves the process slower.

Example::

    python benchmarks/bench_after_effect.py --rounds 8      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_callback import LSTMClassifier, sequences

from lightning_geomdim import batch_functional_dimension, flatness


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = LSTMClassifier()
    optimizer = model.configure_optimizers()
    batches = list(sequences())[:32]
    x, y = batches[0][0][:64], batches[0][1][:64]

    def train(steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            inputs, targets = batches[i % len(batches)]
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return time.perf_counter() - start

    def threads() -> None:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.set_num_threads(n)

    actions: dict[str, Callable[[], object]] = {
        "nothing": lambda: None, "threads": threads,
        "dimension": lambda: batch_functional_dimension(model, x, spectrum=True),
        "flatness": lambda: flatness(model, F.cross_entropy, x, y),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} rounds of {args.steps} "
          "steps before and after each action", flush=True)
    train(200)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in actions}
    names = list(actions)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            before = train(args.steps)
            actions[name]()
            ratios[name].append(train(args.steps) / before)
    for name, values in ratios.items():
        print(f"{name:10s} after / before: median {statistics.median(values):.4f}  "
              f"{[round(v, 3) for v in values]}")


if __name__ == "__main__":
    main()
