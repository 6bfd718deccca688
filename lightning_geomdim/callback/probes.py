"""Probe batches: fixed sets of inputs, chosen once at fit start and measured for the whole run.

Sources:

* ``"train"`` / ``"val"``: ``size`` samples of the training / validation *dataset*, picked by index with a
  private ``torch.Generator`` seeded from the monitor's seed and the probe's name, and collated with the
  dataloader's own ``collate_fn``. The dataloader is never iterated, so its sampler, its workers and the
  shuffling order of training are untouched; the global RNGs (torch CPU/CUDA, ``random``, numpy) are
  saved and restored around the dataset reads, in case ``__getitem__`` draws random augmentations.
  The batch-transfer hooks of the LightningModule are not applied: preprocessing that the model needs
  must happen in the dataset, the ``collate_fn`` or ``input_fn``.
* ``"random"``: i.i.d. Gaussian inputs N(mean, std²) with the per-sample shape and dtype of the first
  dataset probe's input (or ``shape``), for the computable full functional dimension; no targets. For
  integer inputs (token ids) Gaussian values make no sense: with ``high`` (the vocabulary size) the probe
  draws ids uniformly in [``low``, ``high``) with the input's shape and dtype; without it the probe is
  refused. A random probe imitates a single input tensor: for tuple/dict inputs use a tensor probe.
* ``"tensor"``: user tensors ``x`` (and optionally ``y``), Python API only (not expressible in YAML).

The indices (or the seed) of each probe are the state saved in checkpoints, so a resumed run measures
exactly the same inputs. :mod:`.probe_set` builds the monitor's probes from a Trainer with these functions.
Part of the Lightning layer: Lightning gives ``MisconfigurationException`` and ``apply_to_collection``.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_geomdim.callback.probe_spec import ProbeSpec

INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images")
TARGET_KEYS: tuple[str, ...] = ("y", "target", "targets", "label", "labels")


def _named(batch: Any, keys: Sequence[str]) -> Any:
    """A namedtuple with a field among ``keys`` as a dict of its fields (read by name); else ``batch``."""
    if isinstance(batch, tuple) and hasattr(batch, "_asdict") and any(k in batch._fields for k in keys):
        return batch._asdict()
    return batch


def default_input_fn(batch: Any) -> Any:
    """The model input of a batch: the batch itself if a Tensor, the first item of a tuple/list, the first of
    the dict keys (or namedtuple fields) ``"x"``, ``"input"``, ``"inputs"``, ``"image"``, ``"images"``, or else
    (Hugging Face style batches such as ``{"input_ids", "attention_mask", "labels"}`` or ``{"pixel_values",
    "labels"}``) the dict without its target keys, passed to the model as keyword inputs (``model(**inputs)``)."""
    if isinstance(batch, Tensor):
        return batch
    batch = _named(batch, INPUT_KEYS)
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        if inputs:
            return inputs
        raise MisconfigurationException(
            f"the batch is a dict with only target keys {sorted(batch)}: pass GeometryMonitor(input_fn=...) "
            "returning the model input: a tensor, a tuple (positional inputs) or a dict (keyword inputs)"
        )
    raise MisconfigurationException(
        f"cannot find the model input in a batch of type {type(batch).__name__}: pass "
        "GeometryMonitor(input_fn=...) returning the model input from a batch: a tensor, a tuple (positional "
        "inputs) or a dict (keyword inputs, e.g. input_fn=lambda b: {'input_ids': b.ids, 'attention_mask': "
        "b.mask})"
    )


def default_target_fn(batch: Any) -> Any:
    """The target of a batch: the second item of a tuple/list, the first of the dict keys (or namedtuple
    fields) ``"y"``, ``"target"``, ``"targets"``, ``"label"``, ``"labels"``; ``None`` when there is none."""
    batch = _named(batch, TARGET_KEYS)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in TARGET_KEYS if k in batch), None)
    return None


def probe_seed(seed: int, name: str) -> int:
    """The seed of probe ``name``: independent of the order and number of the other probes."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def select_indices(dataset_len: int, size: int, seed: int) -> list[int]:
    """``min(size, dataset_len)`` distinct indices in [0, dataset_len), sorted, from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(dataset_len, generator=generator)[:size].tolist())


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Save and restore every global RNG a dataset's ``__getitem__`` might draw from."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@dataclass
class Probe:
    """A probe batch, fixed for the run; tensors stay on the CPU between measurements.

    Attributes:
        name, source: as in :class:`ProbeSpec`.
        x: model input, Tensor (N, ...) or a tuple/dict of them, as returned by ``input_fn``.
        y: targets (N, ...) or ``None`` (random probes, unlabeled data).
        state: what reproduces the probe: ``indices`` (dataset probes) or ``seed``/``shape`` (random).
        logit_differences, spectrum: how the dimension is measured on it, as in :class:`ProbeSpec`.
        fit_memory: the default size, which may shrink to fit the memory budget (:class:`ProbeSpec`).
        planned: the measures the monitor takes on this probe during the run (set at train start): a default-size
            probe is fitted to all of them at once.
    """

    name: str
    source: str
    x: Any
    y: Tensor | None
    state: dict[str, Any]
    logit_differences: bool = True
    spectrum: bool | None = None
    fit_memory: bool = False
    planned: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return int(_lead(self.x).shape[0])

    def keep_first(self, n: int) -> None:
        """Keep the first ``n`` samples (a prefix: a resumed run that shrinks the rebuilt probe alike measures the
        same inputs)."""
        self.x = apply_to_collection(self.x, Tensor, lambda t: t[:n])
        self.y = None if self.y is None else self.y[:n]


def _lead(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise MisconfigurationException(
        f"the probe input has type {type(x).__name__} and contains no tensor: input_fn must return the model "
        "input as a Tensor (N, ...), or a tuple/dict of tensors"
    )


def _detach_cpu(x: Any) -> Any:
    """``x`` (tensors nested in dicts, lists, tuples, namedtuples, dataclasses) detached, on the CPU."""
    return apply_to_collection(x, Tensor, lambda t: t.detach().cpu())


def _options(spec: ProbeSpec) -> dict[str, Any]:
    return {"logit_differences": spec.logit_differences, "spectrum": spec.spectrum, "fit_memory": spec.fit_memory}


def nth_dataloader(loaders: Any, idx: int = 0) -> DataLoader | None:
    """The ``idx``-th DataLoader of a dataloader or a (nested) dict/list of them; ``None`` if there is none."""
    flat: list[Any] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, Mapping):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
        elif obj is not None:
            flat.append(obj)

    walk(loaders)
    return flat[idx] if idx < len(flat) else None


def dataset_probe(
    spec: ProbeSpec, loader: DataLoader, input_fn: Callable[[Any], Any], target_fn: Callable[[Any], Any],
    seed: int, saved: Mapping[str, Any] | None = None,
) -> Probe:
    """Pick ``spec.size`` samples of ``loader.dataset`` by index (or the ``saved`` indices) and collate them."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise MisconfigurationException(
            f"probe {spec.name!r}: the {spec.source} dataset ({type(dataset).__name__}) cannot be indexed, so "
            "samples cannot be drawn without iterating the dataloader: pass a map-style dataset, or a tensor "
            "probe {'name': ..., 'x': tensor, 'y': tensor}"
        )
    if getattr(loader, "batch_size", 1) is None and getattr(loader, "batch_sampler", None) is None:
        raise MisconfigurationException(
            f"probe {spec.name!r}: the {spec.source} dataloader has batch_size=None (the dataset yields whole "
            "batches), so single samples cannot be picked: pass a tensor probe {'name': ..., 'x': tensor}"
        )
    n = len(dataset)
    if saved is not None:
        indices = [int(i) for i in saved["indices"]]
        if indices and max(indices) >= n:
            raise MisconfigurationException(
                f"probe {spec.name!r}: the checkpoint's probe indices go up to {max(indices)} but the {spec.source} "
                f"dataset has {n} samples: resume with the same dataset, or start a new run"
            )
    else:
        indices = select_indices(n, spec.size, probe_seed(seed, spec.name))
    if not indices:
        raise MisconfigurationException(f"probe {spec.name!r}: the {spec.source} dataset is empty")
    with isolated_rng(), torch.no_grad():
        batch = loader.collate_fn([dataset[i] for i in indices])
        x, y = _detach_cpu(input_fn(batch)), _detach_cpu(target_fn(batch))
    _lead(x)
    if y is not None and not isinstance(y, Tensor):
        raise MisconfigurationException(
            f"probe {spec.name!r}: target_fn returned {type(y).__name__}; return a Tensor (N, ...) or None"
        )
    return Probe(spec.name, spec.source, x, y, {"source": spec.source, "indices": indices}, **_options(spec))


