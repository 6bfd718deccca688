"""Benchmark the exact dimension (the default call) against the float Gram engine and the authors' method.

The paper's MLP [784, 30, 30, 30, 10] (P = 25,720) with a softmax head, as ``examples/mnist.py`` builds it, at
two sets of weights: its initialisation (seed 0) and after ``configs/mnist.yaml``'s training (680 epochs of SGD
on the 600 training images, seed 0; trained here once and cached with ``--weights``). Probes: the first N of
the example's training images (N ≤ 600) or of its test images (N > 600), pixels / 255. For each weights × N,
measured in the same process with the same thread count, alternating the order of the engines:

* default: ``batch_functional_dimension(model, x)`` — the exact engine, the batch functional dimension;
* gram: ``engine="gram"`` — float64 Gram of the logit differences' J, its eigenvalues, the numerical rank;
* authors (``--authors-up-to``, default 200): the authors' method on the softmax output itself: dense float64
  Jacobian (``torch.func.jacrev``, vectorised: faster than their TensorFlow row loop), ``torch.linalg.svdvals``,
  numpy's rule σ > σ_max · max(M, P) · eps.

It prints the median wall time of each (``--repeats``), the ranks, and the ratios default / gram and
authors / default. Examples::

    python benchmarks/bench_bfd.py                          # trains once (~4 min), then N = 200, 600, 2000
    python benchmarks/bench_bfd.py --sizes 200 600 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/ is not a package
from mnist import MNISTClassifier, MNISTDataModule

from lightning_geomdim import batch_functional_dimension


def trained_weights(path: Path) -> dict[str, torch.Tensor]:
    """The example's weights after configs/mnist.yaml's 680 epochs (seed 0), cached at ``path``."""
    if path.exists():
        return torch.load(path)
    import lightning as L

    L.seed_everything(0, verbose=False)
    model, data = MNISTClassifier(), MNISTDataModule()
    trainer = L.Trainer(max_epochs=680, check_val_every_n_epoch=10, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, data)
    print(f"trained 680 epochs in {time.perf_counter() - start:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.state_dict()


def authors_rank(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Dense float64 Jacobian of the softmax output, its singular values, numpy's rank rule."""
    net = MNISTClassifier()
    net.load_state_dict(model.state_dict())
    net = net.double().eval()
    params = {n: p.detach() for n, p in net.named_parameters()}
    x64 = x.double()

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(net, p, (x64,)).reshape(-1)

    blocks = torch.func.jacrev(f)(params)
    jac = torch.cat([b.reshape(b.shape[0], -1) for b in blocks.values()], dim=1)
    del blocks
    sv = torch.linalg.svdvals(jac)
    return int((sv > sv[0] * max(jac.shape) * np.finfo(np.float64).eps).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 600, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--authors-up-to", type=int, default=200, help="largest N for the authors' method")
    parser.add_argument("--weights", type=Path, default=Path("lightning_logs/bench_bfd_trained.pt"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = MNISTDataModule()
    data.setup("fit")
    probes = data.probe_inputs()
    torch.manual_seed(0)
    init = MNISTClassifier().state_dict()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians of {args.repeats} alternated runs")
    print("weights  | N    | default (exact): rank, s | gram: numerical rank, s | authors: rank, s | default/gram | "
          "authors/default")
    for label, weights in (("init", init), ("trained", trained_weights(args.weights))):
        model = MNISTClassifier()
        model.load_state_dict(weights)
        model.eval()
        for n in args.sizes:
            x = (probes["train"] if n <= 600 else probes["test"])[:n]
            runs: dict[str, list[float]] = {"default": [], "gram": [], "authors": []}
            ranks: dict[str, int] = {}
            engines = ["default", "gram"] + (["authors"] if n <= args.authors_up_to else [])
            for r in range(args.repeats):
                for engine in engines if r % 2 == 0 else engines[::-1]:
                    start = time.perf_counter()
                    if engine == "authors":
                        ranks[engine] = authors_rank(model, x)
                    else:
                        res = batch_functional_dimension(model, x, **({} if engine == "default" else
                                                                      {"engine": "gram"}))
                        ranks[engine] = res.rank
                        assert (res.engine == "exact") == (engine == "default")
                    runs[engine].append(time.perf_counter() - start)
            med = {k: statistics.median(v) for k, v in runs.items() if v}
            authors = f"{ranks['authors']}, {med['authors']:.1f}" if "authors" in med else "–"
            speedup = f"{med['authors'] / med['default']:.1f}×" if "authors" in med else "–"
            print(f"{label:8s} | {n:4d} | {ranks['default']}, {med['default']:.1f} | {ranks['gram']}, "
                  f"{med['gram']:.1f} | {authors} | {med['default'] / med['gram']:.2f} | {speedup}", flush=True)


if __name__ == "__main__":
    main()
