"""The monitor's probes for one Trainer run: built at train start from the trainer's dataloaders (see
:mod:`.probes` for the kinds of probes), and the probes that flatness and alignment are measured on.

The default probes (``["train", "val", "random"]``) leave out ``"val"`` without validation data and ``"random"``
(with a warning) when the input is integer or a tuple/dict. Saved probes (a checkpoint's indices/seeds) are
rebuilt as they were, unless the probe's source changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_geomdim.callback.probe_spec import ProbeSpec
from lightning_geomdim.callback.probes import (
    Probe,
    dataset_probe,
    input_template,
    isolated_rng,
    nth_dataloader,
    random_probe,
    tensor_probe,
)


def build_probes(
    trainer: Trainer, specs: Sequence[ProbeSpec], *, input_fn: Callable[[Any], Any], target_fn: Callable[[Any], Any],
    seed: int, saved: Mapping[str, Mapping[str, Any]], default_probes: bool,
) -> dict[str, Probe]:
    """The probes of ``specs`` (name → probe, in the order of ``specs``), from the trainer's data."""
    probes: dict[str, Probe] = {}
    template: Any = None
    for spec in sorted(specs, key=lambda s: s.source == "random"):  # random probes imitate data probes
        state = saved.get(spec.name)
        if state is not None and state.get("source") != spec.source:
            state = None
        if spec.source in ("train", "val"):
            loader = _dataloader(trainer, spec, default_probes)
            if loader is None:
                continue
            probe = dataset_probe(spec, loader, input_fn, target_fn, seed, state)
            template = probe.x if template is None else template
        elif spec.source == "random":
            if template is None and spec.shape is None and state is None:
                loader = nth_dataloader(trainer.train_dataloader)
                template = input_template(loader, input_fn) if loader is not None else None
            try:
                probe = random_probe(spec, template, seed, state)
            except MisconfigurationException as err:
                if not default_probes:
                    raise
                # token ids, tuple/dict inputs: the default probes include "random" only where it makes sense
                rank_zero_warn(f"GeometryMonitor: the default random probe is left out: {err}")
                continue
        else:
            probe = tensor_probe(spec)
            template = probe.x if template is None else template
        probes[spec.name] = probe
    return {s.name: probes[s.name] for s in specs if s.name in probes}


def _dataloader(trainer: Trainer, spec: ProbeSpec, default_probes: bool) -> Any:
    if spec.source == "train":
        loaders = trainer.train_dataloader
    else:
        if trainer.val_dataloaders is None and trainer.enable_validation:
            # Lightning loads the val dataloaders lazily (at the sanity check or the first validation); loading
            # them now is what the sanity check does. Nothing is iterated. (No public Trainer API does this.)
            with isolated_rng():
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
        loaders = trainer.val_dataloaders
    loader = nth_dataloader(loaders, spec.dataloader_idx)
    if loader is None:
        if spec.source == "val" and default_probes:
            return None  # the default probes include "val" only when there is validation data
        raise MisconfigurationException(
            f"probe {spec.name!r} needs a {spec.source} dataloader (index {spec.dataloader_idx}), but the "
            f"trainer has none (validation needs val data, a validation_step and limit_val_batches > 0): "
            f"provide {spec.source} data, or remove the probe"
        )
    return loader


def flatness_probe(probes: Mapping[str, Probe], name: str | None) -> Probe | None:
    """The probe of flatness: ``name``, else ``"train"`` if it has targets, else the first probe with targets.

    Raises:
        MisconfigurationException: the probe ``name`` has no targets.
    """
    if name is not None:
        probe = probes.get(name)
        if probe is not None and probe.y is None:
            raise MisconfigurationException(f"flatness_probe={name!r} has no targets: pick a probe with targets")
        return probe
    if "train" in probes and probes["train"].y is not None:
        return probes["train"]
    return next((p for p in probes.values() if p.y is not None), None)


def alignment_probe(probes: Mapping[str, Probe], name: str | None) -> Probe | None:
    """The probe of alignment's activity statistics: ``name``, else ``"train"``, else the first probe."""
    if name is not None:
        return probes.get(name)
    return probes.get("train") or next(iter(probes.values()), None)


def can_measure_flatness(probes: Mapping[str, Probe], name: str | None, default_measures: bool) -> bool:
    """Whether flatness has a probe with targets; when it has none, warn (default measures: flatness is dropped)
    or raise (flatness was asked for).

    Raises:
        MisconfigurationException: no probe with targets, and ``measures`` names flatness; or see
            :func:`flatness_probe`.
    """
    if flatness_probe(probes, name) is not None:
        return True
    if not default_measures:  # only what the user asked for explicitly may be fatal
        raise MisconfigurationException(
            "flatness needs a probe with targets, but none has any: return targets from target_fn, add "
            "a probe with targets, or remove 'flatness' from measures"
        )
    rank_zero_warn(
        "GeometryMonitor: flatness needs targets, but no probe has any (unlabelled data, or batches "
        "that target_fn does not understand): measuring dimension and alignment only. Pass "
        "target_fn=... (and loss_fn=...) to measure flatness"
    )
    return False
