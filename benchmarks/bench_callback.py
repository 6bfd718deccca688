"""Benchmark the wall-time overhead of GeometryMonitor on the MNIST example at its default schedule.

Trains the MNIST example (``examples/mnist.py``: the paper's MLP [784, 30, 30, 30, 10], SGD lr 0.1, batch 256,
600 bundled MNIST images, 2,000 held-out images for validation every 10 epochs; the trainer settings of
``configs/mnist.yaml``, 680 epochs) with and without ``GeometryMonitor(loss_fn=softmax_cross_entropy)``, every
other argument at its default: measured every epoch and at step 0 within ``max_overhead=0.05``, probes train /
val / random of 64 samples, all three measures. ``loss_fn`` is the example's own, as in its configs, because its
``forward`` returns probabilities. Both runs log to a TensorBoardLogger, so only the monitor differs.

The runs come in pairs, in this process, after a one-epoch warm-up of each; the order within a pair alternates
(without then with, with then without, ...) so that a drift of the machine's load hits both alike. It prints
every pair, the median over the pairs of the overhead (with / without − 1), the ratio of the median times, how
many points each measure took (read back from the TensorBoard events), the monitor's own account (measuring
seconds against the rest), and whether the monitored run ended with bit-identical weights (the observer
guarantee).

Examples::

    python benchmarks/bench_callback.py                      # 680 epochs, 8 pairs: about 3 minutes on 2 cores
    python benchmarks/bench_callback.py --epochs 100 --pairs 1
    python benchmarks/bench_callback.py --max-overhead none  # every scheduled point (slow: one per epoch)
    python benchmarks/bench_callback.py --max-overhead empty  # a Callback that does nothing: Lightning's own cost
    python benchmarks/bench_callback.py --model lstm --epochs 60 --pairs 3  # a minute-long LSTM run

``--model lstm``: an LSTM sequence classifier (``nn.LSTM`` 8 → 32 over 20 steps, Linear head to 4 classes,
2,048 synthetic sequences whose class is the sign pattern of two of their sums, batches of 64, Adam) trained with
and without ``GeometryMonitor()`` with every argument at its default (no ReLU: the dimension is a numerical rank,
alignment and regions do not apply).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/ is not a package
from mnist import MNISTClassifier, MNISTDataModule, softmax_cross_entropy

from lightning_geomdim import GeometryMonitor


class LSTMClassifier(L.LightningModule):
    """Classifies a sequence (N, 20, 8) by the last hidden state of a one-layer LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = torch.nn.LSTM(8, 32, batch_first=True), torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def sequences() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 20, 8, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() * 2 + (x[:, :, 1].sum(1) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


KEYS = {  # one key per measure (the LSTM has no exact dimension: its numerical rank stands for the measure)
    "dimension": "geometry/train/batch_functional_dimension",
    "numerical_rank": "geometry/train/numerical_rank",
    "flatness": "geometry/flatness/max_eigenvalue",
    "alignment": "geometry/alignment/num_clusters",
}


def train(
    epochs: int, root: str, monitor: GeometryMonitor | None, model_name: str = "mnist"
) -> tuple[float, L.Trainer, dict]:
    """Fit the example from seed 0; return the wall time of ``fit``, the trainer and the final weights."""
    L.seed_everything(0, verbose=False)
    if model_name == "lstm":
        model, data = LSTMClassifier(), sequences()
    else:
        model, data = MNISTClassifier(), MNISTDataModule()
    trainer = L.Trainer(
        max_epochs=epochs, check_val_every_n_epoch=10, log_every_n_steps=1, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        logger=TensorBoardLogger(root, name="with" if monitor else "without"),
        callbacks=[monitor] if monitor else [],
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    return seconds, trainer, {k: v.clone() for k, v in model.state_dict().items()}


def points(trainer: L.Trainer) -> dict[str, list[int]]:
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    return {m: [e.step for e in acc.Scalars(k)] if k in tags else [] for m, k in KEYS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=680, help="training epochs (configs/mnist.yaml: 680)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of runs without and with the monitor")
    parser.add_argument("--max-overhead", default="0.05",
                        help="the monitor's max_overhead, 'none', or 'empty' (an empty Callback in its place)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", choices=["mnist", "lstm"], default="mnist", help="the MNIST example or an LSTM")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    empty = args.max_overhead.lower() == "empty"
    max_overhead = None if args.max_overhead.lower() in ("none", "empty") else float(args.max_overhead)
    warnings.filterwarnings("ignore")  # Lightning's tips; the monitor's skip warning is summarised below

    def monitor() -> L.Callback:
        if empty:  # Lightning calls each hook of every callback at every batch: the floor of any callback's cost
            return L.Callback()
        if args.model == "lstm":
            return GeometryMonitor(max_overhead=max_overhead)
        return GeometryMonitor(loss_fn=softmax_cross_entropy, max_overhead=max_overhead)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = (f"LSTM classifier, {args.epochs} epochs x 32 steps (2,048 sequences, batch 64); GeometryMonitor("
            f"max_overhead={max_overhead})" if args.model == "lstm" else
            f"MNIST example, {args.epochs} epochs x 3 steps (600 images, batch 256); GeometryMonitor(loss_fn="
            f"softmax_cross_entropy, max_overhead={max_overhead})")
    print(f"{what}, other arguments default; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"{os.cpu_count()} CPUs, load avg {load:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as root:
        train(1, root, None, args.model), train(1, root, monitor(), args.model)  # warm-up: imports, first calls
        without, with_, runs = [], [], []
        for i in range(args.pairs):
            mon = monitor()
            if i % 2 == 0:
                t0, _, w0 = train(args.epochs, root, None, args.model)
                t1, trainer, w1 = train(args.epochs, root, mon, args.model)
            else:
                t1, trainer, w1 = train(args.epochs, root, mon, args.model)
                t0, _, w0 = train(args.epochs, root, None, args.model)
            without.append(t0)
            with_.append(t1)
            identical = all(torch.equal(w0[k], w1[k]) for k in w0)
            account = mon.state_dict()["overhead"] if not empty else {"measuring_s": 0.0, "other_s": t1}
            runs.append((trainer, account, identical))
            pts = points(trainer)
            print(f"pair {i + 1}: without {t0:7.2f} s  with {t1:7.2f} s  -> overhead {t1 / t0 - 1:+6.1%}  "
                  f"points: " + ", ".join(f"{m} {len(s)} at steps {s}" for m, s in pts.items())
                  + f"  | monitor's account: measuring {account['measuring_s']:.2f} s / rest "
                  f"{account['other_s']:.2f} s = {account['measuring_s'] / account['other_s']:.1%}"
                  f"  | weights bit-identical: {identical}", flush=True)
    med0, med1 = statistics.median(without), statistics.median(with_)
    overheads = [b / a - 1 for a, b in zip(without, with_, strict=True)]
    shares = [r[1]["measuring_s"] / r[1]["other_s"] for r in runs]
    print(f"median overhead over {args.pairs} pairs {statistics.median(overheads):+.1%} (target <= +5%); "
          f"median times without {med0:.2f} s, with {med1:.2f} s -> ratio {med1 / med0:.3f}; monitor's own "
          f"measuring share, median {statistics.median(shares):.1%}; weights bit-identical in every pair: "
          f"{all(r[2] for r in runs)}")


if __name__ == "__main__":
    main()
