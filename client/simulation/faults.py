"""Simulated faulty or malicious sites, for robustness experiments only.

A fault comes from one entry of a simulation's partition manifest (``client.simulation.partitions``,
``{"site_id": ..., "cache": ..., "fault": {...}}``), never from a deployment node's
``node_config``: a real site has no setting that makes it misbehave. A virtual site with a fault
trains honestly on its partition and then corrupts either its training data (``label-flip``) or
the update it sends (``inflate``: the ``num-examples`` it reports; every other kind: the arrays).
This module holds what a fault is and does; ``client.simulation.app`` applies it, in the
simulation's own ClientApp (a Flower mod on the train reply, a hook on the data the handlers open),
so the deployed ClientApp (``client.client_app``) has no fault code path. The
server-side defences are in ``server.validation`` (malformed replies are rejected, ``num-examples``
is bounded) and ``server.strategies`` (FedMedian, FedTrimmedAvg, Krum);
``docs/robustness.md`` says which bounds which.

The fault dict (``kind`` is required; the other keys are optional unless marked):

==============  ===========================================  ======================================
``kind``        parameters                                   effect
==============  ===========================================  ======================================
``label-flip``  ``markers`` (bool, true), ``mask`` (bool,    training data: every annotated marker
                true)                                        label 0 <-> 1; on slices with a
                                                             reference mask the mask is inverted
                                                             (``1 - mask``, the whole slice)
``scale``       ``factor`` (number, required)                sends ``g + factor * (w - g)``
``sign-flip``   ``factor`` (number > 0, 1.0)                 sends ``g - factor * (w - g)``
``noise``       ``std`` (number > 0, required)               sends ``g + N(0, std^2)``, the real
                                                             update discarded
``nan``         ``value`` ("nan" | "inf" | "-inf", "nan")    sends every value as ``value``
``inflate``     ``factor`` (number > 0, required)            trains and sends honestly, but reports
                                                             ``factor`` x its ``num-examples`` in
                                                             train replies (what FedAvg weights by)
==============  ===========================================  ======================================

``g`` is the global half the site received this round, ``w`` the half after honest training.
Update faults act on every floating-point array that is sent (parameters and normalisation
statistics alike, as a real attacker's would); integer arrays (``num_batches_tracked``) pass
unchanged. An invalid fault raises ``FaultError`` (a ``ValueError``) naming the problem.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from client.data.dataset import SliceDataset

#: The default of a parameter that has none.
REQUIRED = object()


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _number(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return None if ok else "must be a finite number"


def _positive(v: Any) -> str | None:
    return _number(v) or (None if v > 0 else "must be > 0")


def _non_finite_value(v: Any) -> str | None:
    return None if v in NON_FINITE_VALUES else f"must be one of {sorted(NON_FINITE_VALUES)}"


NON_FINITE_VALUES = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

#: kind -> {parameter: (default or REQUIRED, checker)}; a checker returns an error text or None.
FAULT_KINDS: dict[str, dict[str, tuple[Any, Any]]] = {
    "label-flip": {"markers": (True, _bool), "mask": (True, _bool)},
    "scale": {"factor": (REQUIRED, _number)},
    "sign-flip": {"factor": (1.0, _positive)},
    "noise": {"std": (REQUIRED, _positive)},
    "nan": {"value": ("nan", _non_finite_value)},
    "inflate": {"factor": (REQUIRED, _positive)},
}
#: Kinds that corrupt the training data; ``METRIC_FAULTS`` what the train reply claims; the others
#: corrupt the update after honest training.
DATA_FAULTS = frozenset({"label-flip"})
METRIC_FAULTS = frozenset({"inflate"})


class FaultError(ValueError):
    """A fault dict with an unknown kind, an unknown or missing parameter, or a bad value."""


@dataclass(frozen=True)
class Fault:
    """A validated fault: its kind and every parameter of that kind (defaults filled in)."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, name: str) -> Any:
        return dict(self.params)[name]

    @property
    def corrupts_data(self) -> bool:
        return self.kind in DATA_FAULTS

    @property
    def corrupts_update(self) -> bool:
        return self.kind not in DATA_FAULTS | METRIC_FAULTS


def parse_fault(fault: Mapping[str, Any] | None) -> Fault | None:
    """The validated fault of a manifest entry; ``None`` for an honest site (empty or no dict).

    Raises ``FaultError`` for a non-dict, a missing or unknown ``kind``, an unknown or missing
    parameter, or a value of the wrong type or range. Messages name the kind and the parameter.
    """
    if not fault:
        return None
    if not isinstance(fault, Mapping):
        raise FaultError(f"a fault must be a dict like {{'kind': 'scale', 'factor': 10.0}}, got {type(fault).__name__}")
    if "kind" not in fault:
        raise FaultError(f"fault {dict(fault)} has no 'kind'; valid kinds: {sorted(FAULT_KINDS)}")
    kind = fault["kind"]
    if kind not in FAULT_KINDS:
        raise FaultError(f"unknown fault kind {kind!r}; valid kinds: {sorted(FAULT_KINDS)}")
    spec = FAULT_KINDS[kind]
    unknown = sorted(set(fault) - set(spec) - {"kind"})
    if unknown:
        raise FaultError(f"fault {kind!r} has unknown parameter(s) {unknown}; it takes {sorted(spec)}")
    params = []
    for name, (default, check) in spec.items():
        if name not in fault:
            if default is REQUIRED:
                raise FaultError(f"fault {kind!r} needs parameter {name!r}")
            params.append((name, default))
            continue
        problem = check(fault[name])
        if problem:
            raise FaultError(f"fault {kind!r}: {name} {problem}, got {fault[name]!r}")
        params.append((name, fault[name]))
    if kind == "label-flip" and not any(v for _, v in params):
        raise FaultError("fault 'label-flip' with markers and mask both false changes nothing")
    return Fault(kind, tuple(params))


