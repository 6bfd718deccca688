"""Check the Gram engine against the exact SVD at trained weights: the MNIST example's training probe.

At initialisation a 600-input probe is full rank with a clear gap, which any engine gets right. After training the
spectrum of J runs down smoothly and the rank depends on the resolution: the Gram engine thresholds √λ at σ_max ·
√(max(M, P) · eps) (2.4e-6 relative for the paper's MLP), the SVD engine (``engine="jacrev"``, the authors' method)
at σ_max · max(M, P) · eps (5.7e-12 relative). This script trains the example as ``configs/mnist.yaml`` does (seed
0, 680 epochs; without the monitor, which does not change the weights), then measures the softmax output's dimension
on the 600 training images with both engines and prints both ranks, their spectral gaps and how many singular values
lie between the two thresholds.

    python benchmarks/check_trained_rank.py              # ~1 min of training + ~11 min of SVD on 2 cores
    python benchmarks/check_trained_rank.py --epochs 170 --probe 300
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/ is not a package
from mnist import MNISTClassifier, MNISTDataModule

from lightning_geomdim import batch_functional_dimension


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=680)
    parser.add_argument("--probe", type=int, default=600, help="training images measured (at most 600)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    model, data = MNISTClassifier(), MNISTDataModule()
    trainer = L.Trainer(max_epochs=args.epochs, check_val_every_n_epoch=10, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, data)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s; "
          f"last train loss {float(trainer.callback_metrics.get('train/loss', float('nan'))):.4g}", flush=True)
    x = data.probe_inputs()["train"][: args.probe]
    results = {}
    for engine in ("gram", "jacrev"):
        start = time.perf_counter()
        res = batch_functional_dimension(model, x, engine=engine)
        results[engine] = res
        print(f"engine={engine:6s} rank {res.rank} (bound {res.upper_bound}, M {res.num_outputs}, P {res.num_params})"
              f" gap {res.spectrum.spectral_gap:.3g} tol/σ_max {res.spectrum.tolerance / res.spectrum.singular_values[0]:.2e}"
              f" in {time.perf_counter() - start:.1f} s", flush=True)
    sv = results["jacrev"].singular_values
    lo, hi = results["jacrev"].tolerance, results["gram"].tolerance
    between = int(((sv > lo) & (sv <= hi)).sum())
    print(f"singular values (SVD) between the SVD tolerance {lo:.3e} and the Gram tolerance {hi:.3e}: {between}; "
          f"rank difference jacrev − gram: {results['jacrev'].rank - results['gram'].rank}")


if __name__ == "__main__":
    main()
