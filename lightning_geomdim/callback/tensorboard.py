"""TensorBoard extras of the GeometryMonitor, written only through a ``TensorBoardLogger``'s SummaryWriter.

* a custom-scalars layout (the "Custom Scalars" tab): per probe, the batch functional dimension beside its
  upper bound and M = N·K; the dimension of every probe (train vs val vs random) on one chart; linear regions
  of every probe on one chart; the flatness curvature on one chart;
* a histogram of log10 of the Jacobian's singular values per probe (``geometry/<probe>/log10_singular_values``),
  where the gap between the counted and the discarded values is visible;
* a heatmap image of the neurons' pairwise cosine similarities per ReLU layer
  (``geometry/alignment/<layer>/cosine_similarity``; red +1, white 0, blue −1), where aligned neurons show as
  off-diagonal red blocks.

Other loggers only receive the scalars.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

#: Heatmaps smaller than this many pixels per side are upsampled (nearest) to at least this size.
MIN_HEATMAP_PIXELS = 128
#: zlib level of the heatmaps' PNGs: level 1 encodes a 512 × 512 heatmap in 24 ms against 100 ms at PIL's default
#: (level 6, what ``SummaryWriter.add_image`` uses), for 16 % more bytes; ResNet-18's 17 heatmaps cost as much as
#: its whole alignment at level 6.
PNG_COMPRESS_LEVEL = 1
#: Layers with more neurons are averaged down to this many pixels per side (a 3 × n × n image of a layer with
#: 16,384 channels would take 3 GiB; aligned blocks stay visible as blocks).
MAX_HEATMAP_PIXELS = 1024


def tensorboard_loggers(loggers: Iterable[Logger]) -> list[TensorBoardLogger]:
    """The TensorBoardLoggers among ``loggers``."""
    return [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]


def tag(logger: TensorBoardLogger, key: str) -> str:
    """``key`` as the logger writes it from ``log_metrics`` (with the logger's ``prefix``, if any)."""
    prefix = getattr(logger, "_prefix", "") or ""
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}{key}" if prefix else key


def custom_scalars_layout(
    logger: TensorBoardLogger, probes: list[str], measures: Iterable[str], *, regions: bool = True
) -> dict[str, dict[str, list]]:
    """The custom-scalars layout for these probes and measures (exact tags, regex-escaped); ``regions=False``
    leaves out the linear-regions chart (a model without ReLU modules never logs them)."""

    def tags(*keys: str) -> list[str]:
        return [re.escape(tag(logger, k)) for k in keys]

    measures = set(measures)
    charts: dict[str, list] = {}
    if "dimension" in measures:
        for p in probes:
            charts[f"{p}: dimension, numerical rank and bounds"] = [
                "Multiline",
                tags(f"geometry/{p}/batch_functional_dimension", f"geometry/{p}/numerical_rank",
                     f"geometry/{p}/upper_bound", f"geometry/{p}/num_rows"),
            ]
        charts["batch functional dimension: " + " vs ".join(probes)] = [
            "Multiline", tags(*(f"geometry/{p}/batch_functional_dimension" for p in probes))
        ]
        if regions:
            charts["linear regions: " + " vs ".join(probes)] = [
                "Multiline", tags(*(f"geometry/{p}/linear_regions" for p in probes))
            ]
    if "flatness" in measures:
        charts["flatness: max eigenvalue and trace"] = [
            "Multiline", tags("geometry/flatness/max_eigenvalue", "geometry/flatness/trace")
        ]
    return {"geometry": charts}


def write_layout(
    logger: TensorBoardLogger, probes: list[str], measures: Iterable[str], *, regions: bool = True
) -> None:
    logger.experiment.add_custom_scalars(custom_scalars_layout(logger, probes, measures, regions=regions))


def log_spectrum(logger: TensorBoardLogger, probe: str, singular_values: Tensor, step: int) -> None:
    """Histogram of log10 σ (σ > 0 only; all-zero spectra write nothing)."""
    sv = singular_values.detach().double().cpu()
    sv = sv[sv > 0]
    if sv.numel():
        logger.experiment.add_histogram(tag(logger, f"geometry/{probe}/log10_singular_values"), sv.log10(), step)


def cosine_heatmap(cosines: Tensor) -> Tensor:
    """RGB image (3, H, W) in [0, 1] of a (n, n) cosine matrix: red +1, white 0, blue −1; NaN is grey.

    H = W = n upsampled to at least ``MIN_HEATMAP_PIXELS``, or ``MAX_HEATMAP_PIXELS`` (block averages) when n
    is larger.
    """
    c = cosines.detach().cpu()
    nan = torch.isnan(c)
    c = torch.nan_to_num(c, nan=0.0).clamp(-1, 1)
    if c.shape[0] > MAX_HEATMAP_PIXELS:
        pool = torch.nn.functional.adaptive_avg_pool2d
        c = pool(c.float()[None, None], MAX_HEATMAP_PIXELS)[0, 0]
        nan = torch.nn.functional.adaptive_max_pool2d(nan.float()[None, None], MAX_HEATMAP_PIXELS)[0, 0] > 0
    c = c.double()
    pos, neg = c.clamp(min=0), (-c).clamp(min=0)
    img = torch.stack([1 - neg, 1 - pos - neg, 1 - pos]).clamp(0, 1)
    img[:, nan] = 0.5
    n = max(1, c.shape[0])
    scale = max(1, math.ceil(MIN_HEATMAP_PIXELS / n))
    return img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).float()


def encode_heatmap(cosines: Tensor) -> Summary.Image:
    """The :func:`cosine_heatmap` of a (n, n) cosine matrix as a PNG, ready to log (:func:`log_heatmap`); the
    monitor encodes it as part of the alignment's measurement, within its time allowance."""
    from PIL import Image  # only where images are written (as torch's SummaryWriter imports it)

    rgb = (cosine_heatmap(cosines) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    with io.BytesIO() as png:
        Image.fromarray(rgb, mode="RGB").save(png, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        encoded = png.getvalue()
    return Summary.Image(height=rgb.shape[0], width=rgb.shape[1], colorspace=3, encoded_image_string=encoded)


def log_heatmap(logger: TensorBoardLogger, layer: str, image: Summary.Image, step: int) -> None:
    """Write an encoded heatmap (:func:`encode_heatmap`) under ``geometry/alignment/<layer>/cosine_similarity``.

    ``SummaryWriter.add_image`` takes pixels and encodes them again, at the slow default level; a torch
    ``SummaryWriter`` takes the summary as it is through its event file writer (``file_writer``, None once the
    writer is closed), and any other writer gets the decoded pixels through ``add_image``."""
    from PIL import Image

    writer = logger.experiment
    name = tag(logger, f"geometry/alignment/{layer}/cosine_similarity")
    file_writer = getattr(writer, "file_writer", None)
    if file_writer is not None and hasattr(file_writer, "add_summary"):
        file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), step)
        return
    with io.BytesIO(image.encoded_image_string) as png, Image.open(png) as decoded:
        pixels = torch.from_numpy(np.array(decoded.convert("RGB")))
    writer.add_image(name, pixels, step, dataformats="HWC")
