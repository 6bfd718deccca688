"""The authors' findings 2–4 as sweeps of the MNIST example: width, input noise, corrupted labels.

Bona-Pellissier, Malgouyres, Bachoc (arXiv 2402.08269) list four findings; the first (the dimension during
learning) is ``configs/mnist.yaml``. This driver trains the MNIST example (``examples/mnist.py``) once per setting
through LightingCLI, from ``configs/sweep.yaml`` with the setting applied, and reads back from each run's
TensorBoard events the dimension after learning on the 600 training images:

* ``width``: MLP [784, w, w, w, 10] for w in 2 … 50. The exact BFD is bounded by min(N·(K − 1), P − hidden) with
  N·(K − 1) = 5,400: for w ≤ 6, P − hidden (1,606 … 4,846) is the smaller one; from w = 8 on the rows are.
  Finding 2: the dimension after learning first increases with the width, then becomes stable.
* ``noise``: Gaussian noise of standard deviation σ added once to the training pixels (pixels / 255), at w = 4
  (P − hidden = 3,218 < 5,400), 12 and 30 (9,826 and 25,630 > 5,400). Finding 3: the dimension increases with σ.
* ``labels``: that many training labels replaced by a wrong one, at w = 4, 12 and 30. Finding 4: for large
  networks the dimension increases with the number of corrupted samples.

::

    python examples/sweeps.py width    # or noise, labels, all; options --epochs 680 --out lightning_logs/sweeps

Prints one Markdown table per sweep and writes it, with the raw values, to ``<out>/<sweep>.md`` and
``<out>/results.json`` (a setting already in results.json is not trained again: delete the file to start over).
Columns: exact BFD / its bound, the numerical rank of the same Jacobian (logit differences) and of the softmax
probabilities, the training loss and the training / test accuracy after learning, and the run's wall time.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ is not a package
import mnist

ROOT = Path(__file__).resolve().parents[1]
LARGE = 30
#: Widths of the noise and label sweeps: 4 (P − hidden = 3,218 < 5,400 rows), 30 (the paper's; 25,630 > 5,400) and
#: 12 (9,826 > 5,400), added after the first sweep showed w = 30 at its row bound and w = 4 far below both bounds:
#: w = 12 ended below both bounds in the width sweep (4,759), so the exact dimension has room to move both ways.
NOISE_WIDTHS = (4, 12, 30)
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "width": [{"width": w} for w in (2, 4, 6, 8, 12, 20, 30, 50)],
    "noise": [{"width": w, "input_noise": s} for w in NOISE_WIDTHS for s in (0.0, 0.1, 0.3, 1.0)],
    "labels": [{"width": w, "corrupted_labels": c} for w in NOISE_WIDTHS for c in (0, 60, 150, 300)],
}
#: TensorBoard tags read after learning, and their column names.
TAGS = {
    "bfd": "geometry/train/batch_functional_dimension",
    "bound": "geometry/train/upper_bound",
    "numerical_rank": "geometry/train/numerical_rank",
    "softmax_numerical_rank": "geometry/train_softmax/numerical_rank",
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "test_accuracy": "test/accuracy",
}


def key(setting: dict[str, Any], epochs: int) -> str:
    full = {"width": LARGE, "input_noise": 0.0, "corrupted_labels": 0, **setting, "epochs": epochs}
    return f"w{full['width']}_noise{full['input_noise']:g}_labels{full['corrupted_labels']}_epochs{full['epochs']}"


def config_for(setting: dict[str, Any], epochs: int, out: Path) -> dict[str, Any]:
    """configs/sweep.yaml with the setting, the epoch count and the log folder applied."""
    config = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "sweep.yaml").read_text()))
    w = setting.get("width", LARGE)
    config["model"]["widths"] = [784, w, w, w, 10]
    config["data"]["input_noise"] = float(setting.get("input_noise", 0.0))
    config["data"]["corrupted_labels"] = int(setting.get("corrupted_labels", 0))
    config["trainer"]["max_epochs"] = epochs
    config["trainer"]["check_val_every_n_epoch"] = epochs
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out), name=key(setting, epochs))
    (monitor,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("GeometryMonitor")]
    monitor["init_args"]["at_epochs"] = [epochs]
    return config


def last(acc: EventAccumulator, tag: str) -> float:
    return float(acc.Scalars(tag)[-1].value) if tag in acc.Tags()["scalars"] else float("nan")


def run(setting: dict[str, Any], epochs: int, out: Path) -> dict[str, Any]:
    """Train one setting through LightningCLI and read its values after learning back from its events."""
    path = out / f"{key(setting, epochs)}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_for(setting, epochs, out)))
    began = time.perf_counter()
    cli = mnist.main(["fit", "--config", str(path)])
    seconds = time.perf_counter() - began
    acc = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    values = {name: last(acc, tag) for name, tag in TAGS.items()}
    values["p_minus_hidden"] = last(acc, "geometry/train/num_params") - last(acc, "geometry/train/num_hidden_neurons")
    return {**setting, **values, "seconds": round(seconds, 1), "log_dir": cli.trainer.logger.log_dir}


def table(name: str, rows: list[dict[str, Any]]) -> str:
    varied = {"width": "", "noise": "input noise σ", "labels": "corrupted labels"}[name]
    field = {"width": "width", "noise": "input_noise", "labels": "corrupted_labels"}[name]
    first = "| w |" if name == "width" else f"| w | {varied} |"
    lines = [
        f"{first} P − hidden | exact BFD / bound | numerical rank (logit diff.) | numerical rank (softmax) "
        "| train loss | train acc. | test acc. | wall s |",
        "|" + "---|" * (first.count("|") - 1 + 8),
    ]
    for r in rows:
        cells = f"| {r['width']} |" if name == "width" else f"| {r['width']} | {r[field]:g} |"
        lines.append(
            f"{cells} {r['p_minus_hidden']:.0f} | "
            f"{r['bfd']:.0f} / {r['bound']:.0f} | {r['numerical_rank']:.0f} | {r['softmax_numerical_rank']:.0f} | "
            f"{r['train_loss']:.3g} | {r['train_accuracy']:.3f} | {r['test_accuracy']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", choices=[*SWEEPS, "all"])
    parser.add_argument("--epochs", type=int, default=680, help="training epochs per setting (the paper: 680)")
    parser.add_argument("--out", type=Path, default=Path("lightning_logs/sweeps"), help="logs and tables")
    args = parser.parse_args(argv)
    store = args.out / "results.json"
    results: dict[str, Any] = json.loads(store.read_text()) if store.exists() else {}
    began = time.perf_counter()
    for name in SWEEPS if args.sweep == "all" else [args.sweep]:
        rows = []
        for setting in SWEEPS[name]:
            k = key(setting, args.epochs)
            if k not in results:
                results[k] = run(setting, args.epochs, args.out)
                store.parent.mkdir(parents=True, exist_ok=True)
                store.write_text(json.dumps(results, indent=1))
            rows.append({**results[k], **setting})
        text = table(name, rows)
        (args.out / f"{name}.md").write_text(text + "\n")
        print(f"\n## {name} ({args.epochs} epochs)\n\n{text}\n", flush=True)
    print(f"sweeps done in {time.perf_counter() - began:.0f} s (runs already in {store} were not repeated)")


if __name__ == "__main__":
    main()
