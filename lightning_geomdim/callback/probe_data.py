"""What one probe's measures share at one measurement step: its batch on the model's device, one traced pass
(:class:`~lightning_geomdim.core.probe_trace.ProbeTrace`), and the refusals estimated from its first sample before
that pass (:mod:`lightning_geomdim.core.preflight`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_geomdim.callback.probe_spec import DEFAULT_MAX_ROWS
from lightning_geomdim.callback.probes import Probe
from lightning_geomdim.core.errors import MemoryBudgetError, Remedy
from lightning_geomdim.core.memory import check_memory, format_bytes, largest_fitting, memory_budget
from lightning_geomdim.core.preflight import dimension_bytes, flatness_bytes, trace_bytes
from lightning_geomdim.core.probe_trace import ProbeTrace

if TYPE_CHECKING:
    from lightning_geomdim.callback.measures import MeasureSettings


#: What else helps when a measure's estimate from one sample exceeds the budget (besides a smaller probe).
PREFLIGHT_REMEDIES = {
    "dimension": (Remedy("a subset of parameters via {arg}=[...]", "params"),),
    "flatness": (Remedy("lower {arg}", "trace_samples"), Remedy("a subset of parameters via {arg}=[...]", "params")),
}


class _Shrink(Exception):
    """The probe's default size does not fit: keep its first ``n`` samples (raised from the one-sample estimate)."""

    def __init__(self, n: int, why: str) -> None:
        super().__init__(why)
        self.n = n