def fault_seed(*parts: Any) -> int:
    """A 63-bit seed from the run seed, round and site id, so two noisy sites draw different noise."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# --- update faults ------------------------------------------------------------------------


def corrupt_update(
    global_state: Mapping[str, Tensor],
    local_state: Mapping[str, Tensor],
    fault: Mapping[str, Any] | Fault | None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """What a faulty site sends instead of ``local_state`` (its half after honest training).

    ``global_state``: the half it received this round. Every floating-point array present in both
    is corrupted as the fault's kind says (module docstring); other arrays, and every array for an
    honest site or a data fault (``label-flip``), are returned as they are. ``seed`` draws the
    ``noise`` kind's values. Pure: the inputs are not modified.
    """
    fault = fault if isinstance(fault, Fault) or fault is None else parse_fault(fault)
    out = dict(local_state)
    if fault is None or not fault.corrupts_update:
        return out
    g = torch.Generator().manual_seed(int(seed))
    for key in sorted(local_state):
        w = local_state[key]
        if key not in global_state or not w.is_floating_point():
            continue
        ref = global_state[key].to(w.dtype)
        if fault.kind == "scale":
            new = ref + fault["factor"] * (w - ref)
        elif fault.kind == "sign-flip":
            new = ref - fault["factor"] * (w - ref)
        elif fault.kind == "noise":
            new = ref + fault["std"] * torch.randn(w.shape, generator=g, dtype=w.dtype)
        else:  # "nan"
            new = torch.full_like(w, NON_FINITE_VALUES[fault["value"]])
        out[key] = new.to(w.dtype)
    return out


def reported_examples(num_examples: int, fault: Mapping[str, Any] | Fault | None) -> int:
    """The ``num-examples`` a site puts in its train reply: ``factor`` times the true one for
    ``inflate``, the true one for every other site."""
    fault = fault if isinstance(fault, Fault) or fault is None else parse_fault(fault)
    if fault is None or fault.kind != "inflate":
        return int(num_examples)
    return int(round(num_examples * fault["factor"]))


# --- data faults --------------------------------------------------------------------------


def flip_labels(labels: np.ndarray) -> np.ndarray:
    """Annotated labels 0 <-> 1; NaN (not annotated) stays NaN."""
    labels = np.asarray(labels)
    return np.where(np.isnan(labels), labels, 1 - labels).astype(labels.dtype)


class LabelFlipped(SliceDataset):
    """The slices of ``base`` with marker labels flipped and/or reference masks inverted.

    Every view of the data the site uses reads through it: the items the loader yields, the
    labels counted for the counts round and ``local`` pos-weight, and the hematoma pixels that
    balanced sampling balances; so the site behaves as one whose annotations are all wrong.
    Masks are inverted over the whole slice (``1 - mask``) on slices with a reference mask only;
    slices without one stay unknown (stage 1 learns nothing from them either way).
    """

    def __init__(self, base: SliceDataset, markers: bool = True, mask: bool = True) -> None:
        super().__init__(base.cache, base.indices)
        self.flip_markers, self.flip_mask = markers, mask

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = super().__getitem__(i)
        if self.flip_markers:
            item["labels"] = torch.from_numpy(flip_labels(item["labels"].numpy()))
        if self.flip_mask and bool(item["mask_known"]):
            item["mask"] = 1 - item["mask"]
        return item

    def labels(self) -> np.ndarray:
        labels = super().labels()
        return flip_labels(labels) if self.flip_markers else labels

    def hematoma_pixels(self) -> np.ndarray:
        pixels = super().hematoma_pixels()
        if not self.flip_mask or not len(self):
            return pixels
        per_slice = int(np.prod(self.cache.masks.shape[1:]))
        return np.where(self._known[self.indices], per_slice - pixels, pixels)


def corrupt_training_data(train: SliceDataset, fault: Mapping[str, Any] | Fault | None) -> SliceDataset:
    """The training split a faulty site learns from: ``LabelFlipped`` for ``label-flip``, else ``train``."""
    fault = fault if isinstance(fault, Fault) or fault is None else parse_fault(fault)
    if fault is None or fault.kind != "label-flip":
        return train
    return LabelFlipped(train, markers=fault["markers"], mask=fault["mask"])
