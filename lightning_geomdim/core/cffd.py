"""Computable full functional dimension (CFFD): the largest batch functional dimension over inputs.

For fixed θ the CFFD is max_X BFD(θ, X). It is estimated, as in Bona-Pellissier et al., by the BFD on
random inputs of increasing size; the paper proves fast convergence. Reaching it needs M ≥ P − hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import torch
from torch import Tensor, nn

from lightning_geomdim.core.dimension import DimensionResult, Engine, batch_functional_dimension
from lightning_geomdim.core.functional_model import OutputFn

Sampler = Callable[[int, torch.Generator], Any]
"""``sampler(n, generator)`` returns a probe batch of n inputs, drawing only from ``generator``."""


@dataclass(frozen=True)
class CFFDResult:
    """Estimate of the computable full functional dimension.

    Attributes:
        sizes: probe sizes N that were evaluated, increasing.
        ranks: batch functional dimension at each size.
        estimate: the largest rank seen (the CFFD estimate).
        upper_bound: P − hidden neurons, the bound no input batch can exceed.
        saturated: the estimate reached ``upper_bound`` or stopped increasing between two sizes.
        results: the full :class:`DimensionResult` per size.
    """

    sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    estimate: int
    upper_bound: int
    saturated: bool
    results: tuple[DimensionResult, ...]


def gaussian_sampler(input_shape: Sequence[int], *, mean: float = 0.5, std: float = 1.0) -> Sampler:
    """i.i.d. N(mean, std²) inputs of per-sample shape ``input_shape`` (default the paper's N(0.5, 1))."""
    shape = tuple(int(s) for s in input_shape)

    def sample(n: int, generator: torch.Generator) -> Tensor:
        return torch.randn((n, *shape), generator=generator, dtype=torch.float64) * std + mean

    return sample


def default_sizes(num_params: int, num_outputs_per_sample: int, *, oversampling: int = 4) -> list[int]:
    """Doubling sizes from 8 until N · K ≥ ``oversampling`` · P.

    N · K ≥ P − hidden rows are necessary to reach the bound; the margin lets a few random inputs fall in
    regions where some unit is inactive without stopping the estimate short.
    """
    needed = -(-oversampling * num_params // max(1, num_outputs_per_sample))
    sizes, n = [], 8
    while n < needed:
        sizes.append(n)
        n *= 2
    sizes.append(max(needed, 1))
    return sorted(set(sizes))


def computable_full_functional_dimension(
    model: nn.Module,
    input_shape_or_sampler: Sequence[int] | Sampler,
    sizes: Sequence[int] | None = None,
    *,
    generator: torch.Generator | None = None,
    seed: int = 0,
    mean: float = 0.5,
    std: float = 1.0,
    output_fn: OutputFn | None = None,
    params: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float64,
    rtol: float | None = None,
    chunk_size: int | None = None,
    engine: Engine = "auto",
    max_memory_bytes: int | None = None,
) -> CFFDResult:
    """Estimate the CFFD by the batch functional dimension on random inputs of increasing size.

    Args:
        model: the network; state restored afterwards as in ``batch_functional_dimension``.
        input_shape_or_sampler: per-sample input shape (e.g. ``(784,)``) for i.i.d. Gaussian
            N(``mean``, ``std``²) inputs, or a :data:`Sampler` ``(n, generator) -> batch``.
        sizes: increasing probe sizes; default :func:`default_sizes` (doubling from 8 until N·K ≥ 4·P).
        generator: source of randomness; default a fresh ``torch.Generator`` seeded with ``seed``. The
            global RNG is never used.
        Remaining arguments are passed to :func:`~lightning_geomdim.batch_functional_dimension`.

    Stops early once the rank reaches P − hidden neurons, or did not increase from one size to the next
    (saturation). Each size draws a fresh batch from the generator.

    Raises:
        ValueError: sizes empty, not positive or not increasing.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    sampler = (
        input_shape_or_sampler if callable(input_shape_or_sampler)
        else gaussian_sampler(input_shape_or_sampler, mean=mean, std=std)
    )
    kwargs = dict(output_fn=output_fn, params=params, dtype=dtype, rtol=rtol, chunk_size=chunk_size,
                  engine=engine, max_memory_bytes=max_memory_bytes)
    if sizes is None:
        first = batch_functional_dimension(model, sampler(1, generator), **kwargs)
        sizes = default_sizes(first.num_params, first.num_outputs)
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1 or any(b <= a for a, b in pairwise(sizes)):
        raise ValueError(f"sizes must be a non-empty increasing sequence of positive ints, got {sizes}")
    results: list[DimensionResult] = []
    saturated = False
    for n in sizes:
        res = batch_functional_dimension(model, sampler(n, generator), **kwargs)
        results.append(res)
        if res.rank >= _parameter_bound(res) or (len(results) > 1 and res.rank <= results[-2].rank):
            saturated = True
            break
    ranks = tuple(r.rank for r in results)
    return CFFDResult(
        sizes=tuple(sizes[: len(results)]), ranks=ranks, estimate=max(ranks),
        upper_bound=_parameter_bound(results[-1]), saturated=saturated, results=tuple(results),
    )


def _parameter_bound(res: DimensionResult) -> int:
    # The bound no input can beat: P − hidden (the row bound M only limits one probe size).
    return res.num_params - res.num_hidden_neurons
