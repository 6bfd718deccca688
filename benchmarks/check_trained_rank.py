"""Three numbers called "the rank" on the trained MNIST example, and which one is the dimension.

Trains the example as ``configs/mnist.yaml`` does (seed 0, 680 epochs; without the monitor, which does not change
the weights; cached with ``--weights``), then measures, on its 600 training images:

* the default call on the softmax output: the exact batch functional dimension (exact engine);
* the default call on the logits (``model.net``);
* the float Gram engine's numerical rank, of the logit differences (what float engines measure by default) and
  of the softmax output itself (``logit_differences=False``), with the median non-maximal probability;
* with ``--svd``, the dense float64 SVD of the softmax output itself (the authors' method; ~11 min on 2 cores).

    python benchmarks/check_trained_rank.py
    python benchmarks/check_trained_rank.py --svd
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_bfd import trained_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/ is not a package
from mnist import MNISTClassifier, MNISTDataModule

from lightning_geomdim import batch_functional_dimension


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=int, default=600, help="training images measured (at most 600)")
    parser.add_argument("--svd", action="store_true", help="also the dense SVD of the softmax output (slow)")
    parser.add_argument("--weights", type=Path, default=Path("lightning_logs/bench_bfd_trained.pt"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    model = MNISTClassifier()
    model.load_state_dict(trained_weights(args.weights))
    model.eval()
    x = MNISTDataModule().probe_inputs()["train"][: args.probe]
    with torch.no_grad():
        probs = torch.softmax(model.net(x), dim=-1).double()
    non_max = probs.sort(dim=-1).values[:, :-1]
    print(f"softmax probabilities: median non-maximal {float(non_max.median()):.2g}, "
          f"{float((probs < 1e-8).double().mean()):.0%} below 1e-8", flush=True)
    runs = [
        ("default call, softmax output", model, {}),
        ("default call, logits (model.net)", model.net, {}),
        ("engine='gram', softmax head as logit differences", model, {"engine": "gram"}),
        ("engine='gram', softmax output itself", model, {"engine": "gram", "logit_differences": False}),
    ]
    if args.svd:
        runs.append(("engine='jacrev', softmax output itself", model, {"engine": "jacrev", "logit_differences": False}))
    for label, module, kwargs in runs:
        start = time.perf_counter()
        res = batch_functional_dimension(module, x, **kwargs)
        took = time.perf_counter() - start
        what = "dimension (exact)" if res.exact else (
            f"numerical rank (tolerance {res.spectrum.rtol:.2e} σ_max, resolution {res.spectrum.resolution:.2e}, "
            f"gap {res.spectrum.spectral_gap:.3g})"
        )
        print(f"{label}: {res.rank} = {what}; bound {res.upper_bound}, engine {res.engine}, {took:.1f} s", flush=True)


if __name__ == "__main__":
    main()