class ProbeData:
    """One probe on the module's device and its :class:`~lightning_geomdim.core.probe_trace.ProbeTrace`, both made
    at first use (inside the first measure that reads them, which fails if they do) and shared by the probe's
    measures: one forward pass over the probe (after one over its first sample, from which :meth:`_preflight`
    refuses what would not fit) and one float64 copy of the parameters per probe and step.

    Every process holds the same probe and, under DDP, the same weights, so each measures the whole probe by
    itself: no collective call (nothing to deadlock on if the processes' measurements diverge), and the samples
    keep their order, so the values equal a single-process run's bit for bit.

    A probe of the default size (``fit_memory``) on which the traced pass or a measure would not fit keeps its first
    samples, the most on which all fit, for the rest of the run (one warning), instead of the refusal.
    """

    def __init__(
        self, module: nn.Module, probe: Probe | None, settings: MeasureSettings, measures: Sequence[str],
    ) -> None:
        self.module, self.probe, self.settings, self.measures = module, probe, settings, measures
        self._xy: tuple[Any, Any] | None = None
        self._trace: ProbeTrace | None = None
        self.refused: dict[str, MemoryBudgetError] = {}  # measure → its refusal, from the one-sample estimate

    def xy(self) -> tuple[Any, Any]:
        """(x, y) on the module's device; (None, None) without a probe."""
        if self._xy is None:
            if self.probe is None:
                return None, None
            device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
            self._xy = move_data_to_device(self.probe.x, device), move_data_to_device(self.probe.y, device)
        return self._xy

    def trace(self) -> ProbeTrace | None:
        """The traced pass over x (None without a probe): with autograd when the dimension or flatness is due, and
        the Gram engine's factors when a dimension may be computed on it."""
        if self._trace is None and self.probe is not None:
            try:
                self._trace = self._traced()
            except _Shrink as shrink:
                rank_zero_warn(str(shrink))
                self.probe.keep_first(shrink.n)
                self._xy = None
                self._trace = self._traced()
        return self._trace

    def _traced(self) -> ProbeTrace:
        s, due = self.settings, self.measures
        return ProbeTrace.of(
            self.module, self.xy()[0], params=s.params, dtype=s.dtype, output_fn=s.output_fn,
            grad="dimension" in due or "flatness" in due,
            factors="dimension" in due or ("flatness" in due and s.flatness_flat_dimension), before=self._preflight,
        )

    def trace_for(self, measure: str) -> ProbeTrace | None:
        """:meth:`trace`, or the refusal of ``measure`` when its estimate from one sample exceeds the budget."""
        trace = self.trace()
        if measure in self.refused:
            raise self.refused[measure]
        return trace

    def _preflight(self, one: ProbeTrace, n: int) -> None:
        """From a one-sample trace: refuse the pass over the whole probe, or the measures, that would not fit; a probe
        of the default size first keeps the samples that every measure planned on it fits (:meth:`_fit`)."""
        budget = memory_budget(one.fm.device, self.settings.max_memory_bytes)
        if self.probe is not None and self.probe.fit_memory:
            self._fit(one, n, budget)
        for what, need in self._needs(one, self.measures, budget).items():
            try:
                check_memory(need(n), budget, what=f"{what} on {n:,} samples (estimated from one sample)",
                             remedies=PREFLIGHT_REMEDIES.get(what, ()), by_samples=(n, need))
            except MemoryBudgetError as err:
                if what == "the traced pass":
                    raise
                self.refused[what] = err

    def _needs(self, one: ProbeTrace, measures: Sequence[str], budget: int) -> dict[str, Callable[[int], int]]:
        """Bytes the traced pass and each of ``measures`` need on m samples like ``one``'s."""
        s = self.settings
        factors = "dimension" in measures or ("flatness" in measures and s.flatness_flat_dimension)
        by_n = {"the traced pass": lambda m: trace_bytes(one, m, factors=factors)}
        if "dimension" in measures:
            by_n["dimension"] = lambda m: dimension_bytes(one, m, engine=s.engine, spectrum=s.spectrum if (
                self.probe is None or self.probe.spectrum is None) else self.probe.spectrum,
                logit_differences=self.probe is None or self.probe.logit_differences)
        if "flatness" in measures:
            by_n["flatness"] = lambda m: flatness_bytes(one, m, top_k=s.flatness_top_k,
                                                        trace_samples=s.flatness_trace_samples, fit_within=budget)
        return by_n

    def _fit(self, one: ProbeTrace, n: int, budget: int) -> None:
        """Shrink a default-size probe, once for the run, to the rows and the memory of every measure planned on it
        (not only those due now, so that the probe does not change again when another measure comes due)."""
        assert self.probe is not None
        self._fit_rows(one, n)
        over = {what: need for what, need in self._needs(one, self.probe.planned or self.measures, budget).items()
                if need(n) > budget}
        fits = min((largest_fitting(n, need, budget) for need in over.values()), default=n)
        if over and fits >= 1:
            needs = ", ".join(f"{what} {format_bytes(need(n))}" for what, need in over.items())
            raise _Shrink(fits, (
                f"GeometryMonitor: probe {self.probe.name!r} keeps its first {fits:,} of {n:,} samples for the rest "
                f"of the run, the most that fit the memory budget of {format_bytes(budget)} (on {n:,}: {needs}, "
                "estimated from one sample). Pass probe_size=... or a probe 'size' to choose (a size you give is "
                "kept, and what does not fit is refused), or max_memory_bytes=..."))

    def _fit_rows(self, one: ProbeTrace, n: int) -> None:
        """A default-size probe keeps at most :data:`DEFAULT_MAX_ROWS` rows of J (per-token outputs: 512 rows per
        sequence of the benchmark's GPT), the most samples within them, at least one."""
        rows = one.output.numel() if isinstance(one.output, torch.Tensor) else 0
        keep = max(1, DEFAULT_MAX_ROWS // max(rows, 1))
        if rows and keep < n:
            raise _Shrink(keep, (
                f"GeometryMonitor: probe {self.probe.name!r} keeps its first {keep:,} of {n:,} samples for the rest "
                f"of the run: each sample has {rows:,} outputs, and a default-size probe keeps within "
                f"{DEFAULT_MAX_ROWS:,} rows of J (a Gram of that order costs seconds; its time grows with the cube of "
                "the rows). Pass probe_size=... or a probe 'size' to choose"))

    def release(self) -> None:
        if self._trace is not None:
            self._trace.release()
        self._trace = self._xy = None
