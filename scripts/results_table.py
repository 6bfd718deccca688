"""Print a Markdown table of a GeometryMonitor run's dimension and bounds, read back from its TensorBoard events.

    python scripts/results_table.py lightning_logs/mnist/version_0 [--probes train test random]
        [--numerical train train_softmax]

One row per measured step: per probe the exact batch functional dimension / its upper bound, then the numerical
rank (float, with its tolerance rtol) of the ``--numerical`` probes, λ_max of the loss Hessian, the flat dimension,
and the training and test loss / accuracy last logged at or before that step (when the module logs
``train/loss``, ``test/accuracy``, ...). ``--changes`` keeps only the first and last rows and those where a
dimension changed (e.g. configs/saddle_to_saddle.yaml's 151 points).
"""

from __future__ import annotations

import argparse
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def series(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)} if tag in acc.Tags()["scalars"] else {}


def latest(values: dict[int, float], step: int) -> float:
    """The value logged last at or before ``step`` (NaN if none)."""
    before = [s for s in values if s <= step]
    return values[max(before)] if before else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir", help="a run's folder, e.g. lightning_logs/mnist/version_0")
    parser.add_argument("--probes", nargs="+", default=["train", "test", "random"])
    parser.add_argument("--numerical", nargs="*", default=["train", "train_softmax"],
                        help="probes whose numerical rank is shown")
    parser.add_argument("--steps-per-epoch", type=int, default=3, help="to label rows with epochs")
    parser.add_argument("--steps", type=int, nargs="*", help="only these measured steps")
    parser.add_argument("--changes", action="store_true",
                        help="only the first and last steps and those where a probe's dimension changed")
    args = parser.parse_args()
    acc = EventAccumulator(args.logdir, size_guidance={"scalars": 0})
    acc.Reload()
    dims = {p: series(acc, f"geometry/{p}/batch_functional_dimension") for p in args.probes}
    bounds = {p: series(acc, f"geometry/{p}/upper_bound") for p in args.probes}
    ranks = {p: series(acc, f"geometry/{p}/numerical_rank") for p in args.numerical}
    rtols = {p: series(acc, f"geometry/{p}/numerical_rank_rtol") for p in args.numerical}
    lmax, flat = series(acc, "geometry/flatness/max_eigenvalue"), series(acc, "geometry/flatness/flat_dimension")
    extra = {k: series(acc, k) for k in ("train/loss", "train/accuracy", "test/loss", "test/accuracy")}
    header = ["step (epoch)"] + [f"BFD {p} / bound" for p in args.probes]
    header += [f"numerical rank {p} (rtol)" for p in args.numerical] + ["λ_max", "P − BFD train"]
    header += [k for k, v in extra.items() if v]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    measured = sorted(set().union(*dims.values()))
    if args.changes:
        def changed(i: int) -> bool:
            before, now = measured[i - 1], measured[i]
            return any(d.get(before) != d.get(now) for d in dims.values())

        measured = [s for i, s in enumerate(measured) if i in (0, len(measured) - 1) or changed(i)]
    if args.steps:
        measured = [s for s in measured if s in set(args.steps)]
    for step in measured:
        cells = [f"{step} ({step // args.steps_per_epoch})"]
        for p in args.probes:
            cells.append(f"{dims[p][step]:.0f} / {bounds[p][step]:.0f}" if step in dims[p] else "–")
        for p in args.numerical:
            cells.append(f"{ranks[p][step]:.0f} ({rtols[p][step]:.1e})" if step in ranks[p] else "–")
        cells.append(f"{lmax[step]:.4g}" if step in lmax else "–")
        cells.append(f"{flat[step]:.0f}" if step in flat else "–")
        cells += [f"{latest(v, step):.4g}".replace("nan", "–") for v in extra.values() if v]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