def input_template(loader: DataLoader, input_fn: Callable[[Any], Any]) -> Any:
    """The model input of the first sample of ``loader.dataset`` (shape (1, ...)), for random probes to imitate."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not len(dataset):
        return None
    with isolated_rng(), torch.no_grad():
        return _detach_cpu(input_fn(loader.collate_fn([dataset[0]])))


def random_probe(spec: ProbeSpec, template: Any, seed: int, saved: Mapping[str, Any] | None = None) -> Probe:
    """Random inputs shaped like one sample of ``template`` (a Tensor) or ``spec.shape``: Gaussian for floating
    inputs, uniform ids in [``spec.low``, ``spec.high``) for integer inputs (token ids).

    Raises:
        MisconfigurationException: nothing to imitate; a tuple/dict input; integer inputs without ``high``;
            ``high`` for floating inputs.
    """
    if saved is not None:
        shape, size, gseed = tuple(saved["shape"]), int(saved["size"]), int(saved["seed"])
        dtype = getattr(torch, str(saved.get("dtype", "float32")))
        low, high = int(saved.get("low", 0)), saved.get("high")
        mean, std = float(saved.get("mean", spec.mean)), float(saved.get("std", spec.std))
    else:
        low, high, mean, std = spec.low, spec.high, spec.mean, spec.std
        if spec.shape is not None:
            shape, dtype = spec.shape, torch.float32 if high is None else torch.int64
        elif isinstance(template, Tensor):
            shape, dtype = tuple(template.shape[1:]), template.dtype
        elif template is None:
            raise MisconfigurationException(
                f"random probe {spec.name!r} has no data to imitate (no train/val/tensor probe, no indexable "
                "training dataset): give the probe a 'shape', e.g. {'source': 'random', 'shape': [784]}"
            )
        else:
            raise MisconfigurationException(
                f"random probe {spec.name!r} imitates a single input tensor, but the model input is a "
                f"{type(template).__name__}: use a tensor probe {{'name': ..., 'x': <inputs of the same structure>}}, "
                "or drop the random probe"
            )
        if dtype.is_floating_point and high is not None:
            raise MisconfigurationException(
                f"random probe {spec.name!r}: 'high' is for integer inputs (token ids), but the model input is "
                f"{dtype}: drop 'high' (floating inputs are Gaussian, set by 'mean' and 'std')"
            )
        if not dtype.is_floating_point and high is None:
            raise MisconfigurationException(
                f"random probe {spec.name!r}: the model input is a {dtype} tensor (token ids), for which Gaussian "
                "inputs make no sense: give the vocabulary, e.g. {'source': 'random', 'high': <vocabulary size>} "
                "draws ids uniformly in [low, high) (low: 0 by default), or drop the random probe"
            )
        size, gseed = spec.size, probe_seed(seed, spec.name)
    generator = torch.Generator().manual_seed(gseed)
    state: dict[str, Any] = {"source": "random", "seed": gseed, "size": size, "shape": list(shape),
                             "dtype": str(dtype).removeprefix("torch.")}
    if dtype.is_floating_point:
        x = (torch.randn((size, *shape), generator=generator, dtype=torch.float64) * std + mean).to(dtype)
        state.update(mean=mean, std=std)
    else:
        x = torch.randint(low, int(high), (size, *shape), generator=generator, dtype=dtype)
        state.update(low=low, high=int(high))
    return Probe(spec.name, "random", x, None, state, **_options(spec))


def tensor_probe(spec: ProbeSpec) -> Probe:
    """The user's tensors, detached and on the CPU."""
    x, y = _detach_cpu(spec.x), _detach_cpu(spec.y)
    lead = _lead(x)
    if y is not None and (not isinstance(y, Tensor) or y.shape[0] != lead.shape[0]):
        raise MisconfigurationException(
            f"probe {spec.name!r}: y must be a Tensor with as many samples as x ({lead.shape[0]})"
        )
    return Probe(spec.name, "tensor", x, y, {"source": "tensor", "num_samples": int(lead.shape[0])}, **_options(spec))
