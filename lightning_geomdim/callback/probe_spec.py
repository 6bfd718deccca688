"""What a probe is, as configured: :class:`ProbeSpec` from the ``probes`` argument (a name such as ``"train"``, or a
dict of options, as written in YAML), validated with messages that name the fix. :mod:`.probes` builds the probe
batches from them. Part of the Lightning layer: Lightning gives ``MisconfigurationException``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

SOURCES: tuple[str, ...] = ("train", "val", "random", "tensor")
RESERVED_NAMES: tuple[str, ...] = ("flatness", "alignment")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
#: Samples per probe when neither ``probe_size`` nor the probe's ``size`` is given: fewer when a measure on this
#: many would not fit the memory budget (``ProbeSpec.fit_memory``).
DEFAULT_PROBE_SIZE = 64
#: Most rows of J (samples × outputs per sample) a probe of the default size keeps: fewer samples when each has many
#: outputs (per-token outputs of a language model, 1,000 classes), so that a point costs seconds, not hours.
DEFAULT_MAX_ROWS = 4096


@dataclass(frozen=True)
class ProbeSpec:
    """What a probe is, as configured (serialisable except for ``x``/``y`` of a tensor probe).

    Attributes:
        name: key prefix of the probe's metrics (``geometry/<name>/...``).
        source: one of ``"train"``, ``"val"``, ``"random"``, ``"tensor"``.
        size: number of samples N (dataset and random probes).
        dataloader_idx: which dataloader when there are several (in their flattened order).
        mean, std: of the Gaussian inputs (random probes).
        shape: per-sample input shape of a random probe; default that of the first dataset probe.
        low, high: range [low, high) of the uniform token ids of a random probe on integer inputs; ``high``
            (the vocabulary size) is required there and refused for floating inputs.
        x, y: the user's tensors (tensor probes); ``x`` is a Tensor (N, ...), a tuple or a dict of them.
        logit_differences: measure a softmax / log-softmax head on its logit differences (default, the same row
            space as the softmax output's J); ``False`` measures the probabilities themselves, which only a
            floating-point engine can do: such a probe logs a ``numerical_rank`` (it collapses when the softmax
            saturates) and no ``batch_functional_dimension``.
        spectrum: log the floating-point spectrum on this probe (``numerical_rank`` ...); ``None``: the monitor's
            ``spectrum`` argument. ``False`` on a large probe saves a float Gram eigendecomposition.
        fit_memory: ``size`` is the default (:data:`DEFAULT_PROBE_SIZE`, neither ``probe_size`` nor ``size`` given):
            the probe keeps its first samples, the most within :data:`DEFAULT_MAX_ROWS` rows of J and the most on
            which the traced pass and the measures fit the memory budget (one warning), instead of the measure being
            refused.
    """

    name: str
    source: str
    size: int
    dataloader_idx: int = 0
    mean: float = 0.0
    std: float = 1.0
    shape: tuple[int, ...] | None = None
    low: int = 0
    high: int | None = None
    x: Any = field(default=None, repr=False, compare=False)
    y: Any = field(default=None, repr=False, compare=False)
    logit_differences: bool = True
    spectrum: bool | None = None
    fit_memory: bool = False

    @staticmethod
    def parse(item: str | Mapping[str, Any], default_size: int | None) -> ProbeSpec:
        """``"train"`` / ``"val"`` / ``"random"``, or a dict with ``name``, ``source`` and options; ``default_size``
        ``None``: :data:`DEFAULT_PROBE_SIZE`, fitted to the memory budget."""
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, Mapping):
            raise MisconfigurationException(
                f"a probe must be 'train', 'val', 'random' or a dict such as {{'name': 'big_random', 'source': "
                f"'random', 'size': 2000}} or {{'name': 'mine', 'x': tensor}}, got {type(item).__name__}"
            )
        allowed = {"name", "source", "size", "dataloader_idx", "mean", "std", "shape", "low", "high", "x", "y",
                   "logit_differences", "spectrum"}
        unknown = sorted(set(item) - allowed)
        if unknown:
            raise MisconfigurationException(f"unknown probe keys {unknown}: use only {sorted(allowed)}")
        source = item.get("source", "tensor" if "x" in item else None)
        if source not in SOURCES:
            raise MisconfigurationException(f"probe source {source!r} is invalid: use one of {SOURCES}")
        name = str(item.get("name", source))
        if not _NAME.match(name) or name in RESERVED_NAMES:
            raise MisconfigurationException(
                f"probe name {name!r} is invalid: use letters, digits, '_', '.', '-', and not {RESERVED_NAMES}"
            )
        if source == "tensor" and item.get("x") is None:
            raise MisconfigurationException(f"probe {name!r}: a tensor probe needs 'x' (the model input tensor)")
        if source != "tensor" and ("x" in item or "y" in item):
            raise MisconfigurationException(f"probe {name!r}: 'x'/'y' are only for source='tensor'")
        size = item.get("size", DEFAULT_PROBE_SIZE if default_size is None else default_size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MisconfigurationException(f"probe {name!r}: size={size!r} must be a positive integer")
        shape = item.get("shape")
        low, high = item.get("low", 0), item.get("high")
        if ("low" in item or "high" in item) and source != "random":
            raise MisconfigurationException(f"probe {name!r}: 'low'/'high' are only for source='random'")
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (low, high) if v is not None) or (
            high is not None and high <= low
        ):
            raise MisconfigurationException(
                f"probe {name!r}: low={low!r}, high={high!r} must be integers with low < high (token ids are drawn "
                "in [low, high)), e.g. {'source': 'random', 'high': 30522}"
            )
        logit_differences, spectrum = item.get("logit_differences", True), item.get("spectrum")
        for key, value in (("logit_differences", logit_differences), ("spectrum", spectrum)):
            if not isinstance(value, bool) and not (key == "spectrum" and value is None):
                raise MisconfigurationException(f"probe {name!r}: {key}={value!r} must be true or false")
        return ProbeSpec(
            name=name, source=source, size=size, dataloader_idx=int(item.get("dataloader_idx", 0)),
            mean=float(item.get("mean", 0.0)), std=float(item.get("std", 1.0)),
            shape=tuple(int(s) for s in shape) if shape is not None else None, low=low, high=high,
            x=item.get("x"), y=item.get("y"), logit_differences=logit_differences,
            spectrum=spectrum, fit_memory=default_size is None and "size" not in item and source != "tensor",
        )


def parse_probes(probes: Sequence[str | Mapping[str, Any]], default_size: int | None) -> list[ProbeSpec]:
    """Validate the ``probes`` argument; names must be unique."""
    if isinstance(probes, (str, Mapping)):
        probes = [probes]
    specs = [ProbeSpec.parse(p, default_size) for p in probes]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MisconfigurationException(f"probe names must be unique, {dupes} repeat: give each a distinct 'name'")
    if not specs:
        raise MisconfigurationException("probes is empty: pass at least one, e.g. probes=['train']")
    return specs
