"""Flatness against curvlinops: top eigenvalues, Hutch++ trace, the cost of a default ``flatness()`` call, HVPs.

Models (float64, eval mode, cross-entropy on the logits, probes of MNIST images as ``examples/mnist.py`` loads
them, labels as targets):

* the paper's MLP [784, 30, 30, 30, 10] (P = 25,720) at its initialisation (seed 0) and after
  ``configs/mnist.yaml``'s training (680 epochs; ``bench_bfd.trained_weights``, cached in
  ``lightning_logs/bench_bfd_trained.pt``, trained once — about 2–4 minutes — when missing), N = ``--n`` images;
* a CNN (conv 8 → pool → conv 16 → pool → 32 → 10, P = 14,410) at initialisation, N = ``--n-cnn`` images;
* a BatchNorm MLP [784, 64, BN, 64, BN, 10] with Dropout (P = 55,306), running statistics from 20 training-mode
  passes, N = ``--n-bn`` images (default 100: the exact dimension engine does not apply to BatchNorm's
  parameters, so its flat dimension falls back to the dense-Jacobian engine, J of 10 N × P and its SVD).

Per model, timed round-robin in one process (order rotated each repeat, medians of ``--repeats``):

* **ours default**: ``flatness(model, F.cross_entropy, x, y)`` — everything at its default: top_k = 1, Hutch++
  with 99 HVPs, no flat dimension (by default it is reported only from a ``dimension=`` passed in, as
  GeometryMonitor does with its dimension measure's);
* **ours + flat dim**: the same with ``flat_dimension=True`` (one batch functional dimension more, exact engine);
* **ours k=5**: ``top_k=5, flat_dimension=False`` (the same work as the reference);
* **curvlinops**: ``HessianLinearOperator`` (``check_deterministic=False``, built inside the timing),
  ``scipy.sparse.linalg.eigsh(op.to_scipy(), k=5, which="LA")`` + ``hutchpp_trace(op, 99)``.

Then the agreement of the top-5 eigenvalues (ours k=5 against curvlinops' eigsh, |Δλ_i| / |λ_i|), the traces
(difference in units of our reported standard error; the two estimates are independent), and the time of one
Hessian-vector product (median of ``--hvps``) in four formulations: ours (reverse-over-reverse on the cached
gradient graph), a plain double backward that rebuilds the graph per product, forward-over-reverse
(``torch.func.jvp(grad(L))``, ours before), curvlinops' ``op @ v``; and of the trace's 33-product blocks per
product, ``chunk_size`` 1 (default) against 8.

curvlinops is a benchmark-only dependency. Its wheel requires backpack-for-pytorch, which pulls torchvision:
that breaks ``import lightning`` next to the CPU torch, so install it without dependencies, into a separate
directory, with its pure-Python imports (scipy, numpy and tqdm are in the venv already)::

    /work/venv/bin/pip install --no-deps --target /tmp/curvlinops-deps curvlinops-for-pytorch==3.0.1 \\
        einops einconv linear_operator opt_einsum jaxtyping wadler_lindig
    PYTHONPATH=/tmp/curvlinops-deps /work/venv/bin/python benchmarks/bench_flatness.py --threads 1

(backpack is only imported by curvlinops' ``experimental`` module, never here.) Without curvlinops the
reference columns are skipped and the eigenvalues are checked against ``eigsh`` on a plain-autograd HVP.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # examples/ is not a package
from bench_bfd import trained_weights
from mnist import MNISTClassifier, MNISTDataModule

from lightning_geomdim import flatness
from lightning_geomdim.core.functional_model import FunctionalModel, ProbeInputs, measurement_mode
from lightning_geomdim.core.hessian import HessianOperator, convert_targets
from lightning_geomdim.core.probe_trace import ProbeTrace

try:
    from curvlinops import HessianLinearOperator, hutchpp_trace
except ImportError:  # pragma: no cover - depends on the optional install above
    HessianLinearOperator = hutchpp_trace = None


def paper_mlp(weights: dict[str, Tensor] | None) -> nn.Module:
    torch.manual_seed(0)
    model = MNISTClassifier(output="logits")
    if weights is not None:
        model.load_state_dict(weights)
    return model.net


def cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def batchnorm_mlp(x: Tensor) -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(784, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 64), nn.BatchNorm1d(64),
        nn.ReLU(), nn.Linear(64, 10),
    )
    model.train()
    with torch.no_grad():
        for i in range(20):  # running statistics that are not the initial (0, 1)
            model(x[(i * 64) % len(x) :][:64] * 1.5 + 0.1)
    return model.eval()


def curvlinops_reference(model: nn.Module, x: Tensor, y: Tensor) -> tuple[np.ndarray, float, int]:
    """curvlinops' top-5 eigenvalues (eigsh), Hutch++ trace (99 products), and eigsh's number of products."""
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    scipy_op, count = op.to_scipy(), [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1
        return scipy_op.matvec(v)

    counted = sla.LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
    v0 = np.random.default_rng(0).standard_normal(op.shape[0])
    values = sla.eigsh(counted, k=5, which="LA", v0=v0, return_eigenvectors=False)
    trace = float(hutchpp_trace(op, 99))
    return np.sort(values)[::-1].copy(), trace, count[0]


def plain_reference(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """eigsh(k=5) on a plain double-backward HVP (graph rebuilt per product): the check without curvlinops."""
    params = [p for p in model.parameters() if p.requires_grad]

    def matvec(v: np.ndarray) -> np.ndarray:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        vs = torch.from_numpy(np.ascontiguousarray(v).reshape(-1)).split([p.numel() for p in params])
        dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, vs, strict=True))
        return torch.cat([h.reshape(-1) for h in torch.autograd.grad(dot, params)]).numpy()

    p = sum(q.numel() for q in params)
    op = sla.LinearOperator((p, p), matvec=matvec, dtype=np.float64)
    values = sla.eigsh(op, k=5, which="LA", v0=np.random.default_rng(0).standard_normal(p), return_eigenvectors=False)
    return np.sort(values)[::-1].copy()


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hvp_times(model: nn.Module, x: Tensor, y: Tensor, repeats: int) -> dict[str, float]:
    """Seconds per product, medians: the four formulations, and the trace's blocks with chunk_size 1 and 8."""
    out: dict[str, float] = {}
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model, dtype=torch.float64)
        inputs = ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)
        targets = convert_targets(y, dtype=torch.float64, device=fm.device)
        op = HessianOperator(ProbeTrace.record(fm, inputs), F.cross_entropy, targets)
        v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        leaf = op.theta.detach().requires_grad_(True)

        def plain() -> Tensor:
            (g,) = torch.autograd.grad(op.loss(leaf), leaf, create_graph=True)
            return torch.autograd.grad(g, leaf, v)[0]

        reference = op.matvec(v)
        for result in (plain(), op._forward(v)):
            torch.testing.assert_close(result, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
        order = ["ours", "double backward", "forward-over-reverse"]
        fns = {"ours": lambda: op.matvec(v), "double backward": plain, "forward-over-reverse": lambda: op._forward(v)}
        if HessianLinearOperator is not None:
            params = [p for p in model.parameters() if p.requires_grad]
            cl = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
            fns["curvlinops"] = lambda: cl @ v
            order.append("curvlinops")
        samples: dict[str, list[float]] = {k: [] for k in order}
        for r in range(repeats):
            for name in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - start)
        out.update({k: statistics.median(s) for k, s in samples.items()})
        block = torch.randn(op.num_params, 33, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for chunk in (1, 8):
            op.chunk_size = chunk
            out[f"block chunk {chunk}"] = median_time(lambda: op.matmat(block), max(1, repeats // 10)) / 33
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=600, help="probe size of the MLPs (the paper's 600 images)")
    parser.add_argument("--n-cnn", type=int, default=128, help="probe size of the CNN")
    parser.add_argument("--n-bn", type=int, default=100,
                        help="probe size of the BatchNorm MLP (its flat dimension needs the dense-Jacobian engine)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hvps", type=int, default=20, help="products timed per formulation")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["mlp-init", "mlp-trained", "cnn", "batchnorm"])
    parser.add_argument("--weights", type=Path, default=Path("lightning_logs/bench_bfd_trained.pt"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = MNISTDataModule()
    data.setup("fit")
    split = data._split()
    images = torch.cat([split.train_x, split.test_x]).double()
    labels = torch.cat([split.train_y, split.test_y])
    load = "unavailable" if HessianLinearOperator is None else "curvlinops-for-pytorch"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {len(os.sched_getaffinity(0))} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f}; reference: {load}; medians of {args.repeats} round-robin repeats",
          flush=True)
    rows = []
    for name in args.models:
        n = {"cnn": args.n_cnn, "batchnorm": args.n_bn}.get(name, args.n)
        x, y = images[:n].clone(), labels[:n].clone()
        if name == "mlp-init":
            model = paper_mlp(None)
        elif name == "mlp-trained":
            model = paper_mlp(trained_weights(args.weights))
        elif name == "cnn":
            model = cnn()
        elif name == "batchnorm":
            model = batchnorm_mlp(images[:1280].float())
        else:
            raise SystemExit(f"unknown model {name!r}")
        model = model.double().eval()
        p = sum(q.numel() for q in model.parameters())
        results: dict[str, Any] = {}
        runs: dict[str, Callable[[], Any]] = {
            "ours default": lambda m=model, x=x, y=y: flatness(m, F.cross_entropy, x, y),
            "ours flat dim": lambda m=model, x=x, y=y: flatness(m, F.cross_entropy, x, y, flat_dimension=True),
            "ours k=5": lambda m=model, x=x, y=y: flatness(m, F.cross_entropy, x, y, top_k=5, flat_dimension=False),
        }
        if HessianLinearOperator is not None:
            runs["curvlinops"] = lambda m=model, x=x, y=y: curvlinops_reference(m, x, y)
        order = list(runs)
        times: dict[str, list[float]] = {k: [] for k in order}
        for r in range(args.repeats):
            for key in order[r % len(order):] + order[: r % len(order)]:
                start = time.perf_counter()
                results[key] = runs[key]()
                times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v) for k, v in times.items()}
        ours5 = results["ours k=5"].top_eigenvalues.numpy()
        if HessianLinearOperator is not None:
            reference, reference_trace, eigsh_products = results["curvlinops"]
        else:
            reference, reference_trace, eigsh_products = plain_reference(model, x, y), float("nan"), 0
        relative = np.abs(ours5 - reference) / np.abs(reference)
        default = results["ours default"]
        z = (default.trace - reference_trace) / (np.sqrt(2) * default.trace_std_error)
        hvps = hvp_times(model, x, y, args.hvps)
        base = med.get("curvlinops", float("nan"))
        row = {
            "model": name, "N": n, "P": p, "default": med["ours default"], "flat dim": med["ours flat dim"],
            "k5": med["ours k=5"], "curvlinops": base, "max rel": float(relative.max()), "z": float(z),
            "lambda": reference, "converged": all(results[k].converged for k in ("ours default", "ours k=5")),
            "hvps_default": default.num_hvps, "hvps_k5": results["ours k=5"].num_hvps, "hvp": hvps,
            "dimension": results["ours flat dim"].functional_dimension,
        }
        rows.append(row)
        print(f"\n{name}: N = {n}, P = {p:,}; top-5 eigenvalues {np.array2string(reference, precision=6)}")
        print(f"  ours default {med['ours default']:.2f} s ({default.num_hvps} HVPs); ours + flat dim "
              f"{med['ours flat dim']:.2f} s (functional dimension {row['dimension']}); "
              f"ours k=5 {med['ours k=5']:.2f} s ({results['ours k=5'].num_hvps} HVPs); curvlinops {base:.2f} s "
              f"(eigsh {eigsh_products} + Hutch++ 99 HVPs)")
        print(f"  ratios to curvlinops: default {med['ours default'] / base:.2f}, + flat dim "
              f"{med['ours flat dim'] / base:.2f}, k=5 {med['ours k=5'] / base:.2f}; converged {row['converged']}")
        print(f"  eigenvalues: max |Δλ|/|λ| = {relative.max():.1e}; trace ours {default.trace:.6g} ± "
              f"{default.trace_std_error:.2g}, curvlinops {reference_trace:.6g} (z = {z:.2f})")
        print("  one HVP: " + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in hvps.items()), flush=True)

    print("\n| model | N | P | ours default | ours, flat_dimension=True | ours top_k=5 | curvlinops eigsh(5) + "
          "Hutch++(99) | default / curvlinops | + flat dim / curvlinops | k=5 / curvlinops | "
          "max \\|Δλ\\|/\\|λ\\| (top 5) | trace z |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["curvlinops"]
        print(f"| {r['model']} | {r['N']} | {r['P']:,} | {r['default']:.2f} s | {r['flat dim']:.2f} s | "
              f"{r['k5']:.2f} s | {c:.2f} s | **{r['default'] / c:.2f}** | {r['flat dim'] / c:.2f} | "
              f"{r['k5'] / c:.2f} | "
              f"{r['max rel']:.1e} | {r['z']:.2f} |")
    print("\n| model | ours (cached graph) | plain double backward | forward-over-reverse | curvlinops | "
          "trace block, chunk 1 | chunk 8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        h = r["hvp"]
        print(f"| {r['model']} | {1e3 * h['ours']:.2f} ms | {1e3 * h['double backward']:.2f} ms | "
              f"{1e3 * h['forward-over-reverse']:.2f} ms | {1e3 * h.get('curvlinops', float('nan')):.2f} ms | "
              f"{1e3 * h['block chunk 1']:.2f} ms | {1e3 * h['block chunk 8']:.2f} ms |")


if __name__ == "__main__":
    main()
